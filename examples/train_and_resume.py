"""Train a small CNN with ckpt; kill it at any moment (Ctrl-C, kill -9) and run it again.

    python examples/train_and_resume.py                # checkpoints in runs/example
    python examples/train_and_resume.py --epochs 30 --dir /tmp/run

Each run prints where it starts: a fresh run at epoch 0, or the epoch after the newest
checkpoint that verifies. Retention keeps the 3 newest checkpoints, the 2 best by
validation loss, and every 5th epoch.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from ckpt import CheckpointManager


def make_data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Synthetic 1x16x16 images whose label is the quadrant with the brightest blob."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.5
    y = torch.randint(0, 4, (n,), generator=g)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 1.0
    return torch.utils.data.TensorDataset(x, y)


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            total += nn.functional.cross_entropy(model(x), y, reduction="sum").item()
            count += len(y)
    model.train()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="runs/example", help="checkpoint directory")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    train = torch.utils.data.DataLoader(make_data(2048, seed=1), batch_size=64, shuffle=True)
    val = torch.utils.data.DataLoader(make_data(512, seed=2), batch_size=256)
    model = SmallCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)

    with CheckpointManager(args.dir, model=model, optimizer=optimizer, scheduler=scheduler,
                           keep_last=3, keep_best=2, monitor="val_loss", mode="min",
                           keep_every=5) as mgr:
        start = mgr.resume()
        if mgr.resumed:
            print(f"resumed from {mgr.resumed.path.name}: continuing at epoch {start}", flush=True)
        else:
            print(f"fresh run in {mgr.directory}: starting at epoch 0", flush=True)
        step = mgr.step
        for epoch in range(start, args.epochs):
            for x, y in train:
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
            scheduler.step()
            val_loss = evaluate(model, val)
            record = mgr.save(epoch=epoch, step=step, metrics={"val_loss": val_loss})
            print(f"epoch {epoch}: val_loss {val_loss:.4f}, saved {record.path.name}", flush=True)
        kept = ", ".join(f"{r.epoch}" for r in mgr.checkpoints)
        best = mgr.best
        print(f"done; kept epochs {kept}; best epoch {best.epoch if best else None}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: the manager closed cleanly; every committed checkpoint is kept
        print("interrupted: run the same command again to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)
