"""DDP training with ckpt under torchrun; kill it at any moment and run it again.

    torchrun --nproc-per-node 2 examples/ddp_train.py                 # CPU, gloo
    torchrun --nproc-per-node 2 examples/ddp_train.py --epochs 8 --dir /tmp/ddp

Every rank runs this same code. ``CheckpointManager`` sees the process group: its
``resume``/``save``/``close`` are collective (every rank calls them, in the same
order), rank 0 writes the one checkpoint file and the index, and each rank gets its
own RNG states back. ``ResumableSampler`` gives each rank its share of every epoch and
continues a mid-epoch checkpoint exactly. Ctrl-C stops every rank cleanly.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

from ckpt import CheckpointManager, ResumableSampler


def make_data(n: int = 512, seed: int = 0) -> TensorDataset:
    """The same synthetic regression data on every rank (the sampler splits it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="runs/ddp-example")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--save-every", type=int, default=4, help="mid-epoch checkpoint every N steps")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # "nccl" on GPUs (and model.to(local_rank))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    # Ctrl-C reaches every rank (torchrun forwards it), each at a different point: a rank must
    # not leave while the others wait for it in a collective. The handler only raises a flag;
    # the ranks agree on it after each step and stop together, saving where they are.
    interrupted = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    torch.manual_seed(0)  # same initial weights; DDP broadcasts rank 0's anyway
    model = DDP(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1000 + rank)  # each rank its own dropout masks; ckpt saves each rank's RNG
    data = make_data()
    sampler = ResumableSampler(data, seed=0)  # num_replicas/rank from the process group
    loader = DataLoader(data, batch_size=32, sampler=sampler)
    mgr = CheckpointManager(args.dir, model=model, optimizer=opt, sampler=sampler, keep_last=2,
                            collective_timeout=60)
    start = mgr.resume()
    if rank == 0:
        print(f"resumed at epoch {start}" if mgr.resumed else "fresh run", flush=True)
    step = mgr.step
    with mgr:
        for epoch in range(start, args.epochs):
            sampler.set_epoch(epoch)
            total = torch.zeros(2)
            for x, y in loader:
                loss = F.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                total += torch.tensor([loss.item() * len(x), len(x)])
                stop = torch.tensor([float(interrupted.is_set())])
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
                if stop.item() or (step % args.save_every == 0 and sampler.remaining):
                    mgr.save(epoch=epoch, step=step, mid_epoch=True)
                if stop.item():
                    if rank == 0:
                        print(f"interrupted at epoch {epoch}, step {step} (saved); run again to resume",
                              flush=True)
                    mgr.close()
                    dist.destroy_process_group()
                    sys.exit(130)
            dist.all_reduce(total)  # retention decides on rank 0's metrics: pass the global value
            mgr.save(epoch=epoch, step=step, metrics={"loss": (total[0] / total[1]).item()})
            if rank == 0:
                print(f"epoch {epoch}: loss {(total[0] / total[1]).item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
