"""FSDP2 training checkpointed to S3, sharded, with a local cache per machine; runs on CPU.

    python -m moto.server -p 9000 &                      # a local S3 (pip install 'moto[server]')
    torchrun --nproc-per-node 2 examples/fsdp2_s3.py --endpoint http://127.0.0.1:9000
    # two machines (here both on 127.0.0.1), each with its own cache:
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --rdzv-backend c10d \\
        --rdzv-endpoint 127.0.0.1:29400 examples/fsdp2_s3.py --endpoint ... --cache-dir /tmp/node0
    torchrun --nnodes 2 --node-rank 1 ... --cache-dir /tmp/node1

Every rank runs this code. The model is sharded with ``fully_shard`` (FSDP2, gloo on
CPU), so each checkpoint is a directory written by every rank: each rank's shards go to
its machine's ``--cache-dir`` first (a save never waits on S3) and then up to the store
in the background; rank 0 writes the commit record once every rank's files are up.
``close()`` returns once everything is committed on S3: delete the caches, or run on
other machines, and the run resumes from the store, resharded to the new world size.
Without ``--endpoint`` the AWS defaults apply (a real bucket; credentials from the
environment).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckpt import CheckpointManager


def build(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)  # after fully_shard


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, epoch: int, rank: int) -> float:
    gen = torch.Generator().manual_seed(1000 * epoch + rank)  # each rank its own batches
    total = 0.0
    for _ in range(4):
        x = torch.randn(8, 16, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
    return total / 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="s3://ckpt-example/runs/fsdp2")
    parser.add_argument("--endpoint", default=None, help="an S3-compatible endpoint (moto, MinIO)")
    parser.add_argument("--cache-dir", default=None, help="this machine's local tier (optional)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default=None, help="rank 0 writes the final full state here")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    options = {}
    if args.endpoint:  # a local test server: any credentials do
        options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": args.endpoint}}
        if rank == 0:
            _make_bucket(args.url, options)
        dist.barrier()
    model, opt = build(world)
    with CheckpointManager(args.url, model=model, optimizer=opt, keep_last=2, storage_options=options,
                           cache_dir=args.cache_dir, collective_timeout=120) as mgr:
        start = mgr.resume()
        if rank == 0:
            print(f"resumed at epoch {start} on {world} ranks" if mgr.resumed else "fresh run", flush=True)
        for epoch in range(start, args.epochs):
            loss = train_epoch(model, opt, epoch, rank)
            mgr.save(epoch=epoch, metrics={"loss": loss})
            if rank == 0:
                print(f"epoch {epoch}: loss {loss:.4f}", flush=True)
    if args.out:
        _write_full(model, opt, args.out, rank)
    dist.destroy_process_group()


def _make_bucket(url: str, options: dict) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    bucket = url[len("s3://"):].split("/")[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)


def _write_full(model: nn.Module, opt: torch.optim.Optimizer, out: str, rank: int) -> None:
    """The whole model and optimizer state, gathered on rank 0 (collective)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"model": get_model_state_dict(model, options=options),
             "optimizer": get_optimizer_state_dict(model, opt, options=options)}
    if rank == 0:
        torch.save(state, out)


if __name__ == "__main__":
    main()
