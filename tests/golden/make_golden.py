"""Write the golden checkpoints of on-disk format version 1 (see docs/explanation/format.md).

    python tests/golden/make_golden.py          # from the repository root; rewrites tests/golden/v1/

Run it only when a *new* format version is introduced, into a new folder: the files under
``v1/`` were written by ckpt 0.2.0 and every later release must restore them exactly
(``tests/test_golden.py``). Every value in them is recomputable from a formula
(:func:`weights`), so the test compares against a recomputation, not against the files.

Cases:
  run/      a plain run with retention (keep_last=2, keep_best=1, keep_every=3) whose
            newest checkpoint is a mid-epoch one with a tracked ResumableSampler
  model.pt  a model file (ckpt.save_model) of a torch-only architecture
  sharded/  an FSDP2 run on 2 CPU ranks (gloo): one sharded ``.dcp`` directory
  differential/  a differential run (chunks of rows, format 2) with retention: the kept
            checkpoints reference a pack of chunks whose first writer was deleted

    python tests/golden/make_golden.py differential   # writes that case only (the others stay)
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
OUT = HERE / "v1"
EPOCHS = 5            # end-of-epoch saves 0..4, then a mid-epoch save in epoch 5
MID_STEP = 57         # the mid-epoch checkpoint's step
SAMPLES, BATCH, CONSUMED = 40, 4, 12   # the sampler's dataset size, batch size, samples served


def weights(module: nn.Module, epoch: int) -> None:
    """Set every parameter to a value that depends only on its shape and ``epoch`` (exact in float32)."""
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            n = p.numel()
            p.copy_((torch.arange(n, dtype=torch.float32) / 64 - i / 8 + epoch / 4).reshape(p.shape))


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def val_loss(epoch: int) -> float:
    return [0.9, 0.4, 0.7, 0.6, 0.8][epoch]


def make_run(out: Path) -> Dict[str, Any]:
    """Epochs 0..4 saved at their end, then a mid-epoch checkpoint; retention keeps a few."""
    from ckpt import CheckpointManager, ResumableSampler

    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sampler = ResumableSampler(SAMPLES, seed=3)
    with CheckpointManager(out, model=model, optimizer=opt, sampler=sampler, keep_last=2, keep_best=1,
                           monitor="val_loss", mode="min", keep_every=3) as mgr:
        for epoch in range(EPOCHS):
            weights(model, epoch)
            mgr.save(epoch=epoch, step=10 * (epoch + 1), metrics={"val_loss": val_loss(epoch)},
                     extra={"note": f"epoch {epoch}", "lr": 0.5})
        weights(model, EPOCHS)
        # one optimizer step with a fixed gradient gives the optimizer a momentum buffer
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.25)
        opt.step()
        sampler.set_epoch(EPOCHS)
        it = iter(sampler)
        served = [next(it) for _ in range(CONSUMED)]
        random.seed(11)
        torch.manual_seed(11)
        mgr.save(epoch=EPOCHS, step=MID_STEP, mid_epoch=True, extra={"note": "mid-epoch"})
        after = {"python": random.random(), "torch": torch.rand(3).tolist()}
        kept = [(r.epoch, r.step) for r in mgr.checkpoints]
    return {"kept": kept, "served": served, "rest": list(it), "after_resume_rng": after,
            "momentum": [p.grad.tolist() for p in model.parameters()]}


def make_model_file(out: Path) -> Dict[str, Any]:
    import ckpt

    model = small_model()
    weights(model, 7)
    ckpt.save_model(model, out)
    return {"epoch_formula": 7}


def _sharded_rank(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ckpt import CheckpointManager

    model = small_model()
    weights(model, 2)
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with CheckpointManager(out, model=model, optimizer=opt, keep_last=1) as mgr:
        mgr.save(epoch=2, step=30, metrics={"val_loss": 0.25}, extra={"world": world})


def make_sharded(out: Path) -> Dict[str, Any]:
    sys.path.insert(0, str(HERE.parent))
    import dist_harness  # tests/dist_harness.py: real processes joined by gloo
    import make_golden  # this file as a module, so that the forkserver can find the rank function

    dist_harness.run(make_golden._sharded_rank, 2, str(out), timeout=120)
    return {"world": 2, "epoch_formula": 2}


#: The rows of the differential case's table changed before each save after the first.
DIFF_ROWS = {1: [1, 2, 3, 4], 2: [100, 101, 102, 103], 3: [200, 201]}
DIFF_EPOCHS = 4


def diff_model() -> nn.Module:
    """A 64 KiB table (the smallest tensor stored out of line) and a small head (inline)."""
    return nn.Sequential(nn.Embedding(256, 64), nn.Linear(64, 2))


def diff_weights(model: nn.Module, epoch: int) -> None:
    """The table and head after the save of ``epoch`` (exact in float32)."""
    weights(model[1], 0)
    table = (torch.arange(256 * 64, dtype=torch.float32) / 64 - 1).reshape(256, 64)
    for e in range(1, epoch + 1):
        table[DIFF_ROWS[e]] = e + torch.arange(64, dtype=torch.float32) / 8
    with torch.no_grad():
        model[0].weight.copy_(table)


def make_differential(out: Path) -> Dict[str, Any]:
    """A differential run with retention: four saves, ``keep_last=2``; the kept two
    reference the pack of chunks epoch 0 wrote (and epoch 2 the one epoch 1 wrote), whose
    own checkpoints retention deleted."""
    from ckpt import CheckpointManager

    model = diff_model()
    with CheckpointManager(out, model=model, keep_last=2, differential=True, progress=False) as mgr:
        first: Any = None
        for epoch in range(DIFF_EPOCHS):
            diff_weights(model, epoch)
            mgr.save(epoch=epoch, metrics={"val_loss": 1.0 / (epoch + 1)}, extra={"note": f"epoch {epoch}"})
            if epoch == 0:
                (first,) = [name for name, _ in mgr.latest.blobs]
        kept = [[r.epoch, r.step] for r in mgr.checkpoints]
        assert all(first in {n for n, _ in r.blobs} for r in mgr.checkpoints)
    return {"kept": kept, "first_pack": first, "rows": {str(e): r for e, r in DIFF_ROWS.items()}}


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    expected = {"format": 1, "written_by": None,
                "run": make_run(OUT / "run"),
                "model": make_model_file(OUT / "model.pt"),
                "sharded": make_sharded(OUT / "sharded"),
                "differential": make_differential(OUT / "differential")}
    import ckpt
    expected["written_by"] = f"ckpt {ckpt.__version__}, torch {torch.__version__}"
    _finish(expected)


def _finish(expected: Dict[str, Any]) -> None:
    for lock in OUT.rglob(".ckpt.lock"):
        lock.unlink()
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {OUT}: {sum(p.stat().st_size for p in OUT.rglob('*') if p.is_file())} bytes")


def main_differential() -> None:
    """Add the differential case to an existing ``v1/`` (the other cases are left as they are)."""
    target = OUT / "differential"
    if target.exists():
        shutil.rmtree(target)
    expected = json.loads((OUT / "expected.json").read_text())
    expected["differential"] = make_differential(target)
    _finish(expected)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    import make_golden as _me

    _me.main_differential() if sys.argv[1:] == ["differential"] else _me.main()
