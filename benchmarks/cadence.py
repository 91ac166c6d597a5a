"""Save cadence: does ``max_overhead`` hold the checkpoint overhead at the target?

    python -m benchmarks.cadence --dir /work/benchtmp [--mib 100] [--target 0.05] [--seconds 15]

A loop over a ~100 MB state (Linear layers + SGD) whose step is `--step` seconds of
accelerator time (a sleep: the host is free, as when a GPU computes) and a small host
update, asking ``mgr.should_save(step=...)`` every step, with
``CheckpointManager(max_overhead=target)``; sync and async saves. The same loop without
checkpoints runs in the same round (order rotating), and the overhead is
(time with checkpoints - time without) / time without, for the same number of steps.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ckpt import CheckpointManager

from ._results import in_scratch, parse_args, parser, publish


def model(mib: int) -> torch.nn.Module:
    width = 2048
    layers = max(1, (mib << 20) // (width * width * 4))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


def loop(directory: Optional[Path], mib: int, step_s: float, steps: int, target: float,
         async_save: bool) -> Dict[str, Any]:
    net = model(mib)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    mgr = (CheckpointManager(directory, model=net, optimizer=opt, keep_last=2, max_overhead=target,
                             async_save=async_save, progress=False) if directory is not None else None)
    saves = 0
    start = time.perf_counter()
    for step in range(1, steps + 1):
        time.sleep(step_s)  # the accelerator's share of the step
        with torch.no_grad():
            net[0].weight[step % 2048].add_(1e-3)  # the host's share: a small update
        if mgr is not None and mgr.should_save(step=step):
            mgr.save(epoch=0, step=step, mid_epoch=True)
            saves += 1
    if mgr is not None:
        mgr.wait()
    elapsed = time.perf_counter() - start
    out = {"seconds": elapsed, "saves": saves}
    if mgr is not None:
        out["interval"] = mgr.save_interval
        out["cost"] = mgr.cadence.save_cost
        mgr.close()
    return out


def main(argv: Optional[List[str]] = None) -> None:
    p = parser("cadence", __doc__)
    p.add_argument("--mib", type=int, default=100, help="state size in MiB (default 100)")
    p.add_argument("--target", type=float, default=0.05, help="max_overhead (default 0.05)")
    p.add_argument("--steps", default="0.02,0.05,0.1", help="step times in seconds (default 0.02,0.05,0.1)")
    p.add_argument("--seconds", type=float, default=15.0, help="length of each run (default 15 s)")
    p.add_argument("--rounds", type=int, default=1, help="rounds (default 1)")
    args = parse_args(p, argv)
    step_times = [float(x) for x in args.steps.split(",")]

    def measure(root: Path) -> Dict[str, Any]:
        rows: Dict[str, List[Dict[str, Any]]] = {}
        for r in range(args.rounds):
            for step_s in step_times:
                steps = max(10, int(args.seconds / step_s))
                modes = ["none", "sync", "async"]
                modes = modes[r % 3:] + modes[:r % 3]
                for mode in modes:
                    where = None if mode == "none" else root / f"{mode}-{step_s}-{r}"
                    rows.setdefault(f"{step_s}/{mode}", []).append(
                        loop(where, args.mib, step_s, steps, args.target, mode == "async"))
        return {"args": vars(args), "rows": rows}

    report = in_scratch(args.dir, "ckpt-cadence-", measure)
    lines = [f"state {args.mib} MiB, max_overhead={args.target}, {args.seconds:.0f} s per run, "
             f"{args.rounds} round(s); medians",
             "",
             "| step time | mode | saves made | interval chosen (steps) | save cost (s) | overhead |",
             "|---|---|---|---|---|---|"]
    for step_s in step_times:
        base = statistics.median(r["seconds"] for r in report["rows"][f"{step_s}/none"])
        for mode in ("sync", "async"):
            runs = report["rows"][f"{step_s}/{mode}"]
            over = statistics.median((r["seconds"] - base) / base for r in runs)
            lines.append(f"| {step_s * 1000:.0f} ms | {mode} | {statistics.median(r['saves'] for r in runs):.0f} "
                         f"| {runs[-1]['interval']} | {statistics.median(r['cost'] or 0 for r in runs):.3f} "
                         f"| {100 * over:+.1f} % |")
    publish(args.out, "cadence", report, "\n".join(lines))


if __name__ == "__main__":
    main()
