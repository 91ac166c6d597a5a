"""Real failures, not mocks: a full disk, a read-only mount, files damaged, deleted or
replaced behind the manager's back, torn indexes, and files from other format versions.

The disk-full and read-only tests mount a small tmpfs, which needs root (as in CI
containers); elsewhere they skip with the reason.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import warnings
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
import torch
from helpers import snapshot, temporaries

from ckpt import CheckpointManager, CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError, StorageError
from ckpt import schema as format
from ckpt.catalog import index
from ckpt.catalog.catalog import QUARANTINE_SUFFIX
from ckpt.format import torchfile as fileio
from ckpt.io.checksum import file_checksum

PAGE = 4096


def make_manager(directory: Path, **options) -> CheckpointManager:
    model = torch.nn.Linear(64, 64)
    return CheckpointManager(directory, model=model, progress=False, **options)


def save_epochs(mgr: CheckpointManager, epochs: range) -> None:
    """Each epoch's weights are filled with the epoch number, so a load shows which it was."""
    model = mgr.trackables["model"]
    for epoch in epochs:
        with torch.no_grad():
            model.weight.fill_(epoch)
        mgr.save(epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)}, extra={"epoch": epoch})


def weights_epoch(mgr: CheckpointManager) -> float:
    return float(mgr.trackables["model"].weight.detach()[0, 0])


def name(epoch: int) -> str:
    return format.file_name(epoch, 0)


# -- a real full disk and a real read-only file system ----------------------------

@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount small tmpfs file systems (root only); unmounted afterwards."""
    mounted: List[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def remount(point: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True)


def fill(point: Path, leave: int) -> Path:
    """Fill the file system, then free exactly ``leave`` bytes (whole pages)."""
    filler = point / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\xff" * (1 << 20))
        except OSError as e:
            assert e.errno == errno.ENOSPC
    size = filler.stat().st_size // PAGE * PAGE
    os.truncate(filler, size - leave)
    stats = os.statvfs(point)
    assert stats.f_bavail * stats.f_frsize == leave, "tmpfs did not free the pages expected"
    return filler


def test_disk_full_while_writing_the_checkpoint(tmpfs: Callable[[str], Path]) -> None:
    point = tmpfs("4m")
    directory = point / "run"
    mgr = make_manager(directory, keep_last=1)
    save_epochs(mgr, range(2))
    before = snapshot(directory)
    filler = fill(point, leave=PAGE * 2)  # less than one checkpoint
    with pytest.raises(StorageError) as info:
        save_epochs(mgr, range(2, 3))
    error = info.value
    assert error.errno == errno.ENOSPC and isinstance(error.__cause__, OSError)
    assert "No space left" in str(error) and "disk is full" in str(error) and name(2) in str(error)
    assert temporaries(directory) == [] and snapshot(directory) == before  # keep_last=1 deleted nothing
    filler.unlink()
    save_epochs(mgr, range(2, 3))  # the next save works
    fresh = make_manager(directory, keep_last=1)
    assert fresh.resume() == 3 and weights_epoch(fresh) == 2
    assert fresh.verify() == {name(2): "ok"}


def test_disk_full_while_writing_the_index(tmpfs: Callable[[str], Path]) -> None:
    """Room for the checkpoint but not for the index: the checkpoint must not stay behind."""
    point = tmpfs("4m")
    directory = point / "run"
    mgr = make_manager(directory)
    save_epochs(mgr, range(2))
    before = snapshot(directory)
    pages = -(-(directory / name(1)).stat().st_size // PAGE)
    filler = fill(point, leave=pages * PAGE)
    with pytest.raises(StorageError, match="updating the index failed") as info:
        save_epochs(mgr, range(2, 3))
    assert info.value.errno == errno.ENOSPC and "disk is full" in str(info.value)
    assert temporaries(directory) == [] and snapshot(directory) == before
    filler.unlink()
    save_epochs(mgr, range(2, 3))
    assert make_manager(directory).resume() == 3


def test_read_only_file_system(tmpfs: Callable[[str], Path]) -> None:
    point = tmpfs("8m")
    directory = point / "run"
    mgr = make_manager(directory)
    save_epochs(mgr, range(2))
    before = snapshot(directory)
    remount(point, "ro")
    try:
        with pytest.raises(StorageError) as info:
            save_epochs(mgr, range(2, 3))
        assert info.value.errno == errno.EROFS and "read-only" in str(info.value).lower()
        assert str(directory) in str(info.value)
        assert snapshot(directory) == before
        assert mgr.resume() == 2 and weights_epoch(mgr) == 1  # reading needs no write access
        assert set(mgr.verify().values()) == {"ok"}
        with pytest.raises(StorageError, match="Read-only"):  # a new manager says so at once
            make_manager(directory)
    finally:
        remount(point, "rw")
    save_epochs(mgr, range(2, 3))
    assert make_manager(directory).resume() == 3


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root ignores directory permissions (the read-only mount test covers it)")
def test_unwritable_directory_raises_permission_error(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    mgr = make_manager(directory)
    save_epochs(mgr, range(1))
    before = snapshot(directory)
    directory.chmod(0o555)
    try:
        with pytest.raises(StorageError) as info:
            save_epochs(mgr, range(1, 2))
        assert info.value.errno in (errno.EACCES, errno.EPERM) and "not writable" in str(info.value)
        assert snapshot(directory) == before
    finally:
        directory.chmod(0o755)


# -- damage behind the manager's back ---------------------------------------------

def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


DAMAGE = {
    "flip-first-byte": lambda data, other: flip(data, 0),
    "flip-middle-byte": lambda data, other: flip(data, len(data) // 2),
    "flip-last-byte": lambda data, other: flip(data, len(data) - 1),
    "truncated": lambda data, other: data[: len(data) // 2],
    "zero-length": lambda data, other: b"",
    "garbage-appended": lambda data, other: data + b"\0" * 100,
    "replaced-by-another-checkpoint": lambda data, other: other,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_is_detected_and_skipped(tmp_path: Path, damage: str) -> None:
    directory = tmp_path / "run"
    save_epochs(make_manager(directory), range(3))
    newest = directory / name(2)
    original = newest.read_bytes()
    newest.write_bytes(DAMAGE[damage](original, (directory / name(1)).read_bytes()))
    damaged = newest.read_bytes()
    mgr = make_manager(directory)
    assert mgr.verify() == {name(0): "ok", name(1): "ok", name(2): "damaged"}
    with pytest.raises(CorruptCheckpointError, match=name(2)):
        mgr.restore("latest")  # an explicit request does not silently fall back
    assert weights_epoch(mgr) != 2
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint .*{name(2)}"):
        assert mgr.resume() == 2
    assert weights_epoch(mgr) == 1 and mgr.resumed.epoch == 1
    quarantined = directory / (name(2) + QUARANTINE_SUFFIX)
    assert not newest.exists() and quarantined.read_bytes() == damaged  # kept for inspection
    assert [r.epoch for r in make_manager(directory).checkpoints] == [0, 1]
    save_epochs(mgr, range(2, 3))
    assert set(make_manager(directory).verify().values()) == {"ok"}


def test_a_flipped_byte_anywhere_is_detected(tmp_path: Path) -> None:
    """Every byte position of a checkpoint, flipped, fails the recorded checksum."""
    directory = tmp_path / "run"
    mgr = CheckpointManager(directory, model=torch.nn.Linear(4, 4), progress=False)
    record = mgr.save(epoch=0)
    original = record.path.read_bytes()
    assert len(original) > 1000
    fd = os.open(record.path, os.O_WRONLY)
    try:
        for at in range(len(original)):
            os.pwrite(fd, bytes([original[at] ^ 0xFF]), at)
            with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
                fileio.verify(record.path, record.checksum)
            os.pwrite(fd, original[at:at + 1], at)
    finally:
        os.close(fd)
    fileio.verify(record.path, record.checksum)  # restored: passes again


def test_flipped_byte_without_an_index_is_never_adopted_silently(tmp_path: Path, seed: int) -> None:
    """With no recorded checksum (the index lost, or the file copied elsewhere), the
    per-record CRC-32s that torch.save keeps in its zip archive must keep a damaged file
    out, or what loads must be exactly what was saved."""
    source = tmp_path / "source"
    save_epochs(make_manager(source), range(1))
    expected = torch.load(source / name(0), weights_only=True)
    original = (source / name(0)).read_bytes()
    rng = random.Random(seed)
    positions = sorted(rng.sample(range(len(original)), 150) + [len(original) // 2, len(original) - 1])
    rejected = 0
    for at in positions:
        directory = tmp_path / f"flip{at}"
        directory.mkdir()
        (directory / name(0)).write_bytes(flip(original, at))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            listed = make_manager(directory).checkpoints
        if not listed:
            rejected += 1
            continue
        obj = fileio.load(listed[0].path, checksum=listed[0].checksum)
        assert torch.equal(obj["model"]["weight"], expected["model"]["weight"]), at
        assert torch.equal(obj["model"]["bias"], expected["model"]["bias"]), at
        assert (obj["epoch"], obj["extra"], obj["metrics"]) == (0, {"epoch": 0}, expected["metrics"]), at
    assert rejected > len(positions) // 2


def test_file_deleted_behind_the_managers_back(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    mgr = make_manager(directory)
    save_epochs(mgr, range(3))
    (directory / name(2)).unlink()
    stale = mgr.checkpoints[-1]
    with pytest.raises(CheckpointNotFoundError, match=name(2)), pytest.warns(UserWarning, match="missing"):
        mgr.restore(stale)
    with pytest.warns(UserWarning, match="missing on disk"):
        assert mgr.verify() == {name(0): "ok", name(1): "ok", name(2): "missing"}
    with pytest.warns(UserWarning, match="missing on disk"):
        fresh = make_manager(directory)
    with pytest.warns(UserWarning, match="missing on disk"):
        assert fresh.verify()[name(2)] == "missing"  # still reported by a new manager
    with pytest.warns(UserWarning, match="missing on disk"):
        assert fresh.resume() == 2 and weights_epoch(fresh) == 1
    with pytest.warns(UserWarning, match="missing on disk"):
        save_epochs(fresh, range(2, 3))  # the next save drops the stale entry from the index
    assert make_manager(directory).verify() == {name(0): "ok", name(1): "ok", name(2): "ok"}


def test_index_pointing_at_missing_files(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    save_epochs(make_manager(directory), range(2))
    data = json.loads((directory / index.INDEX_NAME).read_text())
    ghost = dict(data["checkpoints"][-1], file=name(7), epoch=7)
    data["checkpoints"].append(ghost)
    (directory / index.INDEX_NAME).write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=name(7)):
        mgr = make_manager(directory)
    assert [r.epoch for r in mgr.checkpoints] == [0, 1]
    with pytest.warns(UserWarning, match=name(7)):
        assert mgr.verify() == {name(0): "ok", name(1): "ok", name(7): "missing"}
    with pytest.warns(UserWarning, match=name(7)):
        assert mgr.resume() == 2


TORN = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "garbage": lambda text: "\x00\xff not json {{{",
    "a list": lambda text: "[]",
    "wrong shape": lambda text: json.dumps({"checkpoints": 5}),
    "entry without epoch": lambda text: json.dumps({"checkpoints": [{"file": name(0)}]}),
    "bad number": lambda text: json.dumps({"checkpoints": [{"file": name(0), "epoch": "x", "step": 0}]}),
}


@pytest.mark.parametrize("torn", list(TORN))
def test_torn_or_garbage_index_is_rebuilt_from_the_files(tmp_path: Path, torn: str) -> None:
    directory = tmp_path / "run"
    save_epochs(make_manager(directory), range(3))
    path = directory / index.INDEX_NAME
    path.write_bytes(TORN[torn](path.read_text()).encode("utf-8", "surrogateescape"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = make_manager(directory)
    assert [r.epoch for r in mgr.checkpoints] == [0, 1, 2]
    rebuilt = json.loads(path.read_text())  # rewritten, valid
    assert [e["file"] for e in rebuilt["checkpoints"]] == [name(0), name(1), name(2)]
    assert set(mgr.verify().values()) == {"ok"}
    assert mgr.resume() == 3 and weights_epoch(mgr) == 2 and mgr.resumed.extra == {"epoch": 2}


# -- other format versions ---------------------------------------------------------

def hand_written(epoch: int, version: int, weight: float, **meta) -> dict:
    model = torch.nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.fill_(weight)
    return {"model": model.state_dict(), "epoch": epoch, "step": 0, "metrics": {"loss": 0.5},
            "ckpt": {"format": version, **meta}}


def test_newer_format_version_is_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    mgr = make_manager(directory)
    save_epochs(mgr, range(2))
    newer = hand_written(1, format.FORMAT_VERSION + 1, 9.0, library="ckpt 9.0.0")
    torch.save(newer, directory / name(1))  # a newer ckpt overwrote epoch 1 ...
    data = json.loads((directory / index.INDEX_NAME).read_text())
    data["checkpoints"][-1]["checksum"] = file_checksum(directory / name(1))  # ... and indexed it
    (directory / index.INDEX_NAME).write_text(json.dumps(data))
    for attempt in (make_manager(directory).resume, lambda: make_manager(directory).restore(directory / name(1))):
        with pytest.raises(FormatVersionError) as info:
            attempt()
        text = str(info.value)
        assert name(1) in text and "ckpt 9.0.0" in text and "upgrade ckpt" in text
    assert (directory / name(1)).exists()  # not mistaken for damage: nothing quarantined
    (directory / index.INDEX_NAME).unlink()  # unindexed, it is refused when the directory is opened
    with pytest.raises(FormatVersionError, match=name(1)):
        make_manager(directory)


def test_older_format_version_loads(tmp_path: Path) -> None:
    """A format-0 file: no rng, no extra, metadata with only its version."""
    directory = tmp_path / "run"
    directory.mkdir()
    torch.save(hand_written(4, 0, 4.0), directory / name(4))
    mgr = make_manager(directory)
    assert [(r.epoch, r.metrics) for r in mgr.checkpoints] == [(4, {"loss": 0.5})]
    assert mgr.verify() == {name(4): "ok"}
    assert mgr.resume() == 5 and weights_epoch(mgr) == 4.0 and mgr.resumed.extra == {}
    save_epochs(mgr, range(5, 6))  # and the run continues in the current format
    assert make_manager(directory).resume() == 6
    elsewhere = tmp_path / "other"
    restored = make_manager(elsewhere).restore(directory / name(4))
    assert restored.epoch == 4
