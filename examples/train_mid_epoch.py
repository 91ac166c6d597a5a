"""A mid-epoch, preemption-aware training loop that resumes exactly. Copy and adapt.

    python examples/train_mid_epoch.py --dir runs/demo       # start, or resume
    kill -TERM <pid>                                          # preempt: saves, exits 143
    python examples/train_mid_epoch.py --dir runs/demo       # continues at the same batch

What makes the continuation bit-exact: seeds set once at the top, deterministic
algorithms, a ResumableSampler instead of shuffle=True, num_workers=0 (see the README
for worker processes), and every stateful object tracked by the manager.
"""

from __future__ import annotations

import argparse
import random
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ckpt import CheckpointManager, ResumableSampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="runs/mid_epoch")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=2000, help="size of the synthetic dataset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--save-every", type=int, default=50, help="optimizer steps between checkpoints")
    args = parser.parse_args()

    # 1. Seed everything once, before building anything; resume() restores the streams later.
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    # 2. Data: the sampler owns the order and the position inside the epoch.
    g = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(args.samples, 20, generator=g),
                            torch.randint(0, 2, (args.samples,), generator=g))
    sampler = ResumableSampler(dataset, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    # 3. Model, optimizer, warmup schedule, mixed precision.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(64, 2)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)

    # 4. Track everything that changes while training; handle SIGTERM/SIGUSR1.
    with CheckpointManager(args.dir, model=model, optimizer=opt, scheduler=sched, scaler=scaler,
                           sampler=sampler, keep_last=3, preemption=True) as mgr:
        start = mgr.resume()  # 0 on a fresh run; the interrupted epoch after a mid-epoch save
        step = mgr.step
        if mgr.resumed:
            print(f"resumed from {mgr.resumed.path.name}: epoch {start}, step {step}, "
                  f"{sampler.remaining} samples left in the epoch")
        for epoch in range(start, args.epochs):
            sampler.set_epoch(epoch)  # continues the interrupted epoch, or starts a new one
            model.train()
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                with torch.autocast(device, dtype=amp_dtype):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                # One call per step: after SIGTERM/SIGUSR1 it saves here and exits (status 143/138).
                mgr.save_if_preempted(epoch=epoch, step=step)
                if step % args.save_every == 0:
                    mgr.save(epoch=epoch, step=step, mid_epoch=True)
            val_loss = evaluate(model, dataset, device)
            mgr.save(epoch=epoch, step=step, metrics={"val_loss": val_loss})  # closes the epoch
            print(f"epoch {epoch}: step {step}, val_loss {val_loss:.4f}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TensorDataset, device: str) -> float:
    """Loss on the first 256 samples (a stand-in for a validation set); no randomness used."""
    model.eval()
    x, y = dataset.tensors[0][:256].to(device), dataset.tensors[1][:256].to(device)
    return torch.nn.functional.cross_entropy(model(x), y).item()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: the manager closed cleanly; every committed checkpoint is kept
        print("interrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)
