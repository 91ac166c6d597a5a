"""Checksummed I/O at the disk's speed: overlap the CRC with the I/O, start writeback early.

A durable save is bound by the disk; what the CPU adds on top is the copy into the
page cache and the CRC-32. The CRC releases the GIL, so a helper thread sums a buffer
while the caller writes (or reads) the neighbouring one: on two cores the checksum
costs no wall time, on one it costs what it did inline. The CRC-32 is zlib-ng's (a
default dependency: the same values as ``zlib.crc32``, about 7x faster with SIMD, see
docs/explanation/performance-internals.md); the standard library's where zlib-ng
cannot be imported. Written ranges are handed to the kernel's writeback as soon
as they are complete, so the final ``fsync`` waits for the tail of the file, not all
of it. Knows nothing of torch.
"""

from __future__ import annotations

import os
import stat
import threading
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple, TypeVar

try:  # the same function as zlib.crc32 (identical values), vectorised
    from zlib_ng.zlib_ng import crc32 as crc32
    CRC_IMPL = "zlib-ng"
except ImportError:  # pragma: no cover - depends on what is installed
    from zlib import crc32 as crc32
    CRC_IMPL = "zlib"

T = TypeVar("T")

#: Below this many bytes a thread hand-off costs more than the CRC it would hide.
OVERLAP_MIN = 1 << 20
#: Start writeback each time this many new bytes have been written (16 MiB was
#: measured faster than 64 MiB on a VM disk: the final fsync waits for less).
WRITEBACK_EVERY = 16 << 20
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
        self._enabled = start_writeback(self._fd, self._done, end)
        self._done = end


def start_writeback(fd: int, start: int, end: int) -> bool:
    """Ask the kernel to write ``[start, end)`` of ``fd`` out now rather than at ``fsync``
    (``posix_fadvise(DONTNEED)``); False where that is not supported (fsync does it all)."""
    if _FADVISE is None:
        return False
    try:
        _FADVISE(fd, start, end - start, os.POSIX_FADV_DONTNEED)
    except OSError:
        return False
    return True


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


def _read_crc(fd: int, offset: int, length: int) -> int:
    crc, end = 0, offset + length
    while offset < end:
        chunk = os.pread(fd, min(READ_CHUNK, end - offset), offset)
        if not chunk:
            raise OSError(f"short read summing bytes {offset}..{end} of the file being written")
        crc, offset = crc32(chunk, crc), offset + len(chunk)
    return crc


def stream_crc(f: BinaryIO, chunk: int = READ_CHUNK) -> Tuple[int, int]:
    """(size, CRC-32) of what is left to read from ``f``, one chunk in memory at a time
    (for streams without a file descriptor: object-store files, archives)."""
    size = crc = 0
    while data := f.read(chunk):
        crc, size = crc32(data, crc), size + len(data)
    return size, crc


def format_checksum(crc: int) -> str:
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


def file_checksum(path: Path, on_read: Optional[Callable[[int], object]] = None) -> str:
    """``crc32:...`` of a whole file (summed while the next chunk is read)."""
    return format_checksum(file_crc(path, on_read))


#: Writes at least this large may take their CRC-32 from the format's own record (see
#: :meth:`ChecksumWriter.trust_records`): combining costs ~0.1 ms, summing 1 MiB ~1 ms.
TRUSTED_MIN = 1 << 20
_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial (reflected bit order, as zlib)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc(A), crc(B) and len(B) (zlib's ``crc32_combine``)."""
    p, k, n = 1 << 31, 3, len2
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


#: Given the file descriptor of a finished file: data offset -> (size, CRC-32) of the
#: records its format stores with their own CRC-32.
RecordCrcs = Callable[[int], Dict[int, Tuple[int, int]]]


def _readable_fd(raw: Any) -> bool:
    """Does ``raw`` sit on a file descriptor open for reading (to read ranges back)?"""
    try:
        fd = raw.fileno()
        import fcntl  # POSIX only: elsewhere every byte is summed as it is written
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    except (OSError, ValueError, AttributeError, ImportError):  # io.UnsupportedOperation is an OSError
        return False


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
        self._crc = 0  # of the bytes since the last deferred range
        self._parts: List[Tuple[int, int, Optional[int]]] = []  # (offset, length, crc or None: deferred)
        self._trust = False
        self.size = 0
        self.error: Optional[BaseException] = None

    def trust_records(self) -> None:
        """Large writes from now on are not summed here: :meth:`settle` takes their
        CRC-32 from the file format's own records (the writer of the format computed
        it anyway); any range it cannot vouch for is read back and summed. Only a real
        file can be read back: on anything else (an upload stream) every byte is summed
        as it is written."""
        self._trust = _readable_fd(self._raw)

    @property
    def crc(self) -> int:
        """CRC-32 of every byte written (deferred ranges are read back if unsettled)."""
        if not self._parts:
            return self._crc
        self.settle(lambda fd: {})
        crc, end = 0, 0
        for offset, length, part in self._parts:
            crc, end = crc32_combine(crc, part or 0, length), offset + length
        return crc32_combine(crc, self._crc, self.size - end) if self.size > end else crc

    def settle(self, records: RecordCrcs) -> None:
        """Fill the deferred ranges from ``records`` (or by reading them back)."""
        if not any(c is None for _, _, c in self._parts):
            return
        self._raw.flush()
        fd = self._raw.fileno()
        known = records(fd)
        parts: List[Tuple[int, int, Optional[int]]] = []
        for offset, length, part in self._parts:
            if part is None:
                size, crc = known.get(offset, (-1, 0))
                part = crc if size == length else _read_crc(fd, offset, length)
            parts.append((offset, length, part))
        self._parts = parts

    def direct(self) -> Optional[int]:
        """A descriptor to write the whole file at offsets, bypassing this wrapper, or
        None: only a regular file nothing has been written to yet qualifies (not an
        upload stream). Report what was written with :meth:`wrote`."""
        if self.size or self._parts:
            return None
        try:
            fd = self._raw.fileno()
            return fd if self._raw.seekable() and stat.S_ISREG(os.fstat(fd).st_mode) else None
        except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
            return None

    def wrote(self, size: int, crc: int) -> None:
        """``size`` bytes with CRC-32 ``crc`` were written from offset 0 through :meth:`direct`."""
        self._raw.seek(size)
        self.size, self._crc = size, crc

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            if self._trust and len(view) >= TRUSTED_MIN:
                end = self._parts[-1][0] + self._parts[-1][1] if self._parts else 0
                if self.size > end:
                    self._parts.append((end, self.size - end, self._crc))
                self._parts.append((self.size, len(view), None))
                self._crc = 0
                written = self._raw.write(view)
            else:
                self._crc, written = crc_during(view, self._crc, self._raw.write, view)
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
