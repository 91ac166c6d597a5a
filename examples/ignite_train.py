"""pytorch-ignite with ckpt's CkptSaver: atomic, checksummed checkpoints and an exact resume.

    python examples/ignite_train.py --dir runs/ignite      # start, or resume
"""

from __future__ import annotations

import argparse

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, global_step_from_engine

from ckpt.integrations.ignite import CkptSaver, RNGState, last_checkpoint, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="runs/ignite")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
                                         batch_size=32, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(engine: Engine, batch: tuple) -> float:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        opt.step()
        return loss.item()

    trainer = Engine(step)
    to_save = {"model": model, "optimizer": opt, "trainer": trainer, "rng": RNGState()}  # RNGState: exact resume
    trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(
        to_save, CkptSaver(args.dir), n_saved=2, global_step_transform=global_step_from_engine(trainer)))
    start = last_checkpoint(args.dir)
    if start:
        Checkpoint.load_objects(to_load=to_save, checkpoint=load(start))  # verified before it is unpickled
    print(f"resuming from {start}" if start else "fresh run")
    trainer.run(loader, max_epochs=args.epochs)
    print(f"done at epoch {trainer.state.epoch}; newest checkpoint {last_checkpoint(args.dir)}")


if __name__ == "__main__":
    main()
