"""DCP's load, reading each tensor's bytes straight into the sharded tensor it restores.

DCP's ``FileSystemReader`` ``torch.load``\\ s every saved piece into a new tensor and
copies the part it needs into the destination: a second copy of each piece, in memory.
Each piece is a ``torch.save`` archive inside the shard file, its storage an
uncompressed zip record; :class:`DirectReader` finds that record from the archive's
directory and its small pickle (read with an allow-list: a tensor rebuilt from one
storage, nothing else), and reads the needed byte range with ``readinto`` into the
destination (the live parameter or optimizer state of this rank). A piece it cannot
place this way (another dtype, a non-contiguous layout or slice, a transform, another
byte order) goes through DCP's own path; the result is the same either way.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from typing import Any, BinaryIO, NamedTuple, cast

import torch
from torch.distributed.checkpoint.filesystem import FileSystemBase
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from ..storage.trees import Tree
from .shardio import TreeReader, fsspec_layer, tiered_layer


class _Stored(NamedTuple):
    dtype: torch.dtype
    offset: int  # in elements, into the storage
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild(storage: Any, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *rest: Any) -> _Stored:
    return _Stored(storage, offset, tuple(size), tuple(stride))


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


class DirectReader(TreeReader):
    """:class:`~.shardio.TreeReader` reading tensors in place where it can (module doc);
    ``metadata``: DCP's metadata of the checkpoint, read (and checked) by the caller."""

    def __init__(self, path: str | os.PathLike[str], layer: FileSystemBase | None = None,
                 metadata: Metadata | None = None) -> None:
        super().__init__(path, layer)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None or kwargs.get("rank") is not None:
            return super().read_metadata(*args, **kwargs)
        metadata = copy.copy(self._metadata)  # DCP writes this load's id into it, as its own reader does
        metadata.storage_meta = copy.copy(metadata.storage_meta) if metadata.storage_meta else StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        rest: list[ReadItem] = []
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            md = self.storage_data[item.storage_index]
            if item.type == LoadItemType.BYTE_IO or md.transform_descriptors:
                rest.append(item)
            else:
                per_file.setdefault(md.relative_path, []).append(item)
        for rel, items in per_file.items():
            with self.fs.create_stream(self.fs.concat_path(self.path, rel), "rb") as stream:
                rest += [item for item in items if not self._direct(stream, item, planner)]
        if rest:
            super().read_data(dataclasses.replace(plan, items=rest), planner).wait()
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _direct(self, stream: Any, item: ReadItem, planner: LoadPlanner) -> bool:
        """Read ``item`` into its destination; False (nothing changed) where this cannot."""
        md = self.storage_data[item.storage_index]
        target = planner.resolve_tensor(item).detach()
        if target.device.type != "cpu" or not target.is_contiguous() or sys.byteorder != "little":
            return False
        try:
            start, available, stored = _locate(stream, md.offset, md.length)
        except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError, EOFError, struct.error):
            return False
        span = _span(stored, item.storage_offsets, item.lengths)
        if stored.dtype != target.dtype or span is None or list(target.shape) != list(item.lengths):
            return False
        first, count = span
        view = memoryview(cast(Any, target.reshape(-1).view(torch.uint8).numpy()))
        if count * target.element_size() != len(view) or (first + count) * target.element_size() > available:
            return False
        stream.seek(md.offset + start + first * target.element_size())
        _fill(stream, view)
        planner.commit_tensor(item, target)
        return True


def reader_for(tree: Tree, metadata: Metadata | None = None) -> TreeReader:
    """DCP's storage reader of a store's sharded checkpoint (:mod:`ckpt.storage.trees`),
    reading in place; ``metadata``: DCP's metadata, read already (it opens no ``.metadata``)."""
    caps = tree.capabilities()
    if caps.objects is None:
        assert caps.directory is not None  # a tree is local files, objects, or both
        return DirectReader(caps.directory, None, metadata)
    if caps.directory is not None:  # a node's cache in front of the objects
        return DirectReader("", tiered_layer(caps.directory, caps.objects.fs, caps.objects.key), metadata)
    return DirectReader(caps.objects.key, fsspec_layer(caps.objects.fs), metadata)


def _locate(stream: Any, offset: int, length: int) -> tuple[int, int, _Stored]:
    """Where the storage's bytes start in the archive at ``offset``, and the tensor's layout."""
    stream.seek(offset)
    window = _Window(stream, offset, length)
    with zipfile.ZipFile(window) as archive:  # reads the directory at the end, not the storage
        names = archive.namelist()
        pkl = next(n for n in names if n.endswith("/data.pkl"))
        base = pkl[: -len("data.pkl")]
        if [n for n in names if n.startswith(base + "data/")] != [base + "data/0"]:
            raise ValueError("not one storage")
        if archive.read(base + "byteorder") != b"little":
            raise ValueError("byte order")
        info = archive.getinfo(base + "data/0")
        stored = _Pickle(io.BytesIO(archive.read(pkl))).load()
    if info.compress_type != zipfile.ZIP_STORED or not isinstance(stored, _Stored):
        raise ValueError("compressed")
    window.seek(info.header_offset)
    header = window.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size, stored


def _span(stored: _Stored, offsets: Any, lengths: Any) -> tuple[int, int] | None:
    """(first element, count) of the slice ``offsets``/``lengths`` of a contiguous stored
    tensor when it is one contiguous range (a slice along the first dimension), else None."""
    size = stored.size
    contiguous = [1] * len(size)
    for d in range(len(size) - 2, -1, -1):
        contiguous[d] = contiguous[d + 1] * size[d + 1]
    if any(s != c for s, c, n in zip(stored.stride, contiguous, size) if n > 1) or len(offsets) != len(size):
        return None
    if any(o != 0 or n != s for o, n, s in zip(list(offsets)[1:], list(lengths)[1:], size[1:])):
        return None
    row = contiguous[0] if size else 1
    count = 1
    for n in lengths:
        count *= int(n)
    return stored.offset + (int(offsets[0]) * row if size else 0), count


def _fill(stream: BinaryIO, view: memoryview) -> None:
    done = 0
    while done < len(view):
        n = stream.readinto(view[done:])  # type: ignore[attr-defined]
        if not n:
            raise EOFError("a shard file ends inside a tensor")
        done += n


class _Window(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of ``stream`` as a file of their own (the archive)."""

    def __init__(self, stream: Any, offset: int, length: int) -> None:
        self.stream, self.offset, self.length, self.pos = stream, offset, length, 0

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
        want = max(0, min(len(b), self.length - self.pos))
        self.stream.seek(self.offset + self.pos)
        data = self.stream.read(want)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)
