"""Scale benchmark: a save's cost with 10 to 10,000 checkpoints in the directory.

    python -m benchmarks.scale                       # 10,000 saves of a tiny state, keep-all
    python -m benchmarks.scale --count 2000 --dir /data/scratch

A tiny state (``nn.Linear(4, 4)`` + SGD), every checkpoint kept, saved synchronously
``--count`` times in one run directory. Each save is timed; the table gives the median
and mean cost of the saves around 10, 100, 1,000 and 10,000 checkpoints, their ratio to
the cost at 10, and the largest single save (the index journal's compaction), and the
cost of opening (and resuming) the full directory. Results go to
``benchmarks/results/scale.{json,md}``. The scale target (see
docs/explanation/performance.md): at 10,000 a save costs at most 2x what it does at 10.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ckpt import CheckpointManager

from . import _harness as h
from ._results import in_scratch, parse_args, parser, publish

#: Saves around each mark (after the mark's checkpoint count is reached).
WINDOW = 20


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = parser("scale", __doc__)
    p.add_argument("--count", type=int, default=10_000, help="checkpoints to save (default 10000)")
    return parse_args(p, argv)


def marks(count: int) -> List[int]:
    out = [m for m in (10, 100, 1000, 10_000, 100_000) if m <= count]
    return out if out and out[-1] == count else out + [count]


class Reference:
    """A second run directory that holds 10 to 20 checkpoints: its saves, interleaved
    with the big directory's, give each window a baseline under the same disk weather."""

    def __init__(self, root: Path) -> None:
        self.root, self.n = root, 0
        self.mgr = self._fresh()

    def _fresh(self) -> CheckpointManager:
        shutil.rmtree(self.root, ignore_errors=True)
        mgr = CheckpointManager(self.root, model=torch.nn.Linear(4, 4))
        for n in range(10):
            mgr.save(epoch=n)
        self.n = 10
        return mgr

    def save(self) -> Tuple[float, float]:
        if self.n >= 20:
            self.mgr.close()
            self.mgr = self._fresh()
        return timed(lambda: self.mgr.save(epoch=self.n, metrics={"loss": 1.0}), self._bump)

    def _bump(self) -> None:
        self.n += 1


def timed(fn: Callable[[], Any], after: Callable[[], None] = lambda: None) -> Tuple[float, float]:
    """(wall, CPU of this process) seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    out = time.perf_counter() - wall, time.process_time() - cpu
    after()
    return out


def run(args: argparse.Namespace, root: Path) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mgr = CheckpointManager(root / "run", model=model, optimizer=optimizer)
    ref = Reference(root / "ref")
    todo = marks(args.count)
    walls: List[float] = []
    pairs: Dict[int, List[Tuple[float, float, float, float]]] = {m: [] for m in todo}
    for n in range(args.count):
        mark = next((m for m in todo if m - WINDOW <= n < m), None)
        rotate = n % 2 == 0 and mark is not None
        r = ref.save() if rotate else None
        wall, cpu = timed(functools.partial(mgr.save, epoch=n, metrics={"loss": 1.0 / (n + 1)}))
        walls.append(wall)
        if mark is not None:
            r = r or ref.save()
            pairs[mark].append((wall, cpu, r[0], r[1]))
    mgr.close()
    ref.mgr.close()
    rows = []
    for mark in todo:
        got = pairs[mark]
        rows.append({"checkpoints": mark, "median": statistics.median(p[0] for p in got),
                     "cpu": statistics.median(p[1] for p in got), "max": max(p[0] for p in got),
                     "ref": statistics.median(p[2] for p in got),
                     "ratio_to_ref": statistics.median(p[0] / p[2] for p in got),
                     "cpu_ratio_to_ref": statistics.median(p[1] / p[3] for p in got)})
    whole = {"mean": statistics.mean(walls), "max": max(walls), "over_50ms": sum(t > 0.050 for t in walls)}
    opened = timed(lambda: CheckpointManager(root / "run", model=torch.nn.Linear(4, 4)))[0]
    reopened = CheckpointManager(root / "run", model=torch.nn.Linear(4, 4))
    resumed = timed(reopened.resume)[0]
    reopened.close()
    index_files = {p.name: p.stat().st_size for p in (root / "run").glob("ckpt-index*")}
    return {"machine": h.describe_machine(root), "count": args.count, "window": WINDOW, "rows": rows,
            "all_saves": whole, "open": opened, "resume": resumed, "index_files": index_files}


def render(report: Dict[str, Any]) -> str:
    rows = [[f"{r['checkpoints']:,}", f"{r['median'] * 1e3:.2f} ms", f"{r['cpu'] * 1e3:.2f} ms",
             f"{r['max'] * 1e3:.1f} ms", f"{r['ref'] * 1e3:.2f} ms", f"{r['ratio_to_ref']:.2f}x",
             f"{r['cpu_ratio_to_ref']:.2f}x"] for r in report["rows"]]
    table = h.markdown_table(["checkpoints in the directory", "save (median)", "CPU per save", "max",
                              "save with 10-20 (interleaved)", "ratio (median of pairs)", "CPU ratio"], rows)
    m, a = report["machine"], report["all_saves"]
    return "\n".join([
        f"Scale: {report['count']:,} saves of a tiny state (nn.Linear(4, 4) + SGD), keep-all, sync; the "
        f"{report['window']} saves before each mark, each paired with a save into a directory of 10-20.",
        f"Machine: {m['cpu']}, {m['cores']} cores; {m['filesystem']}; torch {m['torch']}; "
        f"load average at start {m['load_average_at_start']}.", "", table, "",
        f"All saves: mean {a['mean'] * 1e3:.2f} ms, max {a['max'] * 1e3:.1f} ms, {a['over_50ms']} over 50 ms. "
        f"Opening the directory of {report['count']:,}: {report['open'] * 1e3:.0f} ms; resuming: "
        f"{report['resume'] * 1e3:.0f} ms. Index files at the end: "
        + ", ".join(f"{k} {v:,} bytes" for k, v in sorted(report["index_files"].items())) + "."])


def main(argv: Optional[List[str]] = None) -> None:
    args = parse(argv)
    report = in_scratch(args.dir, "ckpt-scale-", lambda root: run(args, root))
    publish(args.out, "scale", report, render(report))


if __name__ == "__main__":
    main()
