"""Read a file's ranges on a helper thread while the caller sums what was read.

A cold read is bound by the disk; what the CPU adds (the CRC-32, copies out of a
bounce buffer, faulting in fresh memory) can run while the disk works on the next
range. :class:`Reader` reads a list of segments (file ranges, each into the memory
it ends in or into one of a few reusable bounce buffers) in order on a ``ckpt-read``
thread and hands each one back, in order, once its bytes are there; ``preadv``
and zlib-ng's CRC-32 both release the GIL, so on two cores the CRC costs no wall
time. :func:`prefault` asks the kernel to fault in fresh memory ahead of the reads
(``MADV_POPULATE_WRITE``, Linux 5.14+; a no-op elsewhere), on its own thread. Knows
nothing of torch. See docs/explanation/performance-internals.md.
"""

from __future__ import annotations

import ctypes
import os
import queue
import sys
import threading
from typing import Callable, Iterator, List, Optional, Tuple, TypeVar, Union

T = TypeVar("T")

#: Files smaller than this are read inline (a thread costs more than it hides).
THREAD_MIN = 8 << 20
#: Bounce buffers in flight: the reader fills one while the caller sums another.
BOUNCES = 3

#: (file offset, length, destination or None for a bounce buffer)
Segment = Tuple[int, int, Optional[memoryview]]
ReadAt = Callable[[int, memoryview, int], None]
_Item = Union[Tuple[int, memoryview, Optional[bytearray]], BaseException]

_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23
#: Transparent huge pages: 2 MiB, where the kernel has them (faulting 512x fewer pages).
_HUGE = 2 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_madvise: Optional[Callable[..., int]] = None
if sys.platform.startswith("linux"):
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise  # releases the GIL while it runs
        _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - an unusual libc
        _madvise = None


def chunk_size(total: int) -> int:
    """The piece size for ``total`` bytes: 4 MiB, less for small files (the bounce
    buffers stay under a twentieth of the file), a multiple of the page."""
    size = min(4 << 20, max(1 << 20, total // 64))
    return size - size % _PAGE


def split(offset: int, length: int, chunk: int, view: Optional[memoryview] = None) -> Iterator[Segment]:
    """``[offset, offset + length)`` in pieces of at most ``chunk`` bytes (of ``view`` if given)."""
    done = 0
    while done < length:
        n = min(chunk, length - done)
        yield offset + done, n, (view[done: done + n] if view is not None else None)
        done += n


class Reader:
    """Reads ``segments`` in order (on a thread for large reads); iterate for
    ``(offset, view, bounced)``: the bytes read, in a bounce buffer (valid until the
    next item is taken) where ``bounced``, else in the segment's own destination."""

    def __init__(self, read_at: ReadAt, fd: int, segments: List[Segment], chunk: int, threaded: bool) -> None:
        self._read_at, self._fd, self._segments = read_at, fd, segments
        self._threaded = threaded and len(segments) > 1
        need = max((n for _, n, v in segments if v is None), default=0)
        count = BOUNCES if self._threaded else 1
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(count if need else 0):
            self._free.put(bytearray(min(chunk, need)))
        self._ready: queue.SimpleQueue[Optional[_Item]] = queue.SimpleQueue()
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    def __iter__(self) -> Iterator[Tuple[int, memoryview, bool]]:
        if not self._threaded:
            for offset, n, view in self._segments:
                target, buffer = self._target(view, n)
                self._read_at(self._fd, target, offset)
                yield offset, target, buffer is not None
                if buffer is not None:
                    self._free.put(buffer)
            return
        self._thread = threading.Thread(target=self._run, name="ckpt-read", daemon=True)
        self._thread.start()
        try:
            while True:
                item = self._ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                offset, target, buffer = item
                yield offset, target, buffer is not None
                if buffer is not None:
                    self._free.put(buffer)
        finally:
            self.close()

    def _run(self) -> None:
        try:
            for offset, n, view in self._segments:
                if self._stop:
                    return
                target, buffer = self._target(view, n)
                if self._stop:
                    return
                self._read_at(self._fd, target, offset)
                self._ready.put((offset, target, buffer))
            self._ready.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, who raises it
            self._ready.put(e)

    def _target(self, view: Optional[memoryview], n: int) -> Tuple[memoryview, Optional[bytearray]]:
        """Where a segment's bytes go: its own view, or a bounce buffer (waited for)."""
        if view is not None:
            return view, None
        buffer = self._free.get()
        return memoryview(buffer)[:n], buffer

    def close(self) -> None:
        """Stop the reader (it may be waiting for a bounce buffer) and wait for it."""
        self._stop = True
        if self._thread is not None:
            self._free.put(bytearray(1))  # wakes a reader waiting for a buffer
            self._thread.join()
            self._thread = None


def prefetch(fd: int, nbytes: int, offset: int = 0) -> None:
    """Ask the kernel to start reading ``nbytes`` of ``fd`` from ``offset`` now (a hint only)."""
    if nbytes > 0 and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:  # not a regular file: nothing to hint
            pass


def sequential(fd: int) -> None:
    """Tell the kernel ``fd`` is read from start to end (a larger readahead window)."""
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:  # not a regular file: nothing to hint
            pass


def prefault(regions: List[Tuple[int, int]]) -> Optional[threading.Thread]:
    """Fault in ``(address, size)`` regions of fresh memory on a helper thread, so the
    reads into them do not pay a page fault per page; None where it cannot help."""
    if _madvise is None or not regions:
        return None
    thread = threading.Thread(target=_populate, args=(regions,), name="ckpt-prefault", daemon=True)
    thread.start()
    return thread


def _populate(regions: List[Tuple[int, int]]) -> None:
    """Each region's whole pages faulted in; those of 2 MiB and more asked for huge
    pages first (``MADV_HUGEPAGE``: where transparent huge pages are enabled for
    madvised memory, one fault and one clear per 2 MiB instead of 512)."""
    assert _madvise is not None
    for address, size in regions:
        start = -(-address // _PAGE) * _PAGE
        end = (address + size) // _PAGE * _PAGE
        if end - start >= _HUGE:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # a hint: EINVAL where THP is off
        if end > start and _madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
            return  # EINVAL before Linux 5.14: the reads fault the pages in as before


def in_parallel(work: List[Callable[[], T]]) -> List[T]:
    """Each of ``work`` called, all but the first on its own ``ckpt-read`` thread, their
    results in order; the first failure is raised once every call has ended. Used to
    read a file as two streams (a virtual disk serves two positions at once faster
    than one; ``preadv`` and the CRC-32 release the GIL)."""
    if len(work) == 1:
        return [work[0]()]
    results: List[Optional[T]] = [None] * len(work)
    errors: List[BaseException] = []

    def call(i: int) -> None:
        try:
            results[i] = work[i]()
        except BaseException as e:  # noqa: BLE001 - raised below, on the caller's thread
            errors.append(e)
    threads = [threading.Thread(target=call, args=(i,), name="ckpt-read", daemon=True) for i in range(1, len(work))]
    for t in threads:
        t.start()
    call(0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]
