"""torchdata's StatefulDataLoader (num_workers=2) tracked by CheckpointManager: exact mid-epoch resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("torchdata.stateful_dataloader")

import trainer_runs  # noqa: E402
from helpers import same_weights  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

from ckpt import CheckpointManager  # noqa: E402
from ckpt.errors import StateMismatchError  # noqa: E402


@pytest.mark.slow
def test_killed_mid_epoch_resumes_bit_exact_without_generator(tmp_path: Path) -> None:
    run, full = tmp_path / "run", tmp_path / "full.pt"
    # one launch: the uninterrupted run, then the one killed after step 15 (inside epoch 1 of 12 steps)
    trainer_runs.run_and_kill("torchdata", run, lambda d: full.exists() and trainer_runs.saves(d) >= 3,
                              "--full", str(full))
    trainer_runs.run("torchdata", run, tmp_path / "resumed.pt", "--resume")
    assert same_weights(torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "full.pt"))


def test_num_workers_mismatch_names_both(tmp_path: Path) -> None:
    data = trainer_runs.data(16)
    loader = StatefulDataLoader(data, batch_size=4, num_workers=2)
    it = iter(loader)
    next(it)
    with CheckpointManager(tmp_path, loader=loader) as mgr:
        mgr.save(epoch=0, step=1, mid_epoch=True)
    del it
    other = StatefulDataLoader(data, batch_size=4, num_workers=0)
    with CheckpointManager(tmp_path, loader=other) as mgr:
        with pytest.raises(StateMismatchError, match=r"num_workers=2(.|\n)*num_workers=0"):
            mgr.restore("latest")
