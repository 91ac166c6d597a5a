"""ckpt.format.torchio: plain torch files, and a checkpoint's ``extra`` read from its pickle alone."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from ckpt import CheckpointManager
from ckpt.errors import CorruptCheckpointError
from ckpt.format import torchio


def _record_offset(path: Path, suffix: str) -> tuple[int, int]:
    """(data offset, size) of the zip record whose name ends with ``suffix``."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _saved(run_dir: Path, extra: dict) -> Path:
    model = torch.nn.Linear(64, 64)
    with CheckpointManager(run_dir, model=model) as mgr:
        rec = mgr.save(epoch=0, extra=extra)
    return Path(rec.path)


def test_extra_is_read_without_the_tensors(run_dir: Path) -> None:
    path = _saved(run_dir, {"lr": 0.5, "tag": "a"})
    offset, size = _record_offset(path, "data/0")  # the first tensor's bytes
    assert size > 0
    _flip(path, offset)  # damage no read of the pickle alone can see
    assert torchio.read_extra(path) == {"lr": 0.5, "tag": "a"}
    assert CheckpointManager(run_dir, model=torch.nn.Linear(64, 64)).checkpoints[0].extra == {"lr": 0.5, "tag": "a"}


def test_extra_never_loads_the_file(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _saved(run_dir, {"lr": 0.5})

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("record.extra loaded the whole file")
    monkeypatch.setattr(torch, "load", refuse)
    assert CheckpointManager(run_dir, model=torch.nn.Linear(64, 64)).checkpoints[0].extra == {"lr": 0.5}


def test_a_damaged_pickle_is_damage(run_dir: Path) -> None:
    path = _saved(run_dir, {"lr": 0.5})
    offset, size = _record_offset(path, "data.pkl")
    _flip(path, offset + size // 2)
    with pytest.raises(CorruptCheckpointError):
        torchio.read_extra(path)


def test_an_extra_holding_tensors_is_loaded_whole(run_dir: Path) -> None:
    path = _saved(run_dir, {"ids": torch.arange(5), "lr": 0.1})
    extra = torchio.read_extra(path)
    assert extra["lr"] == 0.1 and torch.equal(extra["ids"], torch.arange(5))
    assert extra["ids"].device.type == "cpu"


def test_plain_save_and_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    with open(path, "wb") as f:
        torchio.save({"w": torch.ones(3)}, f)
    assert torch.equal(torchio.load(path)["w"], torch.ones(3))
    assert torchio.read_extra(path) == {}
