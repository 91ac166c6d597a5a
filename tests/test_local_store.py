"""Storage: atomic durable writes, temporaries, listing, removal, the lock, errors."""

from __future__ import annotations

import array
import errno
import os
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import torch
from helpers import temporaries

from ckpt import CheckpointManager
from ckpt.catalog import Catalog
from ckpt.errors import CkptError, StorageError, storage_error
from ckpt.io.checksum import file_checksum
from ckpt.storage import LocalStore
from ckpt.storage import local as storage


def payload(f) -> None:
    f.write(b"hello ")
    f.write(bytearray(b"world"))


def test_atomic_write_commits_bytes_size_and_checksum(tmp_path):
    written = storage.atomic_write(tmp_path, "out.bin", payload)
    assert written.name == "out.bin"
    assert (tmp_path / "out.bin").read_bytes() == b"hello world"
    assert written.size == 11
    assert written.checksum == f"crc32:{zlib.crc32(b'hello world'):08x}"
    assert written.checksum == file_checksum(tmp_path / written.name)
    assert temporaries(tmp_path) == []


def test_atomic_write_goes_through_a_unique_temporary_in_the_same_directory(tmp_path):
    final, seen = tmp_path / "out.bin", []

    def writer(data: bytes, before: object):
        def write(f):
            f.write(data)
            seen.extend(temporaries(tmp_path))
            assert (final.read_bytes() if final.exists() else None) == before  # not replaced yet
        return write

    storage.atomic_write(tmp_path, "out.bin", writer(b"one", None))
    storage.atomic_write(tmp_path, "out.bin", writer(b"two", b"one"))
    assert final.read_bytes() == b"two"
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(name.startswith(f"{storage.TMP_PREFIX}{os.getpid()}-") for name in seen)
    assert temporaries(tmp_path) == []


def test_checksum_writer_counts_every_byte_of_any_buffer(tmp_path):
    calls = []
    data = array.array("i", range(1000))  # a multi-byte buffer: counted in bytes, not items
    written = storage.atomic_write(tmp_path, "a.bin", lambda f: f.write(data), on_write=calls.append)
    assert written.size == len(data.tobytes()) == sum(calls)
    assert written.checksum == f"crc32:{zlib.crc32(data.tobytes()):08x}"


class Boom(Exception):
    pass


def failing_write(f):
    f.write(b"partial bytes")
    raise Boom("writer failed")


def interrupted_write(f):
    f.write(b"partial bytes")
    raise KeyboardInterrupt


@pytest.mark.parametrize("write, error", [(failing_write, Boom), (interrupted_write, KeyboardInterrupt)])
def test_failed_write_leaves_no_temporary_and_no_final_file(tmp_path, write, error):
    with pytest.raises(error):
        storage.atomic_write(tmp_path, "out.bin", write)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("write, error", [(failing_write, Boom), (interrupted_write, KeyboardInterrupt)])
def test_failed_overwrite_keeps_the_old_file_byte_identical(tmp_path, write, error):
    storage.atomic_write(tmp_path, "out.bin", lambda f: f.write(b"old"))
    with pytest.raises(error):
        storage.atomic_write(tmp_path, "out.bin", write)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    assert (tmp_path / "out.bin").read_bytes() == b"old"


@pytest.mark.parametrize("target", ["fsync", "replace"])
@pytest.mark.parametrize("existing", [None, b"old"])
def test_fsync_or_replace_failure_leaves_nothing_partial(tmp_path, monkeypatch, target, existing):
    if existing is not None:
        (tmp_path / "out.bin").write_bytes(existing)

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(storage.os, target, fail)
    with pytest.raises(OSError, match="injected"):
        storage.atomic_write(tmp_path, "out.bin", payload)
    monkeypatch.undo()
    assert temporaries(tmp_path) == []
    if existing is None:
        assert list(tmp_path.iterdir()) == []
    else:
        assert (tmp_path / "out.bin").read_bytes() == existing


def test_directory_fsync_failure_takes_a_new_file_back(tmp_path, monkeypatch):
    def fail(directory):
        raise OSError(errno.EIO, "injected directory fsync error")

    monkeypatch.setattr(storage, "fsync_dir", fail)
    with pytest.raises(OSError, match="injected"):
        storage.atomic_write(tmp_path, "out.bin", payload)
    assert list(tmp_path.iterdir()) == []  # the rename may not be durable: not reported as committed


def test_file_checksum_reports_progress_in_bytes(tmp_path):
    path = tmp_path / "f"
    data = b"\x01" * 1000
    path.write_bytes(data)
    seen = []
    assert file_checksum(path, seen.append) == f"crc32:{zlib.crc32(data):08x}"
    assert sum(seen) == 1000


def test_prepare_directory_creates_nested_directories_and_the_lock_file(tmp_path):
    target = tmp_path / "a" / "b"
    assert storage.prepare_directory(target) == target
    assert sorted(p.name for p in target.iterdir()) == [storage.LOCK_NAME]


def test_prepare_directory_refuses_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"mine")
    with pytest.raises(StorageError) as info:
        storage.prepare_directory(path)
    assert isinstance(info.value, OSError) and isinstance(info.value, CkptError)
    assert str(path) in str(info.value) and "hint:" in str(info.value)
    assert path.read_bytes() == b"mine"


def test_list_yields_committed_files_with_the_prefix_and_their_sizes(tmp_path):
    (tmp_path / "ckpt-a").write_bytes(b"abc")
    (tmp_path / "ckpt-dir").mkdir()
    (tmp_path / "other").write_bytes(b"")
    (tmp_path / f"{storage.TMP_PREFIX}1-ab-ckpt-b").write_bytes(b"")
    (tmp_path / "ckpt-link").symlink_to(tmp_path / "ckpt-a")
    assert LocalStore(tmp_path).list("ckpt-") == {"ckpt-a": 3}


def test_clean_temporaries_removes_only_temporaries(tmp_path):
    storage.prepare_directory(tmp_path)
    stale = tmp_path / f"{storage.TMP_PREFIX}123-abcd-ckpt-e000001-s000000000.pt"
    stale.write_bytes(b"half a checkpoint")
    keep = {"notes.txt": b"n", "model.pt": b"m", "ckpt-e1.pt.bak": b"b", "ckpt-tmp-looking.pt": b"c"}
    for name, data in keep.items():
        (tmp_path / name).write_bytes(data)
    assert LocalStore(tmp_path).clean_temporaries() == [stale.name]
    assert not stale.exists()
    assert {n: (tmp_path / n).read_bytes() for n in keep} == keep


def test_opening_a_manager_cleans_stale_temporaries(tmp_path):
    stale = tmp_path / f"{storage.TMP_PREFIX}4242-dead-ckpt-e000003-s000000000.pt"
    stale.write_bytes(b"left by a writer that was killed")
    (tmp_path / "notes.txt").write_bytes(b"mine")
    mgr = CheckpointManager(tmp_path)
    assert not stale.exists() and mgr.checkpoints == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [storage.LOCK_NAME, "notes.txt"]


def test_clean_temporaries_leaves_a_busy_writers_temporaries(tmp_path):
    storage.prepare_directory(tmp_path)
    live = tmp_path / f"{storage.TMP_PREFIX}999-beef-ckpt-e000001-s000000000.pt"
    live.write_bytes(b"being written")
    with LocalStore(tmp_path).lock(commit=True):  # another writer holds the directory lock
        assert LocalStore(tmp_path).clean_temporaries() == []
    assert live.exists()
    assert LocalStore(tmp_path).clean_temporaries() == [live.name]


def test_quarantine_keeps_the_bytes_under_a_corrupt_name(tmp_path):
    path = tmp_path / "ckpt-e000001-s000000000.pt"
    path.write_bytes(b"damaged")
    moved = (path.parent / Catalog(LocalStore(path.parent)).move_aside(path.name))
    assert moved == tmp_path / "ckpt-e000001-s000000000.pt.corrupt"
    assert moved.read_bytes() == b"damaged" and not path.exists()
    path.write_bytes(b"damaged again")
    # an earlier quarantined copy is never overwritten
    again = (path.parent / Catalog(LocalStore(path.parent)).move_aside(path.name))
    assert again == tmp_path / "ckpt-e000001-s000000000.pt.corrupt.1"
    assert moved.read_bytes() == b"damaged" and again.read_bytes() == b"damaged again"
    with pytest.raises(FileNotFoundError):
        (path.parent / Catalog(LocalStore(path.parent)).move_aside(path.name))  # already gone: the caller reports it


@pytest.mark.parametrize("error, hint", [
    (OSError(errno.ENOSPC, "No space left on device"), "disk is full"),
    (PermissionError(errno.EACCES, "Permission denied"), "not writable"),
    (OSError(errno.EIO, "Input/output error"), "unchanged"),
])
def test_storage_error_names_path_keeps_errno_and_hints(tmp_path, error, hint):
    err = storage_error(error, tmp_path / "f.pt", "writing the checkpoint")
    assert isinstance(err, StorageError) and isinstance(err, OSError)
    assert err.errno == error.errno
    text = str(err)
    assert str(tmp_path / "f.pt") in text and "writing the checkpoint failed" in text and hint in text


# -- a directory that cannot be written, through the manager -------------------------

@pytest.fixture
def read_only(tmp_path):
    """(path, make_read_only): a directory, and a function that makes it unwritable: chmod for a
    normal user; root ignores modes, so for root a bind mount remounted read-only."""
    source = tmp_path / "source"
    source.mkdir()
    if os.geteuid() != 0:
        yield source, lambda: source.chmod(0o555)
        source.chmod(0o755)
        return
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    done = subprocess.run(["mount", "--bind", str(source), str(mounted)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"running as root without permission to bind-mount: {done.stderr.strip()}")

    def make_read_only():
        done = subprocess.run(["mount", "-o", "remount,ro,bind", str(mounted)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"running as root without permission to remount read-only: {done.stderr.strip()}")

    try:
        yield mounted, make_read_only
    finally:
        subprocess.run(["umount", str(mounted)], capture_output=True)


def test_a_directory_that_cannot_be_written(read_only, trainables, snapshot):
    path, make_read_only = read_only
    objs = trainables()
    with CheckpointManager(path, **objs) as mgr:
        mgr.save(epoch=0)
    before = snapshot(path)
    make_read_only()
    with pytest.raises(StorageError) as info:
        CheckpointManager(path / "new_run", **objs)
    assert str(path / "new_run") in str(info.value) and "write" in str(info.value)
    with pytest.raises(StorageError) as info:  # at construction (read-only mount) or at save (chmod)
        CheckpointManager(path, **objs).save(epoch=1)
    assert str(path) in str(info.value) and "writ" in str(info.value)
    assert snapshot(path) == before
    assert not (path / "new_run").exists()


# -- the lock file never follows a planted link (issue 11 item 9) --------------------------

def test_a_planted_lock_symlink_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    run, target = tmp_path / "run", tmp_path / "elsewhere" / "created-by-ckpt"
    run.mkdir()
    target.parent.mkdir()
    os.symlink(target, run / ".ckpt.lock")
    with pytest.raises(StorageError, match="lock"):
        CheckpointManager(run, model=torch.nn.Linear(2, 2)).save(epoch=0)
    assert not target.exists() and not list(run.glob("*.pt"))


def test_a_lock_symlink_to_an_existing_file_does_not_touch_it(tmp_path: Path) -> None:
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("precious")
    os.symlink(victim, run / ".ckpt.lock")
    with pytest.raises(StorageError, match="lock"):
        CheckpointManager(run, model=torch.nn.Linear(2, 2)).save(epoch=0)
    assert victim.read_text() == "precious"


_SWAP_BEFORE_OPEN = """
import os, sys
from pathlib import Path
from ckpt.storage.local import LocalStore

store = LocalStore(Path(sys.argv[1]))
target = store.where("data.json")
target.write_bytes(b"{}")
swapped = []

def swap(event, args):  # a concurrent writer's FIFO takes the file's place right before the open
    if event == "open" and args and str(args[0]) == str(target) and not swapped:
        swapped.append(True)
        os.unlink(target)
        os.mkfifo(target)

sys.addaudithook(swap)
try:
    store.read_bytes("data.json")
except IsADirectoryError as e:
    print("refused", e.errno, bool(swapped))
"""


def test_read_bytes_checks_the_file_it_opened_not_the_name(tmp_path: Path) -> None:
    """The file is swapped for a FIFO after any check of the name and before the open (an
    audit hook runs the swap at that instant, deterministically): reading must not block,
    and must refuse the FIFO as it refuses one found at the start. In a child with a
    deadline, so that a regression hangs one process, not the suite."""
    proc = subprocess.run([sys.executable, "-c", _SWAP_BEFORE_OPEN, str(tmp_path)],
                          cwd=Path(storage.__file__).resolve().parents[2], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["refused", str(errno.EISDIR), "True"]


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_read_bytes_refuses_what_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    (tmp_path / "real").write_bytes(b"x")
    where = tmp_path / "name"
    if kind == "fifo":
        os.mkfifo(where)
    elif kind == "symlink":
        where.symlink_to(tmp_path / "real")
    else:
        where.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        LocalStore(tmp_path).read_bytes("name")
    assert info.value.errno == errno.EISDIR and info.value.filename == str(where)
    assert LocalStore(tmp_path).read_bytes("real") == b"x"


# -- large files are freed in the background ------------------------------------------------


def _linear_run(directory: Path) -> CheckpointManager:
    torch.manual_seed(0)
    return CheckpointManager(directory, model=torch.nn.Linear(64, 64), keep_last=1, progress=False)


def test_an_evicted_large_file_leaves_its_name_at_once_and_its_blocks_by_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "RECLAIM_MIN", 1)  # every file counts as large
    mgr = _linear_run(tmp_path)
    for epoch in range(4):
        mgr.save(epoch=epoch)
        names = sorted(p.name for p in tmp_path.glob("ckpt-e*"))
        assert names == [f"ckpt-e{epoch:06d}-s000000000.pt"]  # the evicted name is gone on return
    mgr.wait()
    assert temporaries(tmp_path) == []
    assert mgr.verify() == {"ckpt-e000003-s000000000.pt": "ok"}


def test_a_small_file_is_unlinked_in_the_call(tmp_path, monkeypatch):
    unlinked = []
    store = LocalStore(tmp_path)
    store.write("a.bin", payload)
    real = os.unlink

    def unlink(path, *a, **k):
        unlinked.append((Path(path).name, threading.current_thread() is threading.main_thread()))
        return real(path, *a, **k)
    monkeypatch.setattr(os, "unlink", unlink)
    store.delete("a.bin")
    assert unlinked == [("a.bin", True)] and not (tmp_path / "a.bin").exists()


KILLED_BEFORE_RECLAIM = r"""
import os, signal, sys, threading, torch
from pathlib import Path
from ckpt import CheckpointManager
from ckpt.storage import local as storage

storage.RECLAIM_MIN = 1
real_unlink = os.unlink
def stuck(path, *a, **k):  # the reclaimer never gets to free the evicted file
    if threading.current_thread().name == "ckpt-reclaim":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_unlink(path, *a, **k)
os.unlink = stuck
torch.manual_seed(0)
mgr = CheckpointManager(sys.argv[1], model=torch.nn.Linear(64, 64), keep_last=1, progress=False)
mgr.save(epoch=0)
mgr.save(epoch=1)  # evicts epoch 0: renamed aside, then the process dies
threading.Event().wait(300)
"""


def test_a_kill_before_the_background_unlink_leaves_a_temporary_the_next_open_removes(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_BEFORE_RECLAIM, str(tmp_path)], timeout=300)
    assert proc.returncode == -9
    assert temporaries(tmp_path) == []  # the run directory holds no temporary: the reclaim one does
    left = temporaries(tmp_path / storage.RECLAIM_DIR)
    assert len(left) == 1 and "del-ckpt-e000000" in left[0]
    mgr = _linear_run(tmp_path)
    assert temporaries(tmp_path / storage.RECLAIM_DIR) == []  # removed, not put back as a checkpoint
    assert [r.epoch for r in mgr.checkpoints] == [1] and mgr.resume() == 2
