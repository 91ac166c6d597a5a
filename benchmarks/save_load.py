"""Save/load benchmark: ckpt against the disk and memory floors and its peers, in one run.

    python -m benchmarks.save_load                         # ~1 GB state, 3 repetitions
    python -m benchmarks.save_load --size-gb 3 --reps 5 --dir /data/scratch

On one state (a stack of Linear layers + Adam: 1/3 parameters, 2/3 optimizer state)
and in one run it measures: the durable-write floor (raw tensor bytes + fsync) and the
memory-copy floor (into preallocated buffers); plain ``torch.save``; ``torch.save``
atomic + fsync; safetensors + fsync; ignite's DiskSaver + fsync;
``torch.distributed.checkpoint.save`` (one process); ckpt sync; ckpt async (the stall
the loop sees, and the time to commit); loads from a cold page cache; peak memory of
each (VmHWM of a fresh subprocess, reset before the operation); where a sync save's
time goes; and a small many-tensor state, ckpt's bookkeeping against bare
``torch.save`` + fsync. Medians of ``--reps`` runs, variants interleaved. Files go to a
temporary directory under ``--dir`` (default: the current directory, so the disk under
test is the one you run from; /tmp may be RAM). Results are printed as markdown and
written to ``benchmarks/results/save_load.{json,md}``. Optional baselines:
``pip install -e .[bench]`` (safetensors, pytorch-ignite); missing ones are skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from ckpt.io import checksum as fastio

from . import _harness as h
from ._results import in_scratch, parse_args, parser, publish
from ._variants import LOAD_INPUTS, LOADERS, SAVERS, Bench

MEMORY_VARIANTS = ["write_floor", "torch_save", "torch_atomic", "safetensors", "ignite", "dcp",
                   "ckpt_sync", "ckpt_async", "torch_load", "torch_load_mmap", "safetensors_load",
                   "dcp_load", "ckpt_load", "torch_resume", "ckpt_resume"]


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = parser("save_load", __doc__)
    p.add_argument("--size-gb", type=float, default=1.0, help="state size (params + Adam), GB (default 1)")
    p.add_argument("--width", type=int, default=2048, help="Linear layer width (default 2048: 16 MiB weights)")
    p.add_argument("--small-mb", type=float, default=10.0, help="small many-tensor state, MB (default 10)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; medians are reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of the saves first (default 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return parse_args(p, argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    report = in_scratch(args.dir, "ckpt-bench-", lambda root: run(args, root))
    publish(args.out, "save_load", report, render(report))


def run(args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    report: Dict[str, Any] = {"machine": h.describe_machine(root), "reps": args.reps,
                              "warmup": args.warmup, "crc": fastio.CRC_IMPL}
    big_state(args, root / "big", report)
    gc.collect()  # free the state before the subprocesses build theirs
    report["small"] = small_state(args, root / "small")
    report["memory"] = {} if args.no_memory else memory(args, root / "mem")
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["targets"] = targets(report)
    return report


def big_state(args: argparse.Namespace, root: Path, report: Dict[str, Any]) -> None:
    """Saves, loads and the breakdown on the ~1 GB state, into ``report``."""
    bench = Bench(root, int(args.size_gb * 1e9), args.width)
    report["state"] = {"bytes": bench.nbytes, "tensors": len(bench.tensors)}
    try:
        report["first_async_stall"] = bench.ckpt_async()["stall"]  # allocates the staging buffers
        savers = [(n, a) for n, _, a in SAVERS]
        repeat(bench, savers, args.warmup, lambda _: None)  # fresh disk blocks are slow on VMs
        report["saves"] = repeat(bench, savers, args.reps, lambda _: None)
        loaders = [(n, a) for n, _, a, needs in LOADERS if needs in report["saves"]]
        report["loads"] = repeat(bench, loaders, args.reps,
                                 lambda n: h.cold([bench.path(p) for p in LOAD_INPUTS[n]]))
        report["cache_drop"] = h.cold([])
        report["breakdown"] = breakdown(bench, args.reps)
    finally:
        bench.close()


def repeat(bench: Bench, variants: List[Any], reps: int, before: Any) -> Dict[str, Dict[str, Any]]:
    """Run each available variant ``reps`` times, interleaved; medians per measured key."""
    runs: Dict[str, List[Dict[str, float]]] = {}
    for _ in range(reps):
        for name, available in variants:
            if not available():
                continue
            before(name)
            os.sync()
            runs.setdefault(name, []).append(getattr(bench, name)())
            gc.collect()
    return {name: {**{k: h.median([r[k] for r in rs]) for k in rs[0]}, "runs": rs}
            for name, rs in runs.items()}


def breakdown(bench: Bench, reps: int) -> Dict[str, float]:
    """Where a durable torch.save's time goes, step by step, on the same state."""
    off = [bench.serialise_only(False) for _ in range(reps)]
    on = [bench.serialise_only(True) for _ in range(reps)]
    split = [bench.write_then_fsync() for _ in range(reps)]
    return {"serialise": h.median(off), "zip_crc": max(0.0, h.median(on) - h.median(off)),
            "crc32": h.median([bench.crc_only() for _ in range(reps)]),
            "write": h.median([w for w, _ in split]), "fsync": h.median([s for _, s in split])}


def small_state(args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    """A ~10 MB state of many small tensors: ckpt's bookkeeping vs bare torch.save + fsync."""
    bench = Bench(root, int(args.small_mb * 1e6), 64)
    variants = [(n, lambda: True) for n in ("bare_fsync", "torch_atomic", "ckpt_sync")]
    try:
        for name, _ in variants:  # warm-up: first-call costs are not what a loop sees
            getattr(bench, name)()
        result = repeat(bench, variants, max(20, 10 * args.reps), lambda _: None)
    finally:
        bench.close()
    return {"bytes": bench.nbytes, "tensors": len(bench.tensors),
            **{name: {"time": r["time"]} for name, r in result.items()}}


def memory(args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    """Peak extra resident memory of each variant, each in a fresh process."""
    found: Dict[str, Any] = {}
    for name in MEMORY_VARIANTS:
        found[name] = h.run_child("benchmarks.save_load", [
            "--child", name, "--size-gb", str(args.size_gb), "--width", str(args.width),
            "--dir", str(root / name)])
    return found


def child(args: argparse.Namespace) -> Dict[str, Any]:
    """One variant in this fresh process: prepare its input, then measure its peak."""
    saver = {n: needs for n, _, _, needs in LOADERS}.get(args.child)
    available = {n: a for n, _, a in SAVERS} | {n: a for n, _, a, _ in LOADERS}
    if not available[args.child]():
        return {"skipped": "library not installed"}
    bench = Bench(Path(args.dir), int(args.size_gb * 1e9), args.width)
    if saver is not None:
        getattr(bench, saver)()
    gc.collect()
    try:
        return h.peak_during(getattr(bench, args.child))
    finally:
        bench.close()


def targets(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    saves, loads, small = report["saves"], report["loads"], report["small"]
    async_mem = report["memory"].get("ckpt_async", {}).get("extra_bytes")
    rows = [
        ("ckpt sync save ≥ 0.95× the write floor's speed",
         saves["write_floor"]["time"] / saves["ckpt_sync"]["time"], lambda v: v >= 0.95, "{:.2f}×"),
        ("ckpt async stall ≤ 1.5× the copy floor",
         saves["ckpt_async"]["stall"] / saves["copy_floor"]["time"], lambda v: v <= 1.5, "{:.2f}×"),
        ("ckpt async extra memory ≤ 1.1× the state",
         None if async_mem is None else async_mem / report["state"]["bytes"], lambda v: v <= 1.1, "{:.2f}×"),
        ("ckpt load (cold) ≥ 0.9× the read floor's speed",
         loads["read_floor"]["time"] / loads["ckpt_load"]["time"], lambda v: v >= 0.9, "{:.2f}×"),
        ("small state: ckpt bookkeeping ≤ 10% over torch.save + fsync",
         small["ckpt_sync"]["time"] / small["bare_fsync"]["time"] - 1, lambda v: v <= 0.10, "{:+.0%}"),
    ]
    return [{"target": t, "value": v, "shown": "—" if v is None else f.format(v),
             "met": None if v is None else bool(ok(v))} for t, v, ok, f in rows]


def render(report: Dict[str, Any]) -> str:
    from ._report import render as render_report
    return render_report(report, SAVERS, LOADERS)


if __name__ == "__main__":
    main()
