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

import collections
import concurrent.futures
import contextlib
import ctypes
import io
import os
import pickle
import secrets
import struct
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..io.checksum import WRITEBACK_EVERY, crc32, crc32_combine, start_writeback

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


class Unsupported(Exception):
    """The object holds something only ``torch.save`` itself writes correctly."""


class _Hooks:
    """Stands for the empty ``OrderedDict`` of backward hooks torch pickles with every
    tensor: reduced to the same opcodes without ``OrderedDict.__reduce__``'s slow
    look-up of slot names (a fresh one per tensor, so the memo does not merge them)."""

    __slots__ = ()


class _StorageRef:
    """Stands for one storage in the pickle: pickled as torch's persistent id."""

    __slots__ = ("pid",)

    def __init__(self, pid: Tuple[Any, ...]) -> None:
        self.pid = pid


_STORAGE_TYPES: Dict[torch.dtype, Any] = {}
try:  # torch's own serialisation internals (stable since 2.x); without them, torch.save writes
    _NEW_DTYPES = frozenset(torch.storage._new_dtypes())  # written with _rebuild_tensor_v3
    _STORAGE_NAMES = torch.storage._dtype_to_storage_type_map()
    _METADATA = torch._C._get_tensor_metadata  # type: ignore[attr-defined]  # conj / neg bits
    _REBUILD = torch._utils._rebuild_tensor_v2
    _ALIGNMENT = getattr(torch.serialization, "_get_storage_alignment", lambda: 64)
    AVAILABLE = True
except AttributeError:  # pragma: no cover - another torch
    AVAILABLE = False


def _storage_type(dtype: torch.dtype) -> Any:
    """``torch.FloatStorage`` for float32 and so on: the class torch names in the pickle."""
    found = _STORAGE_TYPES.get(dtype)
    if found is None:
        name = _STORAGE_NAMES.get(dtype)
        if name is None or dtype in _NEW_DTYPES:
            raise Unsupported(f"dtype {dtype}")
        found = _STORAGE_TYPES[dtype] = getattr(torch, name)
    return found


class _Pickler(pickle.Pickler):
    """torch.save's pickler, with plain CPU tensors reduced without a detour."""

    def __init__(self, buffer: io.BytesIO) -> None:
        super().__init__(buffer, protocol=torch.serialization.DEFAULT_PROTOCOL)
        self.storages: List[torch.UntypedStorage] = []
        self._keys: Dict[int, Tuple[Tuple[Any, ...], torch.dtype]] = {}  # storage -> (persistent id, dtype)
        self._tag: Optional[str] = None

    def _expect_ref(self) -> None:
        """A storage reference is about to be pickled (see :class:`_TogglingPickler`)."""

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)  # per-tensor costs below are what a state of small tensors pays
        if kind is _Hooks:
            return _EMPTY_ORDERED_DICT
        if kind is not torch.Tensor:
            if isinstance(obj, (torch.Tensor, torch.storage.TypedStorage, torch.UntypedStorage)):
                raise Unsupported(kind.__qualname__)
            return NotImplemented
        if (not obj.is_cpu or obj.layout is not _STRIDED or obj.is_quantized
                or obj.__dict__ or obj._backward_hooks or any(getattr(obj, "names", ())) or _METADATA(obj)):
            raise Unsupported("a tensor torch serialises specially")
        storage = obj.untyped_storage()
        dtype = obj.dtype
        known = self._keys.get(storage._cdata)
        if known is None:
            if self._tag is None:  # torch's location tag: every storage here is on the CPU
                self._tag = torch.serialization.location_tag(storage)
            pid = ("storage", _STORAGE_TYPES.get(dtype) or _storage_type(dtype), str(len(self.storages)), self._tag,
                   storage.nbytes() // obj.element_size())
            self._keys[storage._cdata] = (pid, dtype)
            self.storages.append(storage)
        elif known[1] is not dtype:  # torch refuses this: let it say so
            raise Unsupported("one storage viewed with two dtypes")
        else:
            pid = (*known[0],)  # a fresh tuple, pickled afresh as torch does (not a memo reference)
        self._expect_ref()
        return (_REBUILD,
                (_StorageRef(pid), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.requires_grad, _Hooks()))


#: How :class:`_Hooks` pickles (one constant: the pickler needs no fresh tuple).
_EMPTY_ORDERED_DICT = (collections.OrderedDict, ())
_STRIDED = torch.strided


class _MethodPickler(_Pickler):
    """Asks its ``persistent_id`` method about every object pickled (as torch.save does)."""

    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if type(obj) is _StorageRef else None


#: A C callable that returns None for any object: "not persistent", at C speed.
_NOT_PERSISTENT: Callable[[Any], None] = collections.deque(maxlen=0).append


class _TogglingPickler(_Pickler):
    """The pickler calls ``persistent_id`` for every object it saves (tens of thousands
    for a state of 1,600 tensors); here it is a C no-op except between a tensor's
    reduction and its storage reference, the only place a persistent id can occur.
    Used only where a self-test shows the bytes are identical (:func:`_pickler_class`)."""

    def __init__(self, buffer: io.BytesIO) -> None:
        super().__init__(buffer)
        self._ask = self._pid
        self.persistent_id = _NOT_PERSISTENT  # type: ignore[method-assign]

    def _expect_ref(self) -> None:
        self.persistent_id = self._ask  # type: ignore[method-assign]

    def _pid(self, obj: Any) -> Any:
        if type(obj) is _StorageRef:
            self.persistent_id = _NOT_PERSISTENT  # type: ignore[method-assign]
            return obj.pid
        return None


_PICKLER: List[type] = []


def _pickler_class() -> type:
    """:class:`_TogglingPickler` where this interpreter honours the switch (CPython
    3.10-3.12 do; on 3.13 the switch has no effect), else :class:`_MethodPickler`."""
    if not _PICKLER:
        sample = {"a": [torch.zeros(2), torch.ones(3, dtype=torch.float64)], "b": ({"c": torch.arange(4)}, 1.5)}
        out = []
        for cls in (_MethodPickler, _TogglingPickler):
            buffer = io.BytesIO()
            cls(buffer).dump(sample)
            out.append(buffer.getvalue())
        _PICKLER.append(_TogglingPickler if out[0] == out[1] else _MethodPickler)
    return _PICKLER[0]


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
