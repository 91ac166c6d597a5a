"""End to end: what checkpointing every epoch costs a real training loop's throughput.

    python -m benchmarks.end_to_end                      # MLP + Adam, ~40 MB state
    python -m benchmarks.end_to_end --hidden 2048 --epoch-seconds 10 --rounds 5

A small real loop (an MLP on synthetic data, Adam, cross-entropy) runs ``--epochs``
epochs three ways: no checkpoints, ``CheckpointManager(async_save=True)`` saving at
the end of every epoch, and the same with synchronous saves (keep_last=2, so files are
deleted too). Steps per epoch are calibrated once so an epoch lasts about
``--epoch-seconds``. Runs are interleaved (each mode once per round, the order
rotating) after an untimed warm-up round; the overhead is each round's time over the
same round's no-checkpoint time, and the median over rounds is reported (CheckFreq,
FAST'21, reports <= 3.5 %; ckpt's target is <= 2 % with async saves). The final async
wait is inside the timed region (the run is not over until its checkpoint is durable).
Results go to ``benchmarks/results/end_to_end.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ckpt import CheckpointManager

from . import _harness as h
from ._results import in_scratch, parse_args, parser, publish

MODES = ["none", "async", "sync"]


class Loop:
    """The model, optimizer and data of the loop (rebuilt identically for every run)."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        d, w = args.features, args.hidden
        self.model = torch.nn.Sequential(torch.nn.Linear(d, w), torch.nn.ReLU(), torch.nn.Linear(w, w),
                                         torch.nn.ReLU(), torch.nn.Linear(w, w), torch.nn.ReLU(),
                                         torch.nn.Linear(w, 10))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.x = torch.randn(args.batch * 16, d)
        self.y = torch.randint(0, 10, (args.batch * 16,))
        self.batch = args.batch

    def step(self, i: int) -> None:
        at = (i % 16) * self.batch
        loss = torch.nn.functional.cross_entropy(self.model(self.x[at:at + self.batch]),
                                                 self.y[at:at + self.batch])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def state_bytes(self) -> int:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return 3 * params  # weights + Adam's two moments


def run(loop: Loop, mode: str, epochs: int, steps: int, directory: Path) -> float:
    """Seconds for ``epochs`` epochs of ``steps`` steps, checkpointing as ``mode`` says."""
    shutil.rmtree(directory, ignore_errors=True)
    mgr = None if mode == "none" else CheckpointManager(
        directory, model=loop.model, optimizer=loop.opt, keep_last=2, async_save=mode == "async", progress=False)
    start = time.perf_counter()
    for epoch in range(epochs):
        for i in range(steps):
            loop.step(i)
        if mgr is not None:
            mgr.save(epoch=epoch, metrics={"epoch": float(epoch)})
    if mgr is not None:
        mgr.wait()
    elapsed = time.perf_counter() - start
    if mgr is not None:
        mgr.close()
    return elapsed


def calibrate(loop: Loop, seconds: float) -> int:
    for i in range(5):
        loop.step(i)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 1.0:
        loop.step(n)
        n += 1
    return max(1, round(seconds * n / (time.perf_counter() - start)))


def measure(args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    machine = h.describe_machine(root)
    loop = Loop(args)
    steps = calibrate(loop, args.epoch_seconds)
    times: Dict[str, List[float]] = {m: [] for m in MODES}
    for r in range(args.rounds + 1):
        shift = r % len(MODES)
        for mode in MODES[shift:] + MODES[:shift]:
            t = run(loop, mode, args.epochs, steps, root / mode)
            if r > 0:
                times[mode].append(t)
    overhead = {m: [t / base - 1 for t, base in zip(times[m], times["none"])] for m in ("async", "sync")}
    return {"machine": machine, "state_bytes": loop.state_bytes(), "steps_per_epoch": steps,
            "epochs": args.epochs, "rounds": args.rounds, "batch": args.batch, "hidden": args.hidden,
            "times": times, "overhead": overhead,
            "median_overhead": {m: statistics.median(v) for m, v in overhead.items()},
            "load_at_end": [round(x, 2) for x in os.getloadavg()]}


def render(r: Dict[str, Any]) -> str:
    rows = []
    for mode in MODES:
        ts = r["times"][mode]
        over = "" if mode == "none" else (
            f"{r['median_overhead'][mode]:+.1%} (rounds: " + ", ".join(f"{v:+.1%}" for v in r["overhead"][mode]) + ")")
        label = {"none": "no checkpoints", "async": "**ckpt async, every epoch**",
                 "sync": "ckpt sync, every epoch"}[mode]
        rows.append([label, f"{min(ts):.2f}", f"{statistics.median(ts):.2f}", over])
    m = r["machine"]
    return "\n".join([
        f"End to end: MLP (hidden {r['hidden']}) + Adam, state {r['state_bytes'] / 2**20:.0f} MiB, batch "
        f"{r['batch']}, {r['epochs']} epochs of {r['steps_per_epoch']} steps, a checkpoint at every epoch's end "
        f"(keep_last=2); {r['rounds']} rounds after 1 untimed, order rotating.",
        f"Machine: {m['cpu']}, {m['cores']} cores; {m['filesystem']}; torch {m['torch']}; load average "
        f"{m['load_average_at_start']} at start, {r['load_at_end']} at end.", "",
        h.markdown_table(["loop", "best s", "median s", "throughput overhead (median of per-round ratios)"], rows)])


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = parser("end_to_end", __doc__)
    p.add_argument("--hidden", type=int, default=1024, help="MLP width (default 1024: ~40 MB state)")
    p.add_argument("--features", type=int, default=512, help="input features (default 512)")
    p.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (default 4)")
    p.add_argument("--epoch-seconds", type=float, default=3.0, help="target epoch length (default 3 s)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    return parse_args(p, argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse(argv)
    report = in_scratch(args.dir, "ckpt-e2e-", lambda root: measure(args, root))
    publish(args.out, "end_to_end", report, render(report))


if __name__ == "__main__":
    main()
