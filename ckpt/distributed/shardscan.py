"""Where a saved tensor's bytes lie inside a DCP shard file, found with two small reads.

Each piece DCP writes into a shard file is a ``torch.save`` archive: a zip whose
records are the tensor's small pickle, its byte order and one uncompressed storage,
then the zip's directory. :func:`scan` reads the piece's last few KiB (the directory)
and its first few hundred bytes (the pickle, the byte order and the storage's local
header), so the storage itself can be read straight into its destination; the bytes
it read come back with it, so that nothing is read twice (a file's CRC-32 is summed
over every byte once: :class:`Sums`). The pickle is read with an allow-list (a tensor
rebuilt from one storage, nothing else); anything else raises :class:`Unplaceable`
and the caller reads the piece whole (see docs/explanation/performance-internals.md).
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import Any, NamedTuple, cast

import torch

from ..io.checksum import crc32, crc32_combine

TAIL = 4096  # the zip directory of a one-tensor archive is well under 1 KiB
HEAD_SLACK = 256  # the storage's local header: its name and the alignment padding


class Unplaceable(Exception):
    """A piece that is not one plain tensor archive (read it whole instead)."""


class Stored(NamedTuple):
    dtype: torch.dtype
    offset: int  # in elements, into the storage
    size: tuple[int, ...]
    stride: tuple[int, ...]


class Layout(NamedTuple):
    """A scanned piece: its bytes ``[0, len(head))`` and ``[tail_at, length)`` were read."""

    data: int  # where the storage starts, from the piece's start
    available: int  # the storage's size in bytes
    stored: Stored
    head: bytes
    tail_at: int
    tail: bytes


def _rebuild(storage: Any, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *rest: Any) -> Stored:
    return Stored(storage, offset, tuple(size), tuple(stride))


_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
           "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
           "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
           "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
           "ComplexDoubleStorage": torch.complex128}


class _Pickle(pickle.Unpickler):
    """A saved tensor's pickle: one storage (its dtype), its offset, size and stride."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]  # the dtype itself: touching the storage class warns (deprecated)
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[2] == "0"):
            raise pickle.UnpicklingError("not a single-storage tensor")
        if not isinstance(pid[1], torch.dtype):
            raise pickle.UnpicklingError("not a typed storage")
        return pid[1]


class Sums:
    """The CRC-32 of one file from its ranges, each byte once: ranges added in order run
    on (zlib's running CRC-32); one added out of order waits, and is combined in when
    the bytes before it arrive. :meth:`crc` raises :class:`ValueError` on a gap or an overlap."""

    def __init__(self) -> None:
        self.at, self.value = 0, 0
        self.pending: list[tuple[int, int, int]] = []  # (start, length, crc) of ranges ahead of ``at``

    def add(self, start: int, data: Any) -> None:
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return
        if start != self.at:
            self.pending.append((start, view.nbytes, crc32(view)))
            return
        self.value, self.at = crc32(view, self.value), self.at + view.nbytes
        self._drain()

    def _drain(self) -> None:
        self.pending.sort()
        while self.pending and self.pending[0][0] == self.at:
            _, length, part = self.pending.pop(0)
            self.value, self.at = crc32_combine(self.value, part, length), self.at + length

    def crc(self) -> tuple[int, int]:
        """(size, CRC-32) of the bytes ``[0, size)``, every one added once."""
        self._drain()
        if self.pending:
            start = self.pending[0][0]
            raise ValueError(f"bytes {min(self.at, start)}-{max(self.at, start)} summed "
                             f"{'twice' if start < self.at else 'never'}")
        return self.at, self.value


class _Tail(io.RawIOBase):
    """An archive of ``length`` bytes of which only ``[at, length)`` is held: enough for
    :class:`zipfile.ZipFile` to read its directory; any other read raises."""

    def __init__(self, tail: bytes, at: int, length: int) -> None:
        self.tail, self.at, self.length, self.pos = tail, at, length, 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def readinto(self, b: Any) -> int:
        if self.pos < self.at:
            raise Unplaceable("the zip directory is longer than the tail read")
        data = self.tail[self.pos - self.at: self.pos - self.at + len(b)]
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def read_at(stream: Any, start: int, n: int) -> bytes:
    """``n`` bytes of ``stream`` from ``start`` (EOFError when it ends first)."""
    stream.seek(start)
    data = bytearray(n)
    view, done = memoryview(data), 0
    while done < n:
        got = stream.readinto(view[done:])
        if not got:
            raise EOFError(f"a shard file ends at byte {start + done}, inside a piece that runs to {start + n}")
        done += got
    return bytes(data)


def scan(stream: Any, offset: int, length: int) -> Layout:
    """Read the directory and the head of the piece at ``offset`` (``length`` bytes long)."""
    tail_at = max(0, length - TAIL)
    tail = read_at(stream, offset + tail_at, length - tail_at)
    try:
        with zipfile.ZipFile(_Tail(tail, tail_at, length)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error, OSError) as e:
        raise Unplaceable(f"no zip directory: {e}") from e
    pkl = next((i for i in infos if i.filename.endswith("/data.pkl")), None)
    if pkl is None:
        raise Unplaceable("no pickle")
    base = pkl.filename[: -len("data.pkl")]
    storages = [i for i in infos if i.filename.startswith(base + "data/")]
    order = next((i for i in infos if i.filename == base + "byteorder"), None)
    if len(storages) != 1 or storages[0].filename != base + "data/0" or order is None:
        raise Unplaceable("not one storage, or no byte order")
    data = storages[0]
    head_end = data.header_offset + 30 + len(data.filename.encode()) + HEAD_SLACK
    if head_end > tail_at or any(i.compress_type != zipfile.ZIP_STORED for i in (pkl, order, data)):
        raise Unplaceable("small or compressed")
    head = read_at(stream, offset, head_end)
    if _member(head, order) != b"little":
        raise Unplaceable("byte order")
    try:
        stored = _Pickle(io.BytesIO(_member(head, pkl))).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error) as e:
        raise Unplaceable(f"pickle: {e}") from e
    if not isinstance(stored, Stored):
        raise Unplaceable("not a tensor")
    start = _start(head, data)
    if start + data.file_size > tail_at + len(tail) or start > len(head):
        raise Unplaceable("the storage runs past the archive")
    return Layout(start, data.file_size, stored, head, tail_at, tail)


def _start(head: bytes, info: zipfile.ZipInfo) -> int:
    """Where ``info``'s bytes start, from its local header inside ``head``."""
    at = info.header_offset
    if head[at: at + 4] != b"PK\x03\x04" or len(head) < at + 30:
        raise Unplaceable("no local header")
    name_len, extra_len = cast(tuple[int, int], struct.unpack("<HH", head[at + 26: at + 30]))
    if head[at + 30: at + 30 + name_len] != info.filename.encode():
        raise Unplaceable("local header of another record")
    return at + 30 + name_len + extra_len


def _member(head: bytes, info: zipfile.ZipInfo) -> bytes:
    start = _start(head, info)
    if start + info.file_size > len(head):
        raise Unplaceable("a small record past the head")
    return head[start: start + info.file_size]
