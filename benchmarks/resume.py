"""Cold resume, raced fairly: ckpt's resume() against a raw read of the same file and torch.load.

    python -m benchmarks.resume                      # 0.5 GB state (params + Adam), 5 rounds
    python -m benchmarks.resume --size-gb 1 --rounds 7 --dir /data/scratch

Every round runs each method once, the order rotating, the page cache dropped before
each: a raw read of ckpt's file (64 MiB ``readinto``), ``torch.load`` +
``load_state_dict`` of the same state saved with ``torch.save``, and ckpt's
``resume()`` (verified). Each resume goes into the same model and a fresh optimizer
(no state yet, as in a restarted run), so the memory that stays is the optimizer's
state; transient memory is the peak of anonymous memory minus what stays after,
divided by the checkpoint's size. Reported per round: each time, the raw read's time
divided by it (its speed against the read limit), and ckpt's speed against
``torch.load``'s. Results go to ``benchmarks/results/resume.{json,md}``.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from ckpt import CheckpointManager
from ckpt.store import checksum

from . import _harness as h
from ._results import in_scratch, parse_args, parser, publish
from ._variants import build_state


def _transient(fn: Callable[[], Any]) -> Dict[str, float]:
    """(seconds, peak resident bytes above the start, bytes still resident after): the
    peak is VmHWM, reset to the current RSS first (exact, unlike sampling)."""
    gc.collect()
    h.reset_peak()
    base = h.status_bytes("VmRSS")
    start = time.perf_counter()
    keep = fn()
    took = time.perf_counter() - start
    gc.collect()
    peak, after = h.status_bytes("VmHWM"), h.status_bytes("VmRSS")
    del keep
    return {"time": took, "peak": max(0, peak - base), "stays": max(0, after - base)}


def measure(root: Path, size_gb: float, rounds: int) -> Dict[str, Any]:
    model, opt = build_state(int(size_gb * 1e9), 2048)
    nbytes = sum(t.nbytes for t in model.state_dict().values()) + sum(
        t.nbytes for s in opt.state_dict()["state"].values() for t in s.values())
    with CheckpointManager(root / "ckpt", model=model, optimizer=opt, progress=False) as mgr:
        mgr.save(epoch=0)
        ckpt_file = mgr.latest.path  # type: ignore[union-attr]
    torch_file = root / "torch.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, torch_file)
    buffer = bytearray(64 << 20)

    def raw() -> None:
        with open(ckpt_file, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass

    def torch_resume() -> Any:
        fresh = torch.optim.Adam(model.parameters())
        obj = torch.load(torch_file, weights_only=True)
        model.load_state_dict(obj["model"])
        fresh.load_state_dict(obj["optimizer"])
        return fresh

    def ckpt_resume() -> Any:
        fresh = torch.optim.Adam(model.parameters())
        with CheckpointManager(root / "ckpt", model=model, optimizer=fresh, progress=False) as m:
            m.resume()
        return fresh

    methods = {"raw_read": raw, "torch_resume": torch_resume, "ckpt_resume": ckpt_resume}
    names = list(methods)
    runs: List[Dict[str, Dict[str, float]]] = []
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        found = {}
        for name in order:
            h.cold([ckpt_file, torch_file])
            found[name] = _transient(methods[name])
        if r:  # round 0 is untimed
            runs.append(found)
    return {"bytes": nbytes, "file_bytes": os.stat(ckpt_file).st_size, "rounds": runs,
            "crc": checksum.CRC_IMPL, "machine": h.describe_machine(root)}


def render(report: Dict[str, Any]) -> str:
    size = report["bytes"]
    lines = [f"Cold resume: {size / 1e9:.2f} GB (Linear stack + Adam), {len(report['rounds'])} rounds "
             f"after 1 untimed, order rotating, page cache dropped before each; CRC-32 {report['crc']}.",
             f"Machine: {report['machine']}", "",
             "| round | raw read s | torch.load+load_state_dict s | ckpt resume() s | ckpt speed ÷ raw read | "
             "ckpt speed ÷ torch | ckpt transient ÷ size | torch transient ÷ size |",
             "|---|---|---|---|---|---|---|---|"]
    for i, run in enumerate(report["rounds"], 1):
        raw, t, c = run["raw_read"], run["torch_resume"], run["ckpt_resume"]
        lines.append(f"| {i} | {raw['time']:.3f} | {t['time']:.3f} | {c['time']:.3f} | "
                     f"{raw['time'] / c['time']:.2f} | {t['time'] / c['time']:.2f} | "
                     f"{(c['peak'] - c['stays']) / size:.2f} | {(t['peak'] - t['stays']) / size:.2f} |")
    ratios = sorted(r["raw_read"]["time"] / r["ckpt_resume"]["time"] for r in report["rounds"])
    lines.append("")
    lines.append(f"Median over rounds of ckpt resume speed ÷ raw read: {ratios[len(ratios) // 2]:.2f} "
                 f"(target ≥ 0.9); transient memory target ≤ 0.1 of the size.")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = parser("resume", __doc__)
    p.add_argument("--size-gb", type=float, default=0.5, help="state size (params + Adam), GB (default 0.5)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--name", default="resume", help="results file name (default resume)")
    args = parse_args(p, argv)
    report = in_scratch(args.dir, ".bench-resume-", lambda root: measure(root, args.size_gb, args.rounds))
    publish(args.out, args.name, report, render(report))


if __name__ == "__main__":
    main()
