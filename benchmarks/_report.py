"""The benchmark's markdown: machine, save and load tables, targets, breakdown, small state."""

from __future__ import annotations

from typing import Any, Dict, List

from . import _harness as h


def render(report: Dict[str, Any], savers: List[Any], loaders: List[Any]) -> str:
    m, state = report["machine"], report["state"]
    parts = [
        "## Save and load benchmark (`python -m benchmarks.save_load`)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM; {m['filesystem']}; "
        f"Linux {m['kernel']}, Python {m['python']}, torch {m['torch']}. Load average "
        f"{m['load_average_at_start'][0]} at start, {m['load_average_at_end'][0]} at end. "
        f"State: {state['bytes'] / 2**30:.2f} GiB in {state['tensors']} tensors (Linear stack + Adam). "
        f"Median of {report['reps']} runs; cold loads via {report['cache_drop']}; "
        f"ckpt's CRC-32 from {report['crc']}.",
        "",
        "Time ratios: `× floor` is time ÷ the floor's time (1.00× = at the floor, lower is better); "
        "`× atomic` is time ÷ `torch.save` atomic + fsync. Memory, as a multiple of the state: "
        "the peak resident bytes the operation adds, all / anonymous only (a fresh process "
        "per row; all = VmHWM, which counts memory-mapped file pages; anonymous = RssAnon "
        "sampled every ms). An untimed first round precedes the timed ones (on thin-provisioned "
        "VM disks the first write to fresh blocks is several times slower).",
        "",
        save_table(report, savers),
        "",
        load_table(report, loaders),
        "",
        "### Targets",
        "",
        h.markdown_table(["target", "measured", "met"],
                         [[t["target"], t["shown"], {True: "yes", False: "**no**", None: "—"}[t["met"]]]
                          for t in report["targets"]]),
        "",
        breakdown_table(report),
        "",
        small_table(report),
    ]
    return "\n".join(parts)


def _memory(report: Dict[str, Any], name: str) -> str:
    found = report["memory"].get(name)
    if not found:
        return "—"
    if "extra_bytes" not in found:
        return found.get("skipped") or "error: " + str(found.get("error", "?"))[:60]
    state = report["state"]["bytes"]
    return f"{h.fmt_bytes(found['extra_bytes'], state)} / {h.fmt_bytes(found['extra_anon_bytes'], state)}"


def save_table(report: Dict[str, Any], savers: List[Any]) -> str:
    saves = report["saves"]
    floor, copy = saves["write_floor"]["time"], saves["copy_floor"]["time"]
    atomic = saves["torch_atomic"]["time"]
    rows = []
    for name, label, _ in savers:
        if name not in saves:
            rows.append([label, "not installed", "—", "—", "—"])
            continue
        t = saves[name]["time"]
        if name == "copy_floor":
            rows.append([label, h.fmt_seconds(t), "1.00× copy", "—", "—"])
            continue
        if name == "ckpt_async":
            stall = saves[name]["stall"]
            rows.append([label + ": stall seen by the loop", h.fmt_seconds(stall),
                         f"{stall / copy:.2f}× copy", h.fmt_ratio(stall / atomic), _memory(report, name)])
            rows.append([label + ": first save's stall (allocates buffers)",
                         h.fmt_seconds(report["first_async_stall"]),
                         f"{report['first_async_stall'] / copy:.2f}× copy", "—", "—"])
            label += ": time to commit"
        rows.append([label, h.fmt_seconds(t), f"{t / floor:.2f}× write", h.fmt_ratio(t / atomic),
                     _memory(report, name) if name != "ckpt_async" else "(above)"])
    return "### Save\n\n" + h.markdown_table(["save", "time (s)", "× floor", "× atomic",
                                               "peak extra memory: all / anon"], rows)


def load_table(report: Dict[str, Any], loaders: List[Any]) -> str:
    loads = report["loads"]
    floor = loads["read_floor"]["time"]
    rows = []
    for name, label, _, _ in loaders:
        if name not in loads:
            rows.append([label, "not installed", "—", "—"])
            continue
        t = loads[name]["time"]
        rows.append([label, h.fmt_seconds(t), f"{t / floor:.2f}× read", _memory(report, name)])
    return ("### Load (cold page cache; every page of the result touched)\n\n"
            + h.markdown_table(["load", "time (s)", "× floor", "peak extra memory: all / anon"], rows))


def breakdown_table(report: Dict[str, Any]) -> str:
    b, floor = report["breakdown"], report["saves"]["write_floor"]["time"]
    rows = [
        ["`torch.save` to a null sink, zip CRC off (pickling, record layout)", b["serialise"]],
        ["`torch.save`'s zip CRC-32, added when on (its default; ckpt computes its own per record)", b["zip_crc"]],
        [f"CRC-32 of every byte ({report['crc']}), one thread; ckpt overlaps it with the write", b["crc32"]],
        ["`write()` of the raw bytes into the page cache, no fsync", b["write"]],
        ["`fsync` of those bytes", b["fsync"]],
    ]
    return ("### Where a durable save's time goes (same state)\n\n"
            + h.markdown_table(["step", "time (s)", "share of write floor"],
                               [[k, h.fmt_seconds(v), f"{v / floor:.0%}"] for k, v in rows]))


def small_table(report: Dict[str, Any]) -> str:
    s = report["small"]
    bare = s["bare_fsync"]["time"]
    rows = [[label, f"{s[name]['time'] * 1e3:.1f}", f"{s[name]['time'] / bare - 1:+.0%}"]
            for name, label in (("bare_fsync", "`torch.save` + fsync of the file"),
                                ("torch_atomic", "`torch.save` atomic: tmp + fsync + rename + dir fsync"),
                                ("ckpt_sync", "**ckpt save** (lock, index, checksum, retention)"))]
    return (f"### Small state: {s['bytes'] / 1e6:.1f} MB in {s['tensors']} tensors\n\n"
            + h.markdown_table(["save", "median (ms)", "vs torch.save + fsync"], rows))
