"""Sharded save at world size 2: ckpt's manager against plain ``dcp.save`` of the same state.

    python benchmarks/sharded.py                     # ~40 MB model (+ AdamW state), 5 rounds
    python benchmarks/sharded.py --mb 200 --rounds 7 --dir /mnt/fast/bench

Two CPU ranks (gloo), an FSDP2-sharded MLP and its AdamW, both methods timed in the
same processes, interleaved round by round (ckpt, dcp, ckpt, dcp, ...), so a noisy
neighbour hits both alike. A round is timed on rank 0 from a barrier before the save
to a barrier after it. ckpt's save is DCP plus what makes it a checkpoint: every
rank's RNG gathered, the plain entries file, a CRC-32 of every file, the manifest,
fsyncs, the rename, the index and retention (keep_last=1). ``dcp.save`` writes (and
fsyncs) the same model and optimizer state into a new directory.
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
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
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
    times: Dict[str, List[float]] = {"ckpt": [], "dcp.save": []}
    for r in range(args.rounds):
        for method in ("ckpt", "dcp.save"):
            dist.barrier()
            start = time.perf_counter()
            if method == "ckpt":
                mgr.save(epoch=r)
            else:
                target = root / "dcp" / f"round{r}"
                state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
                dcp.save(state, checkpoint_id=target)
            dist.barrier()
            times[method].append(time.perf_counter() - start)
            if method == "dcp.save" and rank == 0:
                shutil.rmtree(target)
    size = mgr.latest.size if mgr.latest else 0
    mgr.close()
    if rank == 0:
        out.put({"times": times, "bytes": size, "layers": layers})
    dist.destroy_process_group()


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
    mib = result["bytes"] / 2**20
    print(f"sharded save, world size 2 (gloo, CPU), {result['layers']} x Linear(1024, 1024) + AdamW: "
          f"{mib:.1f} MiB per checkpoint, {args.rounds} interleaved rounds, load {os.getloadavg()[0]:.2f}")
    print(f"{'method':<10} {'median s':>9} {'min s':>7} {'max s':>7} {'MiB/s':>7}")
    for method, ts in result["times"].items():
        med = statistics.median(ts)
        print(f"{method:<10} {med:>9.3f} {min(ts):>7.3f} {max(ts):>7.3f} {mib / med:>7.0f}")
    ratio = statistics.median(result["times"]["ckpt"]) / statistics.median(result["times"]["dcp.save"])
    print(f"ckpt / dcp.save (median): {ratio:.2f}x")


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
