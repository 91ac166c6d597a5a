"""CheckpointManager.should_save: the cadence options wired to real saves and resumes."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import List

import pytest
import torch

from ckpt import CheckpointManager, ConfigError


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def run_steps(mgr: CheckpointManager, steps: range, epoch: int = 0) -> List[int]:
    saved = []
    for step in steps:
        if mgr.should_save(step=step):
            mgr.save(epoch=epoch, step=step, mid_epoch=True)
            saved.append(step)
    return saved


def test_every_steps_saves_at_the_multiples_and_the_count_survives_a_restart(tmp_path: Path) -> None:
    uninterrupted = run_steps(CheckpointManager(tmp_path / "a", model=model(), every_steps=4), range(1, 23))
    assert uninterrupted == [4, 8, 12, 16, 20]
    first = CheckpointManager(tmp_path / "b", model=model(), every_steps=4)
    before = run_steps(first, range(1, 11))  # killed after step 10 (last save at step 8)
    first.close()
    again = CheckpointManager(tmp_path / "b", model=model(), every_steps=4)
    assert again.resume() == 0 and again.step == 8  # a mid-epoch checkpoint: epoch 0 continues
    after = run_steps(again, range(again.step + 1, 23))
    assert before + after == uninterrupted


def test_preemption_makes_a_save_due_even_without_cadence(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, model=model(), preemption=[signal.SIGUSR1])
    try:
        assert not mgr.should_save(step=1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mgr.should_save(step=2)
    finally:
        mgr.close()


def test_max_overhead_reports_the_interval_it_chose(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, model=model(), max_overhead=0.5, keep_last=2)
    assert mgr.save_interval is None
    saved = run_steps(mgr, range(1, 60))
    assert saved and mgr.save_interval is not None and mgr.save_interval >= 1
    assert mgr.cadence.save_cost is not None and mgr.cadence.step_time is not None


@pytest.mark.parametrize("kwargs", [{"every_steps": 0}, {"every_steps": True}, {"every_seconds": -1.0},
                                    {"max_overhead": 1.5}, {"max_overhead": 0}])
def test_invalid_cadence_options_raise_before_anything_is_written(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        CheckpointManager(tmp_path / "run", model=model(), **kwargs)
    assert not (tmp_path / "run").exists()
