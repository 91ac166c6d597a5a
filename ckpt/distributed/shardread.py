"""DCP's load, reading each tensor's bytes straight into the sharded tensor it restores,
and each shard file's CRC-32 in the same pass.

DCP's ``FileSystemReader`` ``torch.load``\\ s every saved piece into a new tensor and
copies the part it needs into the destination: a second copy of each piece, in memory.
Each piece is a ``torch.save`` archive inside the shard file, its storage an
uncompressed zip record; :class:`DirectReader` finds that record with two small reads
(:func:`~.shardscan.scan`: the archive's directory, then its head with the small
pickle, read with an allow-list), and reads the needed byte range with ``readinto``
into the destination (the live parameter or optimizer state of this rank). A small
piece, or one it cannot place this way (another dtype, a non-contiguous layout or
slice, a non-tensor entry), is read whole in one read and loaded from memory as DCP
does; one with a transform goes through DCP's own path. The result is the same either way.

Verifying while loading (``expected``: the manifest's size and CRC-32 of each shard
file): DCP's coordinator hands every file to one rank, the one that reads most of it
(:func:`owners`); that rank reads the whole file once, the bytes it restores straight
into their tensors and the rest (other ranks' pieces, zip headers) into a scratch
buffer, and sums every byte as it goes (:class:`~.shardscan.Sums`). A file whose size
or CRC-32 differs raises :class:`~ckpt.errors.CorruptCheckpointError` from the read,
which DCP reports to every rank, so all ranks fail the load together and resume chooses
an older checkpoint. The tensors were written before their file was verified: they are
plain bytes landing in preallocated tensors of fixed size (no pickle of them is
trusted), and a failed load is followed by a full load of another checkpoint, or by an
error (see docs/explanation/performance-internals.md).
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
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePath, PurePosixPath
from typing import Any, BinaryIO, cast

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.filesystem import FileSystemBase
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from ..errors import CkptError, CorruptCheckpointError, wrapped
from ..format import torchio
from ..storage.trees import Tree
from .shardio import TreeReader, fsspec_layer, tiered_layer
from .shardscan import Layout, Stored, Sums, Unplaceable, _Pickle, read_at, scan

SMALL = 64 << 10  # a piece this small is read whole, in one read
CHUNK = 1 << 20  # the scratch buffer for the bytes a rank sums but does not restore
Expected = Mapping[str, Mapping[str, int]]
class DirectReader(TreeReader):
    """:class:`~.shardio.TreeReader` reading tensors in place where it can (module doc);
    ``metadata``: DCP's metadata of the checkpoint, read (and checked) by the caller;
    ``expected``: the size and CRC-32 of the shard files to verify while loading (None:
    none verified); ``where``: a file's path as errors show it."""

    def __init__(self, path: str | os.PathLike[str], layer: FileSystemBase | None = None,
                 metadata: Metadata | None = None, expected: Expected | None = None,
                 where: Callable[[str], PurePath] | None = None) -> None:
        super().__init__(path, layer)
        self._metadata = metadata
        self._expected = None if expected is None else {k: dict(v) for k, v in expected.items()}
        self._where = where or (lambda rel: PurePosixPath(os.fspath(self.fs.concat_path(self.path, rel))))
        self._scratch = memoryview(bytearray(CHUNK))
        #: Bytes this rank read of each file and which files it summed (for tests and benchmarks).
        self.summed: dict[str, tuple[int, int]] = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None or kwargs.get("rank") is not None:
            return super().read_metadata(*args, **kwargs)
        metadata = copy.copy(self._metadata)  # DCP writes this load's id into it, as its own reader does
        metadata.storage_meta = copy.copy(metadata.storage_meta) if metadata.storage_meta else StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """The coordinator: each rank's plan names the files it sums whole (:func:`owners`)."""
        plans = super().prepare_global_plan(plans)
        if self._expected is None:
            return plans
        owned = owners(plans, self.storage_data, self._expected)
        return [dataclasses.replace(plan, storage_data=tuple(mine)) for plan, mine in zip(plans, owned)]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        owned = set(plan.storage_data or ()) if self._expected is not None else set()
        rest: list[ReadItem] = []
        per_file: dict[str, dict[int, list[ReadItem]]] = {}
        for item in plan.items:
            md = self.storage_data[item.storage_index]
            if md.transform_descriptors:
                rest.append(item)
            else:
                per_file.setdefault(md.relative_path, {}).setdefault(md.offset, []).append(item)
        transformed = {self.storage_data[item.storage_index].relative_path for item in rest}
        for rel in sorted(set(per_file) | owned):
            sums = Sums() if rel in owned and rel not in transformed else None
            try:
                with self.fs.create_stream(self.fs.concat_path(self.path, rel), "rb") as stream:
                    self._file(stream, rel, per_file.get(rel, {}), planner, sums)
            except OSError as e:  # a file the manifest lists is gone or unreadable: damage too
                raise wrapped(CorruptCheckpointError, "a file of the checkpoint is unreadable", e,
                              path=self._where(rel), hint="the checkpoint was damaged after its save; resume() "
                                                          "takes the previous one") from e
            if sums is not None:
                self.summed[rel] = sums.crc()
        if rest:
            super().read_data(dataclasses.replace(plan, items=rest), planner).wait()
        for rel in sorted(owned & transformed):  # ckpt writes no transforms: a second read, rare
            with self.fs.create_stream(self.fs.concat_path(self.path, rel), "rb") as stream:
                sums = Sums()
                self._skim(stream, 0, None, sums)
                self.summed[rel] = sums.crc()
        self._check(sorted(owned))
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _check(self, owned: Sequence[str]) -> None:
        """Raise :class:`CorruptCheckpointError` naming every summed file that differs from the manifest."""
        expected = self._expected or {}
        bad = [rel for rel in owned if self.summed.get(rel) != (expected[rel]["size"], expected[rel]["crc32"])]
        if bad:
            (size, crc), want = self.summed[bad[0]], expected[bad[0]]
            raise CorruptCheckpointError(
                f"checksum mismatch: {size} bytes, CRC-32 {crc:08x}; the manifest says {want['size']} bytes, "
                f"{want['crc32']:08x}" + (f" (damaged too: {', '.join(bad[1:])})" if bad[1:] else ""),
                path=self._where(bad[0]), hint="the checkpoint was damaged after its save; resume() takes the "
                                               "previous one")

    def _file(self, stream: Any, rel: str, pieces: dict[int, list[ReadItem]], planner: LoadPlanner,
              sums: Sums | None) -> None:
        """This rank's pieces of ``rel``; with ``sums``, every byte of the file, summed once."""
        layout = {md.offset: md for md in self.storage_data.values() if md.relative_path == rel}
        for offset in sorted(layout if sums is not None else pieces):
            md = layout[offset]
            if sums is not None and offset > sums.at:
                self._skim(stream, sums.at, offset, sums)
            if offset in pieces:
                self._piece(stream, rel, md.offset, md.length, pieces[offset], planner, sums)
            elif sums is not None and offset == sums.at:
                self._skim(stream, offset, offset + md.length, sums)
        if sums is not None:
            self._skim(stream, sums.at, None, sums)  # to the end: its size is checked too

    def _skim(self, stream: Any, start: int, end: int | None, sums: Sums) -> None:
        """Sum the bytes ``[start, end)`` (``None``: to the end of the file) through the scratch buffer."""
        stream.seek(start)
        at = start
        while end is None or at < end:
            want = CHUNK if end is None else min(CHUNK, end - at)
            got = stream.readinto(self._scratch[:want])
            if not got:
                if end is not None:
                    raise EOFError(f"a shard file ends at byte {at}, before {end}")
                return
            sums.add(at, self._scratch[:got])
            at += got

    def _piece(self, stream: Any, rel: str, offset: int, length: int, items: list[ReadItem],
               planner: LoadPlanner, sums: Sums | None) -> None:
        """Restore ``items``, all from the piece at ``offset``: in place, or from the piece read whole."""
        try:
            layout = None
            if length > SMALL and all(item.type != LoadItemType.BYTE_IO for item in items):
                try:
                    layout = scan(stream, offset, length)
                except Unplaceable:
                    layout = None
            ranges = None if layout is None else _ranges(layout, items, planner)
            if layout is not None and ranges is not None:
                self._direct(stream, offset, layout, ranges, sums)
                for item, _, target in ranges:
                    planner.commit_tensor(item, target)
                return
            data = _whole(stream, offset, length, layout)
            if sums is not None:
                sums.add(offset, data)
            for item in items:
                _from_memory(data, item, planner)
        except CkptError:
            raise  # an unsafe pickle stays UnsafeCheckpointError
        except Exception as e:  # noqa: BLE001 - what a damaged piece makes a decoder raise varies
            raise CorruptCheckpointError(f"the piece at bytes {offset}-{offset + length} does not load: "
                                         f"{type(e).__name__}: {e}", path=self._where(rel),
                                         hint="the checkpoint was damaged after its save; "
                                              "resume() takes the previous one") from e

    def _direct(self, stream: Any, offset: int, layout: Layout, ranges: list[tuple[ReadItem, int, torch.Tensor]],
                sums: Sums | None) -> None:
        """Read each range's bytes into its tensor; the head and tail read already are copied
        from; with ``sums``, the bytes between the ranges too (into the scratch buffer)."""
        head, tail_at, tail = layout.head, layout.tail_at, layout.tail
        if sums is not None:
            sums.add(offset, head)
        at = len(head)
        for _, start, target in ranges:
            view = _bytes_of(target)
            end = start + len(view)
            if start < len(head):
                view[: min(end, len(head)) - start] = head[start: min(end, len(head))]
            if end > tail_at:
                view[max(start, tail_at) - start:] = tail[max(start, tail_at) - tail_at: end - tail_at]
            lo, hi = max(start, len(head)), min(end, tail_at)
            if lo >= hi:
                continue
            if sums is not None and lo > at:
                self._skim(stream, offset + at, offset + lo, sums)
            stream.seek(offset + lo)
            _fill(stream, view[lo - start: hi - start])
            if sums is not None:
                sums.add(offset + lo, view[lo - start: hi - start])
            at = hi
        if sums is not None:
            if tail_at > at:
                self._skim(stream, offset + at, offset + tail_at, sums)
            sums.add(offset + tail_at, tail)


def owners(plans: Sequence[LoadPlan], storage_data: Mapping[Any, Any], files: Expected) -> list[list[str]]:
    """Which rank sums each of ``files`` whole: the one whose plan reads most of its bytes
    (the lowest such rank on a tie); a file no rank reads goes to the rank summing the
    fewest bytes so far. In a load at the saving world size each rank sums its own files."""
    reads: list[dict[str, int]] = [{} for _ in plans]
    for mine, plan in zip(reads, plans):
        for index in {item.storage_index for item in plan.items}:
            md = storage_data[index]
            mine[md.relative_path] = mine.get(md.relative_path, 0) + md.length
    owned: list[list[str]] = [[] for _ in plans]
    total = [0] * len(plans)
    for rel in sorted(files, key=lambda f: (-int(files[f]["size"]), f)):
        got = [mine.get(rel, 0) for mine in reads]
        ranks = range(len(plans))
        rank = (min(ranks, key=lambda r: (-got[r], r)) if any(got) else min(ranks, key=lambda r: (total[r], r)))
        owned[rank].append(rel)
        total[rank] += int(files[rel]["size"])
    return owned


def reader_for(tree: Tree, metadata: Metadata | None = None, expected: Expected | None = None) -> DirectReader:
    """DCP's storage reader of a store's sharded checkpoint (:mod:`ckpt.storage.trees`),
    reading in place; ``metadata``: DCP's metadata, read already (it opens no ``.metadata``);
    ``expected``: the files to verify while loading (:class:`DirectReader`)."""
    caps = tree.capabilities()
    where = tree.where
    if caps.objects is None:
        assert caps.directory is not None  # a tree is local files, objects, or both
        return DirectReader(caps.directory, None, metadata, expected, where)
    if caps.directory is not None:  # a node's cache in front of the objects
        return DirectReader("", tiered_layer(caps.directory, caps.objects.fs, caps.objects.key), metadata,
                            expected, where)
    return DirectReader(caps.objects.key, fsspec_layer(caps.objects.fs), metadata, expected, where)


def _ranges(layout: Layout, items: list[ReadItem],
            planner: LoadPlanner) -> list[tuple[ReadItem, int, torch.Tensor]] | None:
    """(item, where its bytes start in the piece, its tensor) of every item, in order, or
    None when one cannot be read in place or two overlap."""
    out = []
    for item in items:
        target = planner.resolve_tensor(item).detach()
        start = _placed(layout.stored, layout.data, layout.available, item, target)
        if start is None:
            return None
        out.append((item, start, target))
    out.sort(key=lambda x: x[1])
    ends = [start + x[2].numel() * x[2].element_size() for x in out for start in (x[1],)]
    if any(out[i + 1][1] < ends[i] for i in range(len(out) - 1)):
        return None
    return out


def _placed(stored: Stored, data: int, available: int, item: ReadItem, target: torch.Tensor) -> int | None:
    """Where ``item``'s bytes start in its piece, when they can be read into ``target`` as they are."""
    if target.device.type != "cpu" or not target.is_contiguous() or sys.byteorder != "little":
        return None
    span = _span(stored, item.storage_offsets, item.lengths)
    if stored.dtype != target.dtype or span is None or list(target.shape) != list(item.lengths):
        return None
    first, count = span
    size = target.element_size()
    if count != target.numel() or (first + count) * size > available:
        return None
    return data + first * size


def _whole(stream: Any, offset: int, length: int, layout: Layout | None) -> bytes:
    """The piece's bytes, those ``layout`` read already not read again."""
    if layout is None:
        return read_at(stream, offset, length)
    middle = read_at(stream, offset + len(layout.head), layout.tail_at - len(layout.head))
    return layout.head + middle + layout.tail


def _from_memory(data: bytes, item: ReadItem, planner: LoadPlanner) -> None:
    """Restore ``item`` from its piece's bytes: in place from memory, else as DCP's reader does."""
    if item.type == LoadItemType.BYTE_IO:
        planner.load_bytes(item, io.BytesIO(data))
        return
    target = planner.resolve_tensor(item).detach()
    try:
        layout = _scan_bytes(data)
        start = _placed(layout[2], layout[0], layout[1], item, target)
    except (Unplaceable, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError, EOFError, struct.error):
        start = None
    if start is not None:
        view = _bytes_of(target)
        view[:] = data[start: start + len(view)]
    else:
        tensor = narrow_tensor_by_index(torchio.load(io.BytesIO(data)),
                                        item.storage_offsets, item.lengths)
        if target.size() != tensor.size():
            raise ValueError(f"a saved piece holds {tuple(tensor.size())}, the tensor is {tuple(target.size())}")
        target.copy_(tensor)
    planner.commit_tensor(item, target)


def _scan_bytes(data: bytes) -> tuple[int, int, Stored]:
    """(storage start, its size, the tensor's layout) of a one-tensor archive held in memory."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        pkl = next(n for n in names if n.endswith("/data.pkl"))
        base = pkl[: -len("data.pkl")]
        if [n for n in names if n.startswith(base + "data/")] != [base + "data/0"]:
            raise Unplaceable("not one storage")
        if archive.read(base + "byteorder") != b"little":
            raise Unplaceable("byte order")
        info = archive.getinfo(base + "data/0")
        stored = _Pickle(io.BytesIO(archive.read(pkl))).load()
    if info.compress_type != zipfile.ZIP_STORED or not isinstance(stored, Stored):
        raise Unplaceable("compressed")
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size, stored


def _bytes_of(target: torch.Tensor) -> memoryview:
    return memoryview(cast(Any, target.reshape(-1).view(torch.uint8).numpy()))


def _span(stored: Stored, offsets: Any, lengths: Any) -> tuple[int, int] | None:
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
