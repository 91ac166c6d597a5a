"""PyTorch Lightning with ckpt's CheckpointIO: kill it at any point, run it again, it resumes exactly.

    python examples/lightning_train.py --dir runs/lightning      # start, or resume
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from ckpt.integrations.lightning import CheckpointIO, last_checkpoint


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(32, 1))

    def training_step(self, batch: tuple, _: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="runs/lightning")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--async-save", action="store_true", help="write checkpoints on a background thread")
    args = parser.parse_args()

    pl.seed_everything(0)
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
                                         batch_size=32, shuffle=True)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         plugins=[CheckpointIO(async_save=args.async_save)],
                         callbacks=[ModelCheckpoint(dirpath=args.dir, save_last=True, save_top_k=2,
                                                    monitor="train_loss")])
    start = last_checkpoint(args.dir)  # None on a fresh run; damaged or half-written files are skipped
    print(f"resuming from {start}" if start else "fresh run")
    trainer.fit(Regressor(), loader, ckpt_path=start)
    print(f"done; newest checkpoint {last_checkpoint(args.dir)}")


if __name__ == "__main__":
    main()
