"""Preemption across ranks: what the per-call agreement costs.

    python -m benchmarks.preemption [--ranks 2] [--calls 2000]

With ``preemption=True`` under a process group, every ``should_save()`` (and
``save_if_preempted()``) is one small collective over the rendezvous store, so that a
signal reaching any rank reaches all. This starts ``--ranks`` gloo processes on
127.0.0.1 and times ``--calls`` calls of ``mgr.should_save(step=...)`` on each: with
``preemption=True`` (the agreement), and with ``preemption=False`` (no collective), and
prints the median and 95th percentile per call. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, port: int, calls: int, directory: str, out: Any) -> None:
    from ckpt import CheckpointManager

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    figures: Dict[str, Dict[str, float]] = {}
    for preemption in (False, True):
        with CheckpointManager(f"{directory}/{preemption}", model=torch.nn.Linear(2, 2), preemption=preemption,
                               collective_timeout=60) as mgr:
            times: List[float] = []
            for step in range(calls):
                t = time.perf_counter()
                mgr.should_save(step=step)
                times.append(time.perf_counter() - t)
        times.sort()
        figures[f"preemption={preemption}"] = {"median_us": statistics.median(times) * 1e6,
                                               "p95_us": times[int(0.95 * len(times))] * 1e6}
    out.put((rank, figures))
    dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    master = dist.TCPStore("127.0.0.1", 0, args.ranks, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=60))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as directory:
        procs = [ctx.Process(target=_rank, args=(r, args.ranks, master.port, args.calls, directory, out))
                 for r in range(args.ranks)]
        for p in procs:
            p.start()
        try:
            results = dict(out.get(timeout=300) for _ in procs)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()
    print(f"should_save() per call, {args.ranks} gloo ranks on 127.0.0.1, {args.calls} calls each")
    for rank in sorted(results):
        for mode, fig in results[rank].items():
            print(f"  rank {rank} {mode:18s} median {fig['median_us']:8.1f} us   p95 {fig['p95_us']:8.1f} us")


if __name__ == "__main__":
    main()
