"""``torch.save``'s file format, written at the disk's speed.

The file is the one ``torch.save`` writes: a zip of ``archive/data.pkl`` (the same
pickle, byte for byte), one stored record per tensor storage at a 64-byte aligned
offset, and torch's small metadata records; plain ``torch.load(weights_only=True)``
and ``mmap=True`` read it. What differs is how it is produced:

- **Pickling** skips torch's per-tensor Python detour (a ``TypedStorage`` built and
  inspected for every tensor): plain CPU tensors are reduced directly to the same
  opcodes. On a state of 1,600 small tensors that is 3x less time than ``torch.save``.
- **Writing**: the whole layout is known before a byte is written, so the records
  (local header, then data) go out in ``pwritev`` calls of about 16 MiB, in file
  order from one stream, straight from the tensors' memory (no copy through a
  buffer); a helper thread sums the next batch's CRC-32s while this one is written
  (the GIL is released for both). One stream: two, each writing a half, left the file
  in 5x more extents on ext4 (docs/explanation/performance.md).
- **The file's checksum** (CRC-32 of every byte, as the index records) is combined
  from the records' CRCs, so no byte is summed twice for large records.

Anything this fast path does not reproduce exactly (a tensor subclass or one with
Python attributes, a non-CPU, sparse, quantized or conjugated tensor, a new dtype)
raises :class:`Unsupported` before anything is written, and the caller uses
``torch.save`` itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import io
import os
import secrets
import struct
import sys
import threading
from typing import Any, Callable, List, Optional, Tuple

import torch

from ..io.checksum import WRITEBACK_EVERY, crc32, crc32_combine, start_writeback
from .torchpickle import _ALIGNMENT, AVAILABLE, _pickler_class
from .torchpickle import Unsupported as Unsupported  # raised by Plan(), caught by its callers

#: Records at least this large take their place in the file's CRC by combining (one
#: pass over their bytes); smaller ones are summed a second time (cheaper than combining).
COMBINE_MIN = 256 << 10
#: Below this many bytes of tensor data one thread sums and writes everything.
PARALLEL_MIN = 32 << 20
#: Writer streams for large states, each its share of the file (more fragment it on ext4).
WRITERS = 1
#: At most this many buffers per ``pwritev`` (Linux's IOV_MAX is 1024).
IOV_MAX = 1024
#: Zip fields of 32 bits (16 for counts) overflow at these values; tests lower them.
ZIP32_LIMIT = 0xFFFFFFFF
ZIP16_LIMIT = 0xFFFF
_FULL32, _FULL16 = 0xFFFFFFFF, 0xFFFF  # "see the zip64 field" in a 32 (16) bit field

_ARCHIVE = "archive/"
_PAD_ID = b"FB"  # torch's padding extra field, which aligns record data
_DATE = 0x21  # 1980-01-01 in DOS format (torch writes 0, which is not a date)
_PWRITEV = getattr(os, "pwritev", None)


class _Record:
    """One zip entry: its name and bytes, where it goes, and once summed its CRC and header."""

    __slots__ = ("name", "data", "offset", "zip64", "pad", "crc", "head", "end")

    def __init__(self, name: bytes, data: memoryview, offset: int, alignment: int) -> None:
        self.name, self.data, self.offset = name, data, offset
        self.zip64 = len(data) >= ZIP32_LIMIT or offset >= ZIP32_LIMIT
        fixed = 30 + len(name) + (20 if self.zip64 else 0) + 4
        self.pad = -(offset + fixed) % alignment  # torch's padding field aligns the data
        self.crc, self.head = 0, b""
        self.end = offset + fixed + self.pad + len(data)

    def sum(self) -> bytes:
        """Sum the data and build the local header (which holds the CRC); the header."""
        self.crc = crc32(self.data)
        size = len(self.data)
        pad = _PAD_ID + _U16.pack(self.pad) + b"Z" * self.pad
        if self.zip64:
            extra = _ZIP64_EXTRA.pack(1, 16, size, size) + pad
            fixed = _LOCAL.pack(0x04034B50, 45, 0, 0, 0, _DATE, self.crc, _FULL32, _FULL32, len(self.name), len(extra))
        else:
            extra = pad
            fixed = _LOCAL.pack(0x04034B50, 20, 0, 0, 0, _DATE, self.crc, size, size, len(self.name), len(extra))
        self.head = b"".join((fixed, self.name, extra))
        return self.head

    def central(self) -> bytes:
        """The central directory entry."""
        size, extra = len(self.data), b""
        big_size, big_offset = size >= ZIP32_LIMIT, self.offset >= ZIP32_LIMIT
        if big_size:
            extra += struct.pack("<QQ", size, size)
        if big_offset:
            extra += struct.pack("<Q", self.offset)
        if extra:
            extra = struct.pack("<HH", 1, len(extra)) + extra
        version = 45 if extra else 20
        small = _FULL32 if big_size else size
        return b"".join((_CENTRAL.pack(0x02014B50, version, version, 0, 0, 0, _DATE, self.crc, small, small,
                                       len(self.name), len(extra), 0, 0, 0, 0, _FULL32 if big_offset else self.offset),
                         self.name, extra))


#: The zip structures written once per record, compiled once (a record per tensor).
_LOCAL, _CENTRAL = struct.Struct("<IHHHHHIIIHH"), struct.Struct("<IHHHHHHIIIHHHHHII")
_ZIP64_EXTRA, _U16 = struct.Struct("<HHQQ"), struct.Struct("<H")


def _view(storage: torch.UntypedStorage) -> memoryview:
    """The storage's bytes, read-only and without a copy (the caller keeps the storage alive)."""
    n = storage.nbytes()
    if n == 0:
        return memoryview(b"")
    if _FROM_MEMORY is not None:
        return _FROM_MEMORY(storage.data_ptr(), n, _PYBUF_READ)  # type: ignore[no-any-return]
    return memoryview((ctypes.c_ubyte * n).from_address(storage.data_ptr()))  # pragma: no cover


_FROM_MEMORY: Optional[Any]
try:  # one C call per view (a ctypes array type per size costs 40x more)
    _FROM_MEMORY = ctypes.pythonapi.PyMemoryView_FromMemory
    _FROM_MEMORY.restype = ctypes.py_object
    _FROM_MEMORY.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
except AttributeError:  # pragma: no cover - not CPython
    _FROM_MEMORY = None
_PYBUF_READ = 0x100


class Plan:
    """One object, pickled and laid out as a torch zip file, ready to be written.

    Raises :class:`Unsupported` (having written nothing) for what only torch.save writes.
    """

    def __init__(self, obj: Any) -> None:
        if not AVAILABLE:
            raise Unsupported("this torch lacks the serialisation internals the fast path uses")
        buffer = io.BytesIO()
        pickler = _pickler_class()(buffer)
        pickler.dump(obj)
        self._storages = pickler.storages  # the records point into their memory
        alignment = int(_ALIGNMENT())
        first = [("data.pkl", buffer.getvalue()), (".format_version", b"1"),
                 (".storage_alignment", str(alignment).encode()), ("byteorder", sys.byteorder.encode())]
        last = [("version", b"3\n"), (".data/serialization_id", str(secrets.randbits(128)).zfill(40).encode())]
        named = ([((_ARCHIVE + n).encode(), memoryview(d)) for n, d in first]
                 + [(f"{_ARCHIVE}data/{i}".encode(), _view(s)) for i, s in enumerate(self._storages)]
                 + [((_ARCHIVE + n).encode(), memoryview(d)) for n, d in last])
        self.records: List[_Record] = []
        at = 0
        for name, data in named:
            self.records.append(_Record(name, data, at, alignment))
            at = self.records[-1].end
        self.data_end = at
        self.nbytes = sum(s.nbytes() for s in self._storages)

    def write(self, fd: int, on_write: Optional[Callable[[int], object]] = None) -> Tuple[int, int]:
        """Write the file into ``fd`` (empty, open for writing) from offset 0; return its
        size and CRC-32. The caller fsyncs."""
        groups, progress = self._groups(), _Locked(on_write)
        threads = len(groups) if len(groups) > 1 else int(self.nbytes >= PARALLEL_MIN)  # 1: sums ahead
        with (concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="ckpt-write") if threads
              else contextlib.nullcontext()) as pool:
            if pool is None or len(groups) == 1:
                _write_group(fd, groups[0], progress, pool)
            else:
                for done in [pool.submit(_write_group, fd, g, progress) for g in groups]:
                    done.result()
        tail = self._end()
        _pwrite_all(fd, [memoryview(tail)], self.data_end)
        return self.data_end + len(tail), self._file_crc(tail)

    def stream(self, f: Any) -> None:
        """Write the file in order into the file-like ``f`` (an upload stream)."""
        for rec in self.records:
            f.write(rec.sum())
            f.write(rec.data)
        f.write(self._end())

    def _end(self) -> bytes:
        """Central directory, zip64 end record and locator, end record (as torch writes them)."""
        directory = b"".join(rec.central() for rec in self.records)
        count, at = len(self.records), self.data_end
        end64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(directory), at)
        locator = struct.pack("<IIQI", 0x07064B50, 0, at + len(directory), 1)
        count16 = count if count < ZIP16_LIMIT else _FULL16
        end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count16, count16,
                          len(directory) if len(directory) < ZIP32_LIMIT else _FULL32,
                          at if at < ZIP32_LIMIT else _FULL32, 0)
        return directory + end64 + locator + end

    def _groups(self) -> List[List[_Record]]:
        """Runs of consecutive records of about equal bytes, one per writer thread."""
        threads = min(WRITERS, os.cpu_count() or 1) if self.nbytes >= PARALLEL_MIN else 1
        share = self.data_end / threads
        groups: List[List[_Record]] = [[] for _ in range(threads)]
        for rec in self.records:
            groups[min(threads - 1, int(rec.offset / share))].append(rec)
        return [g for g in groups if g]

    def _file_crc(self, tail: bytes) -> int:
        """CRC-32 of the whole file, from the records' sums where that is cheaper."""
        crc: int = 0
        for rec in self.records:
            crc = crc32(rec.head, crc)
            crc = crc32_combine(crc, rec.crc, len(rec.data)) if len(rec.data) >= COMBINE_MIN else crc32(rec.data, crc)
        return int(crc32(tail, crc))


class _Locked:
    """Progress callbacks from several writer threads, one at a time."""

    def __init__(self, on_write: Optional[Callable[[int], object]]) -> None:
        self._on_write = on_write
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        if self._on_write is not None:
            with self._lock:
                self._on_write(n)


def _write_group(fd: int, records: List[_Record], progress: _Locked,
                 ahead: Optional[concurrent.futures.Executor] = None) -> None:
    """Sum, then write, consecutive records in batches of ``WRITEBACK_EVERY`` (one ``pwritev``
    each, then the kernel's writeback); with ``ahead``, the next batch is summed there meanwhile."""
    batches = _batches(records)
    flushed = records[0].offset
    pending = ahead.submit(_sum, batches[0]) if ahead is not None else None
    for i, batch in enumerate(batches):
        if ahead is None or pending is None:
            _sum(batch)
        else:
            pending.result()
            pending = ahead.submit(_sum, batches[i + 1]) if i + 1 < len(batches) else None
        start, end = batch[0].offset, batch[-1].end
        _pwrite_all(fd, [v for rec in batch for v in (memoryview(rec.head), rec.data)], start)
        progress(end - start)
        if end - flushed >= WRITEBACK_EVERY:
            start_writeback(fd, flushed, end)
            flushed = end


def _batches(records: List[_Record]) -> List[List[_Record]]:
    """Runs of records, each ending once it spans ``WRITEBACK_EVERY`` or before ``IOV_MAX``."""
    out: List[List[_Record]] = [[]]
    for rec in records:
        if out[-1] and (2 * len(out[-1]) + 2 > IOV_MAX or out[-1][-1].end - out[-1][0].offset >= WRITEBACK_EVERY):
            out.append([])
        out[-1].append(rec)
    return out


def _sum(batch: List[_Record]) -> List[bytes]:
    return [rec.sum() for rec in batch]


def _pwrite_all(fd: int, buffers: List[memoryview], offset: int) -> None:
    """Write ``buffers`` contiguously from ``offset``, resuming after short writes."""
    views, first = [b for b in buffers if len(b)], 0
    while first < len(views):
        n = _PWRITEV(fd, views[first:first + IOV_MAX], offset) if _PWRITEV else os.pwrite(fd, views[first], offset)
        if n <= 0:
            raise OSError(f"wrote nothing at offset {offset}")
        offset += n
        while first < len(views) and n >= len(views[first]):
            n -= len(views[first])
            first += 1
        if n:
            views[first] = views[first][n:]
