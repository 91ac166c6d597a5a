"""Preemption across ranks, and save()'s agreement: what the per-call collectives cost.

    python -m benchmarks.preemption [--ranks 2] [--calls 2000] [--saves 50]

With ``preemption=True`` under a process group, every ``should_save()`` (and
``save_if_preempted()``) is one small collective over the rendezvous store, so that a
signal reaching any rank reaches all. This starts ``--ranks`` gloo processes on
127.0.0.1 and times ``--calls`` calls of ``mgr.should_save(step=...)`` on each: with
``preemption=True`` (the agreement), and with ``preemption=False`` (no collective), and
prints the median and 95th percentile per call.

Two more rows: ``save agreement`` times ``--calls`` runs of the one collective that
``save()`` runs on the training thread under ``async_save=True`` (every rank's
arguments and options, :mod:`ckpt.distributed.agreement`; the same rendezvous, the
same payload); ``async save()`` times ``--saves`` whole ``save()`` calls of a small model
with ``async_save=True`` (staging, that agreement, starting the writer; each save
waited for outside the timing). See docs/explanation/distributed.md. Figures only;
nothing is asserted.
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


def _figures(times: List[float]) -> Dict[str, float]:
    times = sorted(times)
    return {"median_us": statistics.median(times) * 1e6, "p95_us": times[int(0.95 * len(times))] * 1e6}


def _agreements(calls: int) -> List[float]:
    """The collective of save() under async_save, alone: its rendezvous, with its payload."""
    from ckpt import policy
    from ckpt.distributed import agreement
    from ckpt.distributed import collective as cl

    ctx = cl.context(timeout=60)
    options = agreement.settings(async_save=True, differential=False, every_steps=None, every_seconds=None,
                                 max_overhead=None, directory="run")
    payload = (None, (agreement.call(0, 0, False, False, policy.RetentionPolicy(keep_last=3), {"loss": 1.0},
                                     options), None))
    times: List[float] = []
    try:
        for _ in range(calls):
            t = time.perf_counter()
            agreement.disagreement([p[1][0] for p in cl.sync(ctx, "save()", timeout=60, payload=payload)])
            times.append(time.perf_counter() - t)
    finally:
        ctx.close()
    return times


def _async_saves(saves: int, directory: str) -> List[float]:
    """Whole save() calls with async_save=True, each waited for outside the timing."""
    from ckpt import CheckpointManager

    times: List[float] = []
    with CheckpointManager(directory, model=torch.nn.Linear(64, 64), async_save=True, keep_last=2,
                           collective_timeout=60) as mgr:
        for epoch in range(saves):
            t = time.perf_counter()
            mgr.save(epoch=epoch)
            times.append(time.perf_counter() - t)
            mgr.wait()
    return times


def _rank(rank: int, world: int, port: int, calls: int, saves: int, directory: str, out: Any) -> None:
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
        figures[f"preemption={preemption}"] = _figures(times)
    figures["save agreement"] = _figures(_agreements(calls))
    figures["async save()"] = _figures(_async_saves(saves, f"{directory}/async"))
    out.put((rank, figures))
    dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--saves", type=int, default=50)
    args = ap.parse_args(argv)
    master = dist.TCPStore("127.0.0.1", 0, args.ranks, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=60))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as directory:
        procs = [ctx.Process(target=_rank, args=(r, args.ranks, master.port, args.calls, args.saves, directory, out))
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
    print(f"per call, {args.ranks} gloo ranks on 127.0.0.1: should_save() and the save agreement {args.calls} "
          f"calls each, async save() {args.saves} calls each")
    for rank in sorted(results):
        for mode, fig in results[rank].items():
            print(f"  rank {rank} {mode:20s} median {fig['median_us']:8.1f} us   p95 {fig['p95_us']:8.1f} us")


if __name__ == "__main__":
    main()
