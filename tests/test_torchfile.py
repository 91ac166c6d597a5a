"""ckpt.fileio: only damage counts as damage.

A load can fail because the *process* is in trouble (out of memory, an I/O error, a
CUDA error) or because the *file* is bad. Only the second may make ``resume()`` skip
and quarantine a checkpoint; the first must reach the caller with every file intact.
"""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt import CheckpointManager, CorruptCheckpointError
from ckpt.format import directread
from ckpt.format import torchfile as fileio


def saved_run(directory: Path) -> CheckpointManager:
    mgr = CheckpointManager(directory, model=torch.nn.Linear(4, 2), progress=False)
    for epoch in range(3):
        mgr.save(epoch=epoch)
    return mgr


def files(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    OSError(errno.EIO, "Input/output error"),
    OSError(errno.EMFILE, "Too many open files"),
], ids=["oom", "cuda-error", "eio", "emfile"])
def test_a_failing_process_is_not_a_damaged_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 error: BaseException) -> None:
    saved_run(tmp_path)
    before = files(tmp_path)

    def failing_load(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(torch, "load", failing_load)
    monkeypatch.setattr(directread, "load", failing_load)  # resume's own reader fails the same way
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2))
    with pytest.raises(type(error)):
        mgr.resume()
    assert files(tmp_path) == before  # nothing renamed *.corrupt, the index untouched
    assert len(mgr.checkpoints) == 3


@pytest.mark.parametrize("damage", ["truncate", "zero", "garbage", "tail"])
def test_damaged_bytes_are_damage(tmp_path: Path, damage: str) -> None:
    path = saved_run(tmp_path).latest.path
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "zero": b"", "garbage": bytes(range(256)) * 8,
                      "tail": data[:-10]}[damage])
    with pytest.raises(CorruptCheckpointError, match=path.name):
        fileio.load(path)  # no recorded checksum: the reader itself must notice


def test_resume_falls_back_and_keeps_the_damaged_bytes(tmp_path: Path) -> None:
    path = saved_run(tmp_path).latest.path
    damaged = path.read_bytes()[:100]
    path.write_bytes(damaged)
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint .*{path.name}"):
        assert mgr.resume() == 2
    assert path.with_name(path.name + ".corrupt").read_bytes() == damaged
    assert not path.exists() and [r.epoch for r in mgr.checkpoints] == [0, 1]


def test_a_damaged_unindexed_file_is_moved_aside_by_the_next_save(tmp_path: Path) -> None:
    """Without an index entry a file is read on every scan; a damaged one would be read
    (and warned about) on every save, so the writer moves it out of the namespace once."""
    mgr = saved_run(tmp_path)
    stray = tmp_path / "ckpt-e000009-s000000000.pt"
    stray.write_bytes(mgr.latest.path.read_bytes()[:200])  # a torn copy the index never listed
    with pytest.warns(UserWarning, match="not listed in the index and damaged"):
        mgr.save(epoch=3)
    assert not stray.exists() and stray.with_name(stray.name + ".corrupt").exists()
    assert [r.epoch for r in mgr.checkpoints] == [0, 1, 2, 3]


def test_a_few_junk_bytes_are_damage_not_a_crash(tmp_path: Path) -> None:
    """A short non-zip file sends torch down its legacy reader, which fails with struct.error."""
    junk = tmp_path / "ckpt-e000001-s000000001.pt"
    junk.write_bytes(b"junk")
    with pytest.raises(CorruptCheckpointError):
        fileio.load(junk)


# -- compressed records are refused unread (issue 11 item 7) ------------------------------

def _recompress(path: Path, inflated: int) -> None:
    """Rewrite ``path`` with one large zero-filled record, deflated (a zip bomb in miniature)."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        records = [(info, archive.read(info)) for info in archive.infolist()]
    big = next(info for info, data in records if "/data/" in info.filename)
    with zipfile.ZipFile(path, "w") as out:
        for info, data in records:
            if info is big:
                out.writestr(info.filename, bytes(inflated), compress_type=zipfile.ZIP_DEFLATED)
            else:
                out.writestr(info, data)


def test_a_compressed_record_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    run = tmp_path / "run"
    mgr = CheckpointManager(run, model=torch.nn.Linear(4, 2))
    mgr.save(epoch=0)
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(mgr.latest.path.read_bytes())
    _recompress(bomb, 64 << 20)  # 64 MiB of zeros in ~64 kB
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(CorruptCheckpointError, match="compressed"):
        mgr.restore(bomb)
    (run / "ckpt-e000005-s000000000.pt").write_bytes(bomb.read_bytes())
    with pytest.warns(UserWarning):
        listed = CheckpointManager(run, model=torch.nn.Linear(4, 2)).checkpoints
    assert [r.epoch for r in listed] == [0]


# -- classified by the bytes, never by torch's message (the class of issue 11 item 1) ------

@pytest.mark.parametrize("payload", [b"(ibuiltins\nprint\n.", b"\x82\x01."], ids=["INST", "EXT1"])
def test_an_intact_file_that_weights_only_refuses_is_unsafe_not_damaged(tmp_path: Path, payload: bytes) -> None:
    import zipfile
    run = tmp_path / "run"
    mgr = CheckpointManager(run, model=torch.nn.Linear(4, 2))
    path = mgr.save(epoch=0).path
    with zipfile.ZipFile(path) as archive:
        records = [(info, archive.read(info)) for info in archive.infolist()]
    crafted = tmp_path / "crafted.pt"
    with zipfile.ZipFile(crafted, "w") as out:  # intact archive (fresh CRCs), a pickle refused without "GLOBAL"
        for info, data in records:
            out.writestr(info, payload if info.filename.endswith("data.pkl") else data)
    with pytest.raises(ckpt.UnsafeCheckpointError):
        mgr.restore(crafted)
    assert crafted.is_file() and not list(tmp_path.rglob("*.corrupt*"))


def test_a_fifo_in_place_of_a_checkpoint_file_is_refused_without_blocking(tmp_path: Path) -> None:
    # the index's FIFO case (issue 11 item 10) for the checkpoint files themselves; in a child,
    # so that a regression hangs one process with a deadline, not the suite
    code = """
import os, sys, warnings, torch
from ckpt import CheckpointManager
mgr = CheckpointManager(sys.argv[1], model=torch.nn.Linear(4, 2))
mgr.save(epoch=0)
record = mgr.save(epoch=1)
record.path.unlink()
os.mkfifo(record.path)  # a writer replaced it by a FIFO after the reader listed it
try:
    mgr.restore(record)
except Exception as e:
    print(type(e).__name__)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    print(CheckpointManager(sys.argv[1], model=torch.nn.Linear(4, 2)).resume())
"""
    source = str(Path(ckpt.__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=source, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["CorruptCheckpointError", "1"]
