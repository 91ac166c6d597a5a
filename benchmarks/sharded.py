"""Sharded save and resume at world size 2: ckpt's manager against ``dcp.save`` / ``dcp.load``.

    python -m benchmarks.sharded                     # ~40 MB model (+ AdamW state), 5 rounds
    python -m benchmarks.sharded --mb 200 --rounds 7 --dir /mnt/fast/bench

Two CPU ranks (gloo), an FSDP2-sharded MLP and its AdamW, both methods timed in the
same processes, interleaved round by round (ckpt, dcp, ckpt, dcp, ...), so a noisy
neighbour hits both alike. A round is timed on rank 0 from a barrier before the save
to a barrier after it. ckpt's save is DCP plus what makes it a checkpoint: every
rank's RNG gathered, the plain entries file, a CRC-32 of every file, the manifest,
fsyncs, the rename, the index and retention (keep_last=1). ``dcp.save`` writes (and
fsyncs) the same model and optimizer state into a new directory. Then the loads, also
interleaved, the page cache dropped before each: ckpt's ``resume()`` of a fresh manager
(verifying every file's CRC-32, then DCP's resharding load into the live sharded
tensors) against ``dcp.load`` into ``get_state_dict`` plus ``set_state_dict``.
Ratios are given best against best, median against median, and round by round (the
machine may be shared: compare within a round).

The same rounds time the asynchronous saves too: ckpt's manager with ``async_save=True``
(another run directory) against ``dcp.async_save`` (on a gloo group of its own). Their
rows are the stall, what the training loop pays: on rank 0, from a barrier to save()
returning (``dcp.async_save``: to its future being returned); the ``(durable)`` rows run
on to ``wait()`` (the future's result) and a barrier, when the checkpoint is committed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ckpt import CheckpointManager

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    width = 1024
    layers = max(1, int(args.mb * 2**20 / 4 / (width * width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, width)).sum().backward()
    opt.step()  # the optimizer holds its state: 3x the parameters in all
    root = Path(args.dir)
    mgr = CheckpointManager(root / "ckpt", model=model, optimizer=opt, keep_last=1, collective_timeout=600)
    background = CheckpointManager(root / "ckpt-async", model=model, optimizer=opt, keep_last=1,
                                   collective_timeout=600, async_save=True)
    own_group = dist.new_group(backend="gloo")  # dcp.async_save's collectives, beside the barriers
    times: Dict[str, List[float]] = {m: [] for m in ("ckpt save", "dcp.save", "ckpt async", "dcp.async_save",
                                                     "ckpt async (durable)", "dcp.async_save (durable)",
                                                     "ckpt resume", "dcp.load")}
    kept = root / "dcp" / "kept"
    for r in range(args.rounds):
        for method in ("ckpt async", "dcp.async_save"):
            _async_round(method, r, background, model, opt, own_group, root, times)
        for method in ("ckpt save", "dcp.save"):
            dist.barrier()
            start = time.perf_counter()
            if method == "ckpt save":
                mgr.save(epoch=r)
            else:
                target = root / "dcp" / f"round{r}"
                state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
                dcp.save(state, checkpoint_id=target)
            dist.barrier()
            times[method].append(time.perf_counter() - start)
            if method == "dcp.save" and rank == 0:
                if r == args.rounds - 1:
                    target.rename(kept)
                else:
                    shutil.rmtree(target)
    size = mgr.latest.size if mgr.latest else 0
    mgr.close()
    background.close()
    for _ in range(args.rounds):  # loads, interleaved; the page cache dropped before each
        for method in ("ckpt resume", "dcp.load"):
            again = CheckpointManager(root / "ckpt", model=model, optimizer=opt, collective_timeout=600) \
                if method == "ckpt resume" else None
            if rank == 0:
                _drop_cache(root)
            dist.barrier()
            start = time.perf_counter()
            if again is not None:
                again.resume()
            else:
                state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
                dcp.load(state, checkpoint_id=kept)
                set_model_state_dict(model, state["model"])
                set_optimizer_state_dict(model, opt, state["optimizer"])
            dist.barrier()
            times[method].append(time.perf_counter() - start)
            if again is not None:
                again.close()
    if rank == 0:
        out.put({"times": times, "bytes": size, "layers": layers})
    dist.destroy_process_group()


def _async_round(method: str, r: int, mgr: Any, model: Any, opt: Any, group: Any, root: Path,
                 times: Dict[str, List[float]]) -> None:
    """One asynchronous save: its stall, then until it is durable on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    target = root / "dcp-async" / f"round{r}"
    dist.barrier()
    start = time.perf_counter()
    if method == "ckpt async":
        mgr.save(epoch=r)
    else:
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
        future = dcp.async_save(state, checkpoint_id=target, process_group=group)
    times[method].append(time.perf_counter() - start)
    if method == "ckpt async":
        mgr.wait()
    else:
        future.result()
    dist.barrier()
    times[f"{method} (durable)"].append(time.perf_counter() - start)
    if method != "ckpt async" and dist.get_rank() == 0:
        shutil.rmtree(target)


def _drop_cache(root: Path) -> None:
    """posix_fadvise(DONTNEED) on every file under ``root``: the next read comes from the disk."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=40.0, help="model parameters in MiB (float32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    own = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="ckpt-bench-sharded-")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with socket_port() as port:
        procs = [ctx.Process(target=_rank, args=(r, 2, port, args, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        result = out.get(timeout=1800)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
        if own:
            shutil.rmtree(args.dir, ignore_errors=True)
    report(result, args)


def report(result: Dict[str, Any], args: argparse.Namespace) -> None:
    times = result["times"]
    mib = result["bytes"] / 2**20
    print(f"sharded save and resume, world size 2 (gloo, CPU), {result['layers']} x Linear(1024, 1024) + AdamW: "
          f"{mib:.1f} MiB per checkpoint, {args.rounds} interleaved rounds, "
          f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print(f"{'method':<25} {'best s':>7} {'median s':>9} {'max s':>7} {'MiB/s best':>11}")
    for method, ts in times.items():
        print(f"{method:<25} {min(ts):>7.3f} {statistics.median(ts):>9.3f} {max(ts):>7.3f} {mib / min(ts):>11.0f}")
    for ours, theirs in (("ckpt save", "dcp.save"), ("ckpt async", "dcp.async_save"),
                         ("ckpt async", "ckpt save"), ("ckpt resume", "dcp.load")):
        per_round = [a / b for a, b in zip(times[ours], times[theirs])]
        print(f"{ours} / {theirs}: best/best {min(times[ours]) / min(times[theirs]):.2f}x, "
              f"median/median {statistics.median(times[ours]) / statistics.median(times[theirs]):.2f}x, "
              f"per round {' '.join(f'{x:.2f}' for x in per_round)} (median {statistics.median(per_round):.2f}x)")


class socket_port:
    """A free TCP port for the rendezvous store (closed before rank 0 binds it)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
