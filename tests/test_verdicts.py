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


# -- the command line formats errors from their fields, never from their text ----------


def test_one_line_is_made_from_the_errors_fields_not_its_text(tmp_path: Path) -> None:
    from ckpt.errors import CollectiveError, StorageError, one_line

    inner = StorageError("disk full", path=tmp_path / "a", hint="free space")
    outer = CollectiveError(f"save() failed on rank 1: {inner}")  # quotes a text with a hint line in it
    assert one_line(outer).startswith(f"save() failed on rank 1: {tmp_path / 'a'}: disk full")
    assert "(hint: free space)" not in one_line(outer)  # the quoted error's hint is not taken for its own
    assert one_line(inner) == f"{tmp_path / 'a'}: disk full (hint: free space)"
    named = StorageError(f"cannot open {tmp_path}", path=tmp_path)  # the message names the path: not twice
    assert one_line(named) == f"cannot open {tmp_path}" and named.lead is None
    assert one_line(ValueError("first\nsecond")) == "first"


def test_a_verdicts_detail_keeps_the_errors_fields(tmp_path: Path) -> None:
    from ckpt.verdicts import Detail

    shown = tmp_path / "ckpt-e000001-s000000000.pt"
    error = CorruptCheckpointError("checksum mismatch", path=shown, hint="resume from another checkpoint")
    detail = Detail.of(error)
    assert detail == str(error) and json.dumps(detail) == json.dumps(str(error))  # the text, for JSON
    assert (detail.lead, detail.what, detail.hint) == (str(shown), "checksum mismatch", error.hint)
    assert common.message(detail, shown) == "checksum mismatch"  # the path the caller shows: left out
    elsewhere = tmp_path / "blob"
    assert common.message(detail, elsewhere) == f"{shown}: checksum mismatch"
    assert common.message("listed in the index, gone from disk", shown) == "listed in the index, gone from disk"
