"""Storage: atomic durable writes, listing, deletion and the directory lock.

The commit protocol (design §4): write to a unique temporary name in the same
directory, flush and ``fsync`` it, ``os.replace`` it onto its final name, ``fsync`` the
directory. A failed write removes its temporary file and re-raises; nothing partial is
ever visible under a final name. Knows nothing of torch or of the checkpoint schema.
"""

from __future__ import annotations

import errno
import os
import secrets
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, List, Optional

from filelock import FileLock, Timeout

from . import fastio
from .errors import StorageError

TMP_PREFIX = ".ckpt-tmp-"
LOCK_NAME = ".ckpt.lock"
QUARANTINE_SUFFIX = ".corrupt"


@dataclass(frozen=True)
class Written:
    """What a committed write produced."""

    path: Path
    size: int
    checksum: str


def format_checksum(crc: int) -> str:
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


class ChecksumWriter:
    """File-like wrapper that computes CRC-32 and counts bytes as they are written.

    The checksum is computed on the bytes in flight, so integrity costs no second pass
    over the file; for large buffers it runs on a helper thread while the bytes are
    written, and completed ranges go to the kernel's writeback early (:mod:`ckpt.fastio`).
    ``on_write`` receives the byte count of each write (progress bars).
    """

    def __init__(self, raw: BinaryIO, on_write: Optional[Callable[[int], object]] = None) -> None:
        self._raw = raw
        self._on_write = on_write
        self._writeback = fastio.Writeback(raw)
        self.crc = 0
        self.size = 0
        self.error: Optional[BaseException] = None

    def write(self, data) -> int:  # noqa: ANN001 - bytes-like
        view = memoryview(data).cast("B")
        try:
            self.crc, written = fastio.crc_during(view, self.crc, self._raw.write, view)
            n = len(view) if written is None else written
            self.size += n
            self._writeback.advance(self.size)  # may flush: its errors are this write's
        except BaseException as e:  # torch.save turns it into an opaque RuntimeError: keep it
            self.error = e
            raise
        if self._on_write is not None:
            self._on_write(n)
        return n

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):  # Windows cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(directory: Path, name: str, write: Callable[[ChecksumWriter], None],
                 on_write: Optional[Callable[[int], object]] = None) -> Written:
    """Commit ``write``'s bytes as ``directory/name``, atomically and durably.

    ``write`` receives a :class:`ChecksumWriter`. On any failure the temporary file is
    removed, a newly created final file is removed too, and the error propagates.
    """
    final = directory / name
    tmp = directory / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{name}"
    existed = final.exists()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    replaced = False
    try:
        with open(fd, "wb", buffering=1 << 20) as f:
            writer = ChecksumWriter(f, on_write)
            try:
                write(writer)
            except BaseException as e:
                if writer.error is not None and e is not writer.error:
                    raise writer.error from e  # ENOSPC or Ctrl-C, not torch's "unexpected pos"
                raise
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
    return Written(final, writer.size, format_checksum(writer.crc))


def file_checksum(path: Path, on_read: Optional[Callable[[int], object]] = None) -> str:
    """CRC-32 of a whole file, read in large chunks (summed while the next one is read)."""
    return format_checksum(fastio.file_crc(path, on_read))


def prepare_directory(directory: Path) -> Path:
    """Create ``directory`` if needed and check that ckpt can write there."""
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise StorageError("expected a directory for checkpoints, found a file", path=directory,
                           hint="pass a directory path (it is created if missing)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / LOCK_NAME).touch(exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create or write to the checkpoint directory ({e.strerror})",
                           path=directory,
                           hint="check permissions and free space, or choose another directory") from e
    return directory


class _DirectoryLock(FileLock):
    """A FileLock whose failures to open the lock file (read-only, full, gone) are clear errors."""

    def acquire(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201 - FileLock's signature
        try:
            return super().acquire(*args, **kwargs)
        except Timeout:
            raise
        except OSError as e:
            raise storage_error(e, Path(self.lock_file), "locking the checkpoint directory") from e


def lock(directory: Path) -> FileLock:
    """The inter-process lock that serialises commits in ``directory``."""
    return _DirectoryLock(str(directory / LOCK_NAME), thread_local=False)


def clean_temporaries(directory: Path) -> List[Path]:
    """Remove temporary files left by crashed writers; only when no writer is active."""
    removed: List[Path] = []
    try:
        with lock(directory).acquire(timeout=0):
            for path in list_names(directory, TMP_PREFIX):
                with suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    except Timeout:
        pass  # another writer holds the lock: its temporaries are live
    return removed


def list_names(directory: Path, prefix: str = "") -> Iterator[Path]:
    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith(prefix) and entry.is_file(follow_symlinks=False):
                yield Path(entry.path)


def remove(path: Path) -> None:
    """Delete a committed file; a file that is already gone is not an error."""
    with suppress(FileNotFoundError):
        os.unlink(path)


def quarantine(path: Path) -> Path:
    """Move a damaged checkpoint out of the checkpoint namespace, keeping its bytes."""
    target = path.with_name(path.name + QUARANTINE_SUFFIX)
    n = 0
    while target.exists():  # never overwrite an earlier quarantined copy
        n += 1
        target = path.with_name(f"{path.name}{QUARANTINE_SUFFIX}.{n}")
    os.replace(path, target)
    return target


def storage_error(e: OSError, path: Path, action: str) -> StorageError:
    """Wrap an OSError raised while committing, keeping its errno and a useful hint."""
    if e.errno == errno.ENOSPC:
        hint = "the disk is full: free space or lower keep_last/keep_best; earlier checkpoints are intact"
    elif isinstance(e, PermissionError) or e.errno == errno.EROFS:
        hint = "the directory is not writable (permissions or a read-only mount): fix it or choose another directory"
    else:
        hint = "earlier checkpoints and the index are unchanged; fix the cause and save again"
    err = StorageError(f"{action} failed: {e.strerror or e}", path=path, hint=hint)
    err.errno = e.errno
    return err
