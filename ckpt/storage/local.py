"""A local directory as a :class:`~ckpt.storage.base.Store`.

The commit protocol (see docs/explanation/commit-protocol.md): write to a unique temporary name in the same
directory, flush and ``fsync`` it, ``os.replace`` it onto its final name, ``fsync`` the
directory. A failed write removes its temporary file and re-raises; nothing partial is
ever visible under a final name. Knows nothing of torch or of the checkpoint schema.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import threading
from contextlib import AbstractContextManager, nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from filelock import FileLock, Timeout

from ..errors import StorageError, storage_error
from ..io.checksum import ChecksumWriter, format_checksum
from ..io.posix import fsync_dir, read_regular
from .base import Capabilities, OnBytes, Produce, Written

if TYPE_CHECKING:
    from .trees import LocalTree

TMP_PREFIX = ".ckpt-tmp-"
LOCK_NAME = ".ckpt.lock"
#: Where large deleted files wait for the background unlink: a directory of its own, so
#: that the unlink leaves the run directory's mtime alone (the catalog's book takes a
#: changed run directory for a foreign change and scans it again).
RECLAIM_DIR = ".ckpt-reclaim"
QUARANTINE_SUFFIX = ".corrupt"
#: The temporary name of a checkpoint kept aside while it is overwritten; group 1: its own name.
_ASIDE = re.compile(re.escape(TMP_PREFIX) + r"\d+-[0-9a-f]{8}-prev-(.+)")


def scratch_dir(name: str) -> str:
    """Where a sharded save of ``name`` stages, beside it (the same name on every rank)."""
    return f"{TMP_PREFIX}shard-{name}"


def temporary_name(name: str, tag: str = "") -> str:
    """A name no other writer uses, which listings skip and the next open cleans."""
    return f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{tag}{name}"


def atomic_write(directory: Path, name: str, produce: Produce, on_write: OnBytes = None) -> Written:
    """Commit ``produce``'s bytes as ``directory/name``, atomically and durably.

    ``produce`` receives a :class:`ChecksumWriter`. On any failure the temporary file is
    removed, a newly created final file is removed too, and the error propagates.
    """
    final = directory / name
    tmp = directory / temporary_name(name)
    existed = final.exists()
    # read-write: the checksum may read back a range the format did not vouch for
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    replaced = False
    try:
        with open(fd, "wb", buffering=1 << 20) as f:
            writer = ChecksumWriter(f, on_write)
            try:
                produce(writer)  # type: ignore[arg-type]  # a file-like, as torch.save expects
            except BaseException as e:
                if writer.error is not None and e is not writer.error:
                    raise writer.error from e  # ENOSPC or Ctrl-C, not torch's "unexpected pos"
                raise
            checksum = format_checksum(writer.crc)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        replaced = True
        fsync_dir(directory)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        if replaced and not existed:
            with suppress(OSError):
                os.unlink(final)
        raise
    return Written(name, writer.size, checksum)


def write_file(path: Path, produce: Produce) -> Path:
    """Commit one file outside the checkpoint namespace (a model file, an export) atomically.

    In a run directory (one with ckpt's lock file) it is written under the lock, so a
    manager opening the directory meanwhile does not take its temporary file for a
    crashed writer's and delete it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path.parent / LOCK_NAME):
        with LocalStore(path.parent, create=False).lock(commit=True):
            atomic_write(path.parent, path.name, produce)
    else:
        atomic_write(path.parent, path.name, produce)
    return path


#: Files at least this large are deleted on a background thread (see LocalStore.delete).
RECLAIM_MIN = 64 << 20
#: The same for the packs of a differential checkpoint (``ckpt-blob-*``): one save's
#: retention frees many of them at once (a pack per large tensor), adding up to the
#: size of a full checkpoint (docs/explanation/differential.md).
PACK_RECLAIM_MIN = 1 << 20
PACK_PREFIX = "ckpt-blob-"


class _Reclaimer:
    """Unlinks files on one background thread, started when there is work and ending
    when there is none. Not a daemon: the interpreter finishes the unlinks at exit. An
    unlink that fails leaves a temporary file, which the next open removes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: List[Path] = []
        self._busy = False

    def add(self, path: Path) -> None:
        with self._cond:
            self._pending.append(path)
            if not self._busy:
                self._busy = True
                try:
                    threading.Thread(target=self._run, name="ckpt-reclaim").start()
                except RuntimeError:  # interpreter shutting down: no new threads
                    self._busy = False
                    self._unlink_all()

    def wait(self) -> None:
        with self._cond:
            while self._busy:
                self._cond.wait()

    def _run(self) -> None:
        with self._cond:
            while self._pending:
                self._unlink_all()
            self._busy = False
            self._cond.notify_all()

    def _unlink_all(self) -> None:
        """Unlink what is pending (the condition is held; unlinking is released from it)."""
        batch, self._pending = self._pending, []
        self._cond.release()
        try:
            for path in batch:
                with suppress(OSError):
                    if os.path.isdir(path) and not os.path.islink(path):  # a sharded checkpoint
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
        finally:
            self._cond.acquire()


class _DirectoryLock(FileLock):
    """A FileLock whose failures to open the lock file (read-only, full, gone, a planted
    symlink) are clear errors."""

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        _refuse_link(Path(self.lock_file))
        try:
            return super().acquire(*args, **kwargs)
        except Timeout:
            raise
        except OSError as e:
            raise storage_error(e, Path(self.lock_file), "locking the checkpoint directory") from e


def _refuse_link(path: Path) -> None:
    """The lock file must be a regular file: a symlink would make opening it create or
    truncate a file anywhere the link points."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise StorageError("the lock file is not a regular file (a symlink or special file)", path=path,
                           hint="remove it; ckpt creates a plain lock file in its place")


class LocalStore:
    """A run directory on a local (or shared, POSIX) filesystem."""

    #: Its lock excludes every other writer (a file lock), so what is unreferenced while
    #: it is held belongs to no save in flight.
    exclusive_lock = True

    def __init__(self, directory: Path, *, create: bool = True) -> None:
        self.directory = prepare_directory(Path(directory)) if create else Path(directory)
        self.url = str(self.directory)
        self._reclaimer = _Reclaimer()

    def capabilities(self) -> Capabilities:
        """Everything but recorded checksums: a real directory, appends, identities, a lock
        that excludes every other writer."""
        return Capabilities(identity=self.identity, append=self.append, list_dirs=self.list_dirs,
                            flush=self.flush, local_root=self.directory, local_copies=self.directory,
                            exclusive_lock=self.exclusive_lock)

    def where(self, name: str) -> Path:
        return self.directory / name

    def write(self, name: str, produce: Produce, *, on_write: OnBytes = None) -> Written:
        return atomic_write(self.directory, name, produce, on_write)

    def append(self, name: str, data: bytes) -> None:
        """Append ``data`` to ``name`` durably (the index journal); created if absent."""
        path = self.directory / name
        created = not os.path.lexists(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.directory)

    def identity(self, name: str) -> Optional[Tuple[int, int, int]]:
        """(inode, size, mtime_ns) of ``name``; None when absent. A commit changes it."""
        try:
            st = os.lstat(self.directory / name)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def read_bytes(self, name: str) -> bytes:
        return read_regular(self.directory / name)

    def local_path(self, name: str) -> AbstractContextManager[Path]:
        return nullcontext(self.directory / name)

    def list(self, prefix: str = "") -> Dict[str, int]:
        return self._scan(prefix, dirs=False)

    def list_dirs(self, prefix: str = "") -> Dict[str, int]:
        """Committed directories (sharded checkpoints) starting with ``prefix``, and the
        total bytes of the files in each."""
        return self._scan(prefix, dirs=True)

    def _scan(self, prefix: str, *, dirs: bool) -> Dict[str, int]:
        """The regular files (or directories) named ``prefix...``, temporaries left out, and
        their sizes; an entry deleted while listed is left out too."""
        out: Dict[str, int] = {}
        with os.scandir(self.directory) as it:
            for entry in it:
                if entry.name.startswith(prefix) and not entry.name.startswith(TMP_PREFIX):
                    with suppress(FileNotFoundError):
                        if dirs and entry.is_dir(follow_symlinks=False):
                            out[entry.name] = _tree_size(Path(entry.path))
                        elif not dirs and entry.is_file(follow_symlinks=False):
                            out[entry.name] = entry.stat(follow_symlinks=False).st_size
        return out

    def tree(self, name: str) -> LocalTree:
        """The sharded checkpoint ``name``: a directory here."""
        from .trees import LocalTree
        return LocalTree(self.directory / name)

    def delete(self, name: str) -> None:
        """Remove a file, or a directory (a sharded checkpoint) with everything in it.

        A large file or a directory leaves its name now (renamed to a temporary name,
        which listings skip) and its blocks are freed on a background thread: freeing a multi-GB file
        takes the filesystem tens to hundreds of milliseconds the training loop need not
        wait for. It waits in :data:`RECLAIM_DIR`, so the unlink does not change the run
        directory. A crash before that leaves a temporary file the next open removes.
        """
        path = self.directory / name
        with suppress(FileNotFoundError):
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) and name.startswith(TMP_PREFIX):
                shutil.rmtree(path)
            elif (stat.S_ISDIR(st.st_mode) or st.st_size >= RECLAIM_MIN
                  or (st.st_size >= PACK_RECLAIM_MIN and name.startswith(PACK_PREFIX))) \
                    and not name.startswith(TMP_PREFIX):
                aside = self._reclaim_dir() / temporary_name(name, "del-")
                os.replace(path, aside)
                self._reclaimer.add(aside)
            else:
                os.unlink(path)

    def _reclaim_dir(self) -> Path:
        """:data:`RECLAIM_DIR`, created if needed; the run directory itself where that name
        is taken by something else (a file, a symlink)."""
        path = self.directory / RECLAIM_DIR
        try:
            with suppress(FileExistsError):
                os.mkdir(path, 0o755)
            return path if stat.S_ISDIR(os.lstat(path).st_mode) else self.directory
        except OSError:
            return self.directory

    def flush(self) -> None:
        """Wait until the files :meth:`delete` handed to the background are gone."""
        self._reclaimer.wait()

    def move(self, src: str, dst: str) -> None:
        os.replace(self.directory / src, self.directory / dst)
        fsync_dir(self.directory)

    def keep_aside(self, name: str) -> Optional[str]:
        aside = temporary_name(name, "prev-")
        try:
            os.link(self.directory / name, self.directory / aside)
        except OSError:  # no hard links here: the replaced checkpoint cannot be put back
            return None
        return aside

    def _put_back(self, name: str) -> bool:
        """Move a checkpoint kept aside by an overwrite (:meth:`keep_aside`, or a sharded
        directory renamed away at its commit) back to its name, if a crash left that name
        empty: then it is the only copy. True if it was moved."""
        found = _ASIDE.fullmatch(name)
        if found is None or os.path.lexists(self.directory / found[1]):
            return False
        self.move(name, found[1])
        return True

    def lock(self, timeout: float = -1, *, commit: bool) -> AbstractContextManager[object]:
        return _DirectoryLock(str(self.directory / LOCK_NAME), thread_local=False, timeout=timeout)

    def clean_temporaries(self) -> List[str]:
        removed: List[str] = []
        try:
            with self.lock(timeout=0, commit=False):
                with os.scandir(self.directory) as it:
                    stale = [e.name for e in it if e.name.startswith(TMP_PREFIX)
                             and (e.is_file(follow_symlinks=False) or e.is_dir(follow_symlinks=False))]
                for name in stale:  # files, and the directories of unfinished sharded saves
                    with suppress(FileNotFoundError):
                        if not self._put_back(name):
                            self.delete(name)
                            removed.append(name)
                removed += self._clean_reclaim()
        except Timeout:
            pass  # another writer holds the lock: its temporaries are live
        return removed

    def _clean_reclaim(self) -> List[str]:
        """Empty :data:`RECLAIM_DIR` of what a killed process left to unlink (the caller
        holds the lock); the directory stays, so the run directory does not change."""
        path = self.directory / RECLAIM_DIR
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return []
            with os.scandir(path) as it:
                left = [e.name for e in it if e.name.startswith(TMP_PREFIX)]
        except FileNotFoundError:
            return []
        for name in left:
            with suppress(FileNotFoundError):
                if os.path.isdir(path / name) and not os.path.islink(path / name):
                    shutil.rmtree(path / name)
                else:
                    os.unlink(path / name)
        return [f"{RECLAIM_DIR}/{name}" for name in left]

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def prepare_directory(directory: Path) -> Path:
    """Create ``directory`` if needed and check that ckpt can write there."""
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise StorageError("expected a directory for checkpoints, found a file", path=directory,
                           hint="pass a directory path (it is created if missing)")
    lock_file = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _refuse_link(lock_file)
        fd = os.open(lock_file, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        os.close(fd)
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"cannot create or write to the checkpoint directory ({e.strerror})",
                           path=directory,
                           hint="check permissions and free space, or choose another directory") from e
    return directory
