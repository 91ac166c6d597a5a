"""Hugging Face Accelerate: track the prepared objects with CheckpointManager; resumes mid-epoch exactly.

    python examples/accelerate_train.py --dir runs/accelerate      # start, or resume
    accelerate launch --num_processes 2 examples/accelerate_train.py   # the same code on 2 processes
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from ckpt import CheckpointManager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="runs/accelerate")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--save-every", type=int, default=5, help="steps between mid-epoch checkpoints")
    args = parser.parse_args()

    torch.manual_seed(0)
    # a stateful loader (its position inside the epoch) and a seedable sampler (its order): exact mid-epoch resume
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True,
                                                                        use_seedable_sampler=True))
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
                                         batch_size=32, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)

    with CheckpointManager(args.dir, model=model, optimizer=opt, scheduler=sched, loader=loader,
                           keep_last=2) as mgr:
        start = mgr.resume()
        step = mgr.step
        print(f"resuming at epoch {start}, step {step}" if mgr.resumed else "fresh run")
        for epoch in range(start, args.epochs):
            for xb, yb in loader:
                opt.zero_grad()
                accelerator.backward(torch.nn.functional.mse_loss(model(xb), yb))
                opt.step()
                sched.step()
                step += 1
                if step % args.save_every == 0:
                    mgr.save(epoch=epoch, step=step, mid_epoch=True)
            mgr.save(epoch=epoch, step=step)
        print(f"done; kept {[r.path.name for r in mgr.checkpoints]}")


if __name__ == "__main__":
    main()
