"""Catalog: what a run directory holds is what its files say, under their own names.

Issue 11 items 2 (a record's key and its file name agree, or the file is not adopted),
3 (a file that fails to load is only moved aside if it still fails under the lock),
4 (a file gone meanwhile is not damage) and 5 (a planted file with bad fields is skipped
with a warning, the directory still opens). The two-process versions of 3 and 4 are in
``test_races.py``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch

from ckpt import CheckpointManager
from ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError

INDEX = "ckpt-index.json"


def name(epoch: int, step: int = 0) -> str:
    return f"ckpt-e{epoch:06d}-s{step:09d}.pt"


def model() -> torch.nn.Module:
    return torch.nn.Linear(4, 2)


# -- 2: the key and the name agree ------------------------------------------------------

def test_a_renamed_file_is_not_adopted_and_the_next_save_survives_retention(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, model=model(), keep_last=1) as mgr:
        mgr.save(epoch=0)
    (tmp_path / name(0)).rename(tmp_path / name(3))  # holds epoch 0 under epoch 3's name
    (tmp_path / INDEX).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = CheckpointManager(tmp_path, model=model(), keep_last=1)
    assert all(r.path.name == name(r.epoch, r.step) for r in mgr.checkpoints)
    saved = mgr.save(epoch=3)
    assert saved.path.is_file(), "retention deleted the checkpoint save() just wrote"
    assert [r.key for r in mgr.refresh()] == [(3, 0)]
    assert CheckpointManager(tmp_path, model=model()).resume() == 4


@pytest.mark.parametrize("edit", ["epoch", "file"])
def test_an_index_entry_whose_name_and_key_differ_is_not_trusted(tmp_path: Path, edit: str) -> None:
    with CheckpointManager(tmp_path, model=model(), keep_last=2) as mgr:
        mgr.save(epoch=0)
        mgr.save(epoch=1)
    entries = json.loads((tmp_path / INDEX).read_text())
    entry = next(e for e in entries["checkpoints"] if e["file"] == name(0))
    if edit == "epoch":
        entry["epoch"] = 2  # a stale/hand-edited entry: file e0 listed as epoch 2
    else:
        (tmp_path / name(0)).rename(tmp_path / name(2))  # renamed with its entry
        entry["file"] = name(2)
    (tmp_path / INDEX).write_text(json.dumps(entries))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = CheckpointManager(tmp_path, model=model(), keep_last=2)
        assert all(r.path.name == name(r.epoch, r.step) for r in mgr.checkpoints)
        saved = mgr.save(epoch=2)
    assert saved.path.is_file(), "retention deleted the checkpoint save() just wrote"
    assert torch.load(saved.path, weights_only=True)["epoch"] == 2
    assert [r.key for r in mgr.refresh()] == [(1, 0), (2, 0)]


# -- 3 and 4, in one process: a stale record is not evidence of damage --------------------

def test_resume_with_a_stale_record_of_a_replaced_file_quarantines_nothing(tmp_path: Path) -> None:
    reader = CheckpointManager(tmp_path, model=model())
    writer = CheckpointManager(tmp_path, model=model())
    writer.save(epoch=0)
    stale = reader.refresh()[0]
    writer.save(epoch=0, overwrite=True)  # new bytes, new checksum: the reader's record is stale
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            reader.restore(stale)
        except (CorruptCheckpointError, CheckpointNotFoundError):
            pass  # refusing the stale record is fine; moving the good file aside is not
    assert (tmp_path / name(0)).is_file() and not list(tmp_path.glob("*.corrupt*"))
    assert CheckpointManager(tmp_path, model=model()).resume() == 1


def test_restoring_a_record_whose_file_is_gone_is_not_found_not_a_raw_error(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, model=model())
    gone = mgr.save(epoch=0)
    mgr.save(epoch=1)
    gone.path.unlink()  # a concurrent writer's retention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FileNotFoundError):
            mgr.restore(gone)
        assert mgr.verify() in ({name(1): "ok"}, {name(0): "missing", name(1): "ok"})
        assert mgr.resume() == 2


# -- 5: a planted file with bad fields is skipped, the directory opens --------------------

def _plant(directory: Path, change: Callable[[Dict[str, Any]], None]) -> Path:
    obj = torch.load(directory / name(0), weights_only=True)
    obj["epoch"] = 7
    change(obj)
    path = directory / name(7)
    torch.save(obj, path)
    return path


BAD_FIELDS: Dict[str, Callable[[Dict[str, Any]], None]] = {
    "no epoch": lambda o: o.pop("epoch"),
    "epoch three": lambda o: o.update(epoch="three"),
    "metrics a list": lambda o: o.update(metrics=[0.5]),
    "metric 10**400": lambda o: o.update(metrics={"loss": 10 ** 400}),
    "created yesterday": lambda o: o["ckpt"].update(created="yesterday"),
    "created inf": lambda o: o["ckpt"].update(created=float("inf")),
    "mid_epoch no": lambda o: o["ckpt"].update(mid_epoch="no"),
    "objects a string": lambda o: o["ckpt"].update(objects="model"),
}


@pytest.mark.parametrize("bad", list(BAD_FIELDS))
def test_a_planted_file_with_bad_fields_is_skipped_with_a_warning(tmp_path: Path, bad: str) -> None:
    with CheckpointManager(tmp_path, model=model()) as mgr:
        mgr.save(epoch=0, metrics={"loss": 1.0})
        mgr.save(epoch=1, metrics={"loss": 0.5})
    planted = _plant(tmp_path, BAD_FIELDS[bad])
    (tmp_path / INDEX).unlink()  # the next open must read every file
    with pytest.warns(UserWarning, match=planted.name):
        mgr = CheckpointManager(tmp_path, model=model())
    assert [r.key for r in mgr.checkpoints] == [(0, 0), (1, 0)]
    assert mgr.resume() == 2
