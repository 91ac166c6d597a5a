"""Damage, quarantine and verification are values (ckpt/verdicts.py); the command line
filters the catalog's warnings by category, never by their text."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from ckpt import CheckpointManager
from ckpt.catalog import Catalog
from ckpt.cli import common
from ckpt.errors import CorruptCheckpointError
from ckpt.storage import LocalStore
from ckpt.verdicts import (
    MissingFilesWarning,
    Quarantine,
    Quarantined,
    Status,
    UnindexedFileWarning,
    Verdict,
)


def test_a_status_is_its_word() -> None:
    assert Status.OK == "ok" and f"{Status.DAMAGED}" == "damaged" and str(Status.MISSING) == "missing"
    assert json.dumps({"status": Status.QUARANTINED}) == '{"status": "quarantined"}'
    assert [s for s in Status if s.bad] == [Status.DAMAGED, Status.MISSING]


def _run(tmp_path: Path, saves: int = 2) -> Path:
    with CheckpointManager(tmp_path, model=torch.nn.Linear(4, 4)) as mgr:
        for epoch in range(saves):
            mgr.save(epoch=epoch)
    return tmp_path


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_returns_verdicts(tmp_path: Path) -> None:
    directory = _run(tmp_path)
    newest = sorted(directory.glob("ckpt-e*.pt"))[-1]
    _damage(newest)
    report = Catalog(LocalStore(directory)).verify()
    assert [type(v) for v in report.values()] == [Verdict, Verdict]
    assert report[newest.name].status is Status.DAMAGED and report[newest.name].detail
    assert CheckpointManager(directory).verify()[newest.name] == "damaged"


def test_quarantine_says_what_it_did(tmp_path: Path) -> None:
    directory = _run(tmp_path)
    cat = Catalog(LocalStore(directory))
    records = cat.scan().records
    newest = records[-1]
    _damage(directory / newest.name)
    done = cat.quarantine(newest, CorruptCheckpointError("damaged", path=directory / newest.name))
    assert done == Quarantine(Quarantined.MOVED, str(directory / (newest.name + ".corrupt")))
    gone = cat.quarantine(newest, CorruptCheckpointError("damaged"))
    assert gone.outcome is Quarantined.GONE
    intact = cat.quarantine(records[0], CorruptCheckpointError("damaged"))
    assert intact.outcome is Quarantined.READS_NOW  # it loads under the lock: left as it is


def test_the_listing_warns_by_category(tmp_path: Path) -> None:
    directory = _run(tmp_path)
    sorted(directory.glob("ckpt-e*.pt"))[0].unlink()
    (directory / "ckpt-e000009-s000000000.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(MissingFilesWarning, match="missing on disk"), \
            pytest.warns(UnindexedFileWarning, match="not listed in the index"):
        Catalog(LocalStore(directory)).scan()


def test_the_command_line_drops_the_categories_it_reports_not_their_text() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with common.quiet():
            warnings.warn("indexed checkpoints missing on disk: ['x']", MissingFilesWarning, stacklevel=1)
            warnings.warn("x: not listed in the index and damaged, ignored", UnindexedFileWarning, stacklevel=1)
            warnings.warn("indexed checkpoints missing on disk (another warning's words)", UserWarning, stacklevel=1)
    assert [(w.category, str(w.message)) for w in caught] == [
        (UserWarning, "indexed checkpoints missing on disk (another warning's words)")]
