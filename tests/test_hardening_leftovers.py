"""Leftovers of the hardening round: a failing map_location and unreadable paths are
typed errors that name the path, and nothing is taken for damage or moved aside."""

from __future__ import annotations

import os

import pytest
import torch

from ckpt import CheckpointManager, StorageError


def test_a_failing_callable_map_location_is_its_own_error_not_damage(run_dir) -> None:
    model = torch.nn.Linear(2, 2)
    with CheckpointManager(run_dir, model=model) as mgr:
        mgr.save(epoch=0)
    before = sorted(os.listdir(run_dir))

    def to_missing_device(storage, location):
        raise TypeError("no such device here")  # before: a TypeError was taken for a damaged file

    with pytest.raises(TypeError, match="no such device here"):
        CheckpointManager(run_dir, model=model, map_location=to_missing_device).resume()
    assert sorted(os.listdir(run_dir)) == before  # nothing quarantined
    assert CheckpointManager(run_dir, model=torch.nn.Linear(2, 2)).resume() == 1  # still restorable


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs /proc")
def test_restoring_an_unreadable_path_is_a_typed_error_naming_it(run_dir) -> None:
    with pytest.raises(StorageError, match="/proc/self/mem"):
        CheckpointManager(run_dir, model=torch.nn.Linear(2, 2)).restore("/proc/self/mem")
