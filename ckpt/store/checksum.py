"""Checksummed I/O at the disk's speed: overlap the CRC with the I/O, start writeback early.

A durable save is bound by the disk; what the CPU adds on top is the copy into the
page cache and the CRC-32. The CRC releases the GIL, so a helper thread sums a buffer
while the caller writes (or reads) the neighbouring one: on two cores the checksum
costs no wall time, on one it costs what it did inline. With the optional ``zlib-ng``
package (``pip install ckpt[fast]``) the same CRC-32 runs about 5x faster (SIMD) than
the standard library's. Written ranges are handed to the kernel's writeback as soon
as they are complete, so the final ``fsync`` waits for the tail of the file, not all
of it. Knows nothing of torch.
"""

from __future__ import annotations

import os
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO, Callable, List, Optional, Tuple, TypeVar

try:  # the same function as zlib.crc32 (identical values), vectorised
    from zlib_ng.zlib_ng import crc32
    CRC_IMPL = "zlib-ng"
except ImportError:  # pragma: no cover - depends on what is installed
    from zlib import crc32
    CRC_IMPL = "zlib"

T = TypeVar("T")

#: Below this many bytes a thread hand-off costs more than the CRC it would hide.
OVERLAP_MIN = 1 << 20
#: Start writeback each time this many new bytes have been written.
WRITEBACK_EVERY = 64 << 20
#: Read size when checksumming a file (two buffers of it are in use at once).
READ_CHUNK = 16 << 20

_FADVISE = getattr(os, "posix_fadvise", None)


def crc_during(view: memoryview, crc: int, io: Callable[..., T], *args: Any) -> Tuple[int, T]:
    """``crc32(view, crc)`` computed on a helper thread while ``io(*args)`` runs here.

    ``view`` must stay unchanged until this returns (it does: the helper is joined first).
    """
    if len(view) < OVERLAP_MIN:
        return crc32(view, crc), io(*args)
    out: List[int] = []
    helper = threading.Thread(target=lambda: out.append(crc32(view, crc)),
                              name="ckpt-crc", daemon=True)
    try:
        helper.start()
    except RuntimeError:  # interpreter shutting down: no new threads, sum inline
        return crc32(view, crc), io(*args)
    try:
        result = io(*args)
    finally:
        helper.join()
    return out[0], result


class Writeback:
    """Asks the kernel to write completed ranges of a file out now rather than at ``fsync``.

    ``posix_fadvise(DONTNEED)`` starts asynchronous writeback of the dirty pages in the
    range (Linux); pages still dirty or under writeback stay cached. A no-op where the
    call or a file descriptor is unavailable.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._fd: Optional[int] = None
        self._enabled = _FADVISE is not None
        self._done = 0

    def advance(self, end: int) -> None:
        """Bytes ``[0, end)`` have been handed to the file."""
        if not self._enabled or end - self._done < WRITEBACK_EVERY:
            return
        try:
            if self._fd is None:
                self._fd = self._raw.fileno()
        except (OSError, ValueError, AttributeError):  # not a real file
            self._enabled = False
            return
        self._raw.flush()  # the buffered tail must reach the kernel; its errors are the write's
        try:
            if _FADVISE is not None:
                _FADVISE(self._fd, self._done, end - self._done, os.POSIX_FADV_DONTNEED)
        except OSError:  # not supported here: fsync will do all the work
            self._enabled = False
        self._done = end


def file_crc(path: Path, on_read: Optional[Callable[[int], object]] = None) -> int:
    """CRC-32 of a whole file; the next chunk is read while the helper sums this one."""
    size = os.stat(path).st_size
    chunk = max(1, min(READ_CHUNK, size))
    buffers = (bytearray(chunk), bytearray(chunk))
    crc = 0
    with open(path, "rb", buffering=0) as f:
        _sequential(f)
        n = f.readinto(buffers[0])
        i = 0
        while n:
            view = memoryview(buffers[i])[:n]
            crc, n = crc_during(view, crc, f.readinto, buffers[1 - i])
            if on_read is not None:
                on_read(len(view))
            i = 1 - i
    return crc


def _sequential(f: BinaryIO) -> None:
    """Hint a sequential read (larger readahead); harmless where unsupported."""
    if _FADVISE is not None:
        with suppress(OSError, ValueError):
            _FADVISE(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)


def format_checksum(crc: int) -> str:
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


def file_checksum(path: Path, on_read: Optional[Callable[[int], object]] = None) -> str:
    """``crc32:...`` of a whole file (summed while the next chunk is read)."""
    return format_checksum(file_crc(path, on_read))


class ChecksumWriter:
    """File-like wrapper that computes CRC-32 and counts bytes as they are written.

    The checksum is computed on the bytes in flight, so integrity costs no second pass
    over the file; for large buffers it runs on a helper thread while the bytes are
    written, and completed ranges go to the kernel's writeback early.
    ``on_write`` receives the byte count of each write (progress bars).
    """

    def __init__(self, raw: BinaryIO, on_write: Optional[Callable[[int], object]] = None) -> None:
        self._raw = raw
        self._on_write = on_write
        self._writeback = Writeback(raw)
        self.crc = 0
        self.size = 0
        self.error: Optional[BaseException] = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            self.crc, written = crc_during(view, self.crc, self._raw.write, view)
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
