"""POSIX file helpers below the storage back-ends: fsync a directory, open a regular
file and nothing else (no FIFO, device or symlink in its place).

The format layer reads files through these, so it never imports a storage back-end.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

__all__ = ["fsync_dir", "open_regular", "read_regular"]

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


def open_regular(path: Path) -> BinaryIO:
    """``path`` open for reading if it is a regular file; :class:`IsADirectoryError` otherwise.

    One open, then fstat on that descriptor: a FIFO, device or symlink put in the file's
    place, even between a check and the read, is refused without blocking.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise IsADirectoryError(errno.EISDIR, "not a regular file", str(path)) from e
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device would block or never end
            raise IsADirectoryError(errno.EISDIR, "not a regular file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return open(fd, "rb")


def read_regular(path: Path) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`)."""
    with open_regular(path) as f:
        return f.read()
