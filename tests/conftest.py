"""Small shared fixtures: a tiny trainable setup and a directory snapshot helper."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

import pytest
import torch


class Trainables(dict):
    """model / optimizer / scheduler of a tiny MLP; ``step()`` changes all three."""

    def step(self) -> None:
        model, opt = self["model"], self["optimizer"]
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        self["scheduler"].step()

    def weights(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self["model"].state_dict().items()}


def make_trainables(seed: int = 0, hidden: int = 8) -> Trainables:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return Trainables(model=model, optimizer=opt, scheduler=sched)


@pytest.fixture
def trainables() -> Callable[..., Trainables]:
    """Factory: ``trainables(seed=0, hidden=8)`` builds a fresh model/optimizer/scheduler."""
    return make_trainables


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A checkpoint directory that does not exist yet."""
    return tmp_path / "run"


@pytest.fixture
def snapshot() -> Callable[[Path], Dict[str, bytes]]:
    """``snapshot(dir)``: every file name -> bytes, to assert that nothing changed."""
    def take(directory: Path) -> Dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}
    return take
