"""A small run for trying the command line (docs/cli.md): ``python examples/cli_demo_run.py runs/exp1``.

It trains a tiny regression model for 30 epochs, saving every epoch with
``keep_last=3, keep_best=2, keep_every=10``, so the directory holds a few kept
checkpoints while ``ckpt-history.jsonl`` holds all 30 saves.
"""

from __future__ import annotations

import math
import sys

import torch

from ckpt import CheckpointManager


def main(directory: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    mgr = CheckpointManager(directory, model=model, optimizer=opt, keep_last=3, keep_best=2,
                            monitor="val_loss", keep_every=10)
    x_val = torch.randn(256, 8)
    y_val = x_val.sum(1, keepdim=True).sin()
    for epoch in range(30):
        if epoch == 20:
            for group in opt.param_groups:
                group["lr"] = 0.002
        for _ in range(20):
            x = torch.randn(64, 8)
            loss = (model(x) - x.sum(1, keepdim=True).sin()).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            val = (model(x_val) - y_val).pow(2).mean().item() + 0.02 * math.sin(epoch)
        mgr.save(epoch=epoch, step=20 * (epoch + 1), metrics={"val_loss": val, "train_loss": loss.item()},
                 extra={"data": "synthetic sin(sum(x))"})
    mgr.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/exp1")
