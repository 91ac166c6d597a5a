"""A ckpt error that wraps another (ckpt.errors.wrapped) quotes it without its hint and
carries exactly one hint: its own when it has one, else the wrapped error's. Raised
through the public API on a real run whose tensor file (a differential pack) is damaged."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from helpers import record_data_offset

from ckpt import CheckpointManager
from ckpt.cli import main
from ckpt.errors import CorruptCheckpointError


def _damaged_pack_run(directory: Path) -> str:
    """A differential run of one checkpoint with one bit of its pack's tensor bytes flipped
    (torch still reads it; its checksum fails); the pack's name."""
    with CheckpointManager(directory, model=torch.nn.Linear(256, 256), differential=True, progress=False) as mgr:
        mgr.save(epoch=0)
        pack = sorted(b for b, _ in mgr.checkpoints[0].blobs)[0]
    path = directory / pack
    with zipfile.ZipFile(path) as archive:
        record = next(i.filename for i in archive.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(path.read_bytes())
    data[record_data_offset(path, record) + 1] ^= 0x01
    path.write_bytes(bytes(data))
    return pack


def test_restoring_through_a_damaged_pack_says_one_hint_the_outer_one(tmp_path: Path) -> None:
    pack = _damaged_pack_run(tmp_path)
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(256, 256), progress=False)
    with pytest.raises(CorruptCheckpointError) as caught:
        mgr.restore("latest")
    mgr.close()
    err, inner = caught.value, caught.value.__cause__
    assert isinstance(inner, CorruptCheckpointError) and inner.hint and inner.hint != err.hint
    assert err.what == f"its tensor file {pack} is damaged: {inner.headline()}"  # the inner one, hint left out
    assert err.summary == f"its tensor file {pack} is damaged"
    assert str(err).count("hint:") == 1 and str(err).endswith(f"\n  hint: {err.hint}")
    assert err.hint.startswith("restore an earlier checkpoint"), err.hint


def test_verifying_a_damaged_pack_keeps_the_inner_hint_when_it_has_none(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    pack = _damaged_pack_run(tmp_path)
    with CheckpointManager(tmp_path, model=torch.nn.Linear(256, 256), progress=False) as mgr:
        detail = mgr.catalog.verify()["ckpt-e000000-s000000000.pt"].detail
    assert detail.count("hint:") == 1 and "checksum mismatch (recorded " in detail, detail
    assert detail.endswith("\n  hint: ckpt skips it on resume; restore an earlier checkpoint"), detail
    assert main(["ls", "--verify", str(tmp_path)]) == 1
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ckpt-e000000"))
    assert row.endswith(f"DAMAGED: its tensor file {pack} is damaged"), row  # the wrapper's summary
