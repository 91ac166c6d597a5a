"""Resume without a second copy: read each tensor record of a checkpoint into the memory it ends in.

A torch-format file stores every storage as an uncompressed zip record at a known
offset. Here the pickle is unpickled first (torch's ``weights_only`` unpickler, the
same allow-list as ``torch.load``) with storages that are allocated but not yet
filled; then the file is read once, in order, every byte summed into the file's
CRC-32: records of storages that stay (optimizer state: ``load_state_dict`` keeps the
tensors it is given) are read into their storage, records whose destination is a
live tensor of the same shape, dtype and layout (a module's parameters and buffers)
are only summed (their pages stay in the page cache). Only once the whole file
matches its recorded checksum is anything applied: :attr:`Loaded.fill` then reads
those records from the page cache straight into the live tensors, checking each
record's CRC-32 again. Anything this cannot do exactly as ``torch.load`` would (a
legacy or compressed file, another byte order, ``weights_only=False``, a map_location
other than one device) returns None, and the caller loads the usual way. See
docs/explanation/performance-internals.md.
"""

from __future__ import annotations

import ctypes
import functools
import io
import os
import struct
import sys
import weakref
import zipfile
from bisect import bisect_right
from pathlib import PurePath
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..errors import CorruptCheckpointError
from ..io import pipelined
from ..io.checksum import READ_CHUNK, crc32, format_checksum
from ..progress import Progress

#: A place in a loaded checkpoint whose tensor may be read into ``dest`` instead:
#: (container, key, dest) with ``container[key]`` the loaded tensor.
Target = Tuple[Any, Any, torch.Tensor]
Targets = Callable[[Any], List[Target]]


class Loaded(dict):  # type: ignore[type-arg]
    """A loaded checkpoint dict whose module tensors are the live tensors, not yet filled.

    ``owned``: its other tensors are fresh memory (not a file mapping), to be kept as
    they are. Call :meth:`fill` (once) after every check passed, before using it.
    """

    owned = True

    def __init__(self, obj: Dict[str, Any], filler: Optional[_Filler]) -> None:
        super().__init__(obj)
        self._filler = filler

    def fill(self) -> None:
        if self._filler is not None:
            filler, self._filler = self._filler, None
            filler.run()


class _Record:
    __slots__ = ("key", "offset", "size", "view", "dest", "crc")

    def __init__(self, key: str, offset: int, size: int) -> None:
        self.key, self.offset, self.size = key, offset, size
        self.view: Optional[memoryview] = None  # fresh storage to read into
        self.dest: Optional[torch.Tensor] = None  # live tensor, filled after the checks
        self.crc = 0  # of the record, summed in the first pass when it has a dest


def load(fd: int, path: PurePath, *, checksum: Optional[str], map_location: Any,
         targets: Targets, progress: Optional[bool] = None) -> Optional[Loaded]:
    """The checkpoint in ``fd``, verified against ``checksum``, with ``targets``'s tensors
    left to :meth:`Loaded.fill`; None where only ``torch.load`` can load it."""
    device = _device(map_location)
    if checksum is None or device is None or (device.type == "cuda" and not torch.cuda.is_available()):
        return None
    pipelined.prefetch(fd, PREFETCH)  # the disk starts on the data while the pickle is read
    try:
        layout = _layout(fd)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, KeyError):
        return None  # not for this reader: torch.load's path examines it
    if layout is None:
        return None
    prefix, infos, size = layout
    pkl = _read_record(fd, infos[prefix + "data.pkl"])
    records: Dict[str, _Record] = {}
    storages: Dict[str, Tuple[torch.UntypedStorage, torch.dtype]] = {}
    try:
        obj = _unpickle(pkl, prefix, infos, records, storages)
    except Exception:  # noqa: BLE001 - refused or odd pickles: torch.load raises the typed error
        return None
    if not isinstance(obj, dict) or any(st.nbytes() != records[k].size for k, (st, _) in storages.items()):
        return None
    direct = _direct(obj, targets, records, storages)
    for key, (st, _) in storages.items():
        if records[key].dest is None and st.nbytes():
            records[key].view = _memory(st)
    ordered = sorted(records.values(), key=lambda r: r.offset)
    fresh = [(storages[r.key][0].data_ptr(), r.size) for r in ordered if r.view is not None and r.size >= DIRECT_MIN]
    with Progress(f"verifying {path.name}", size, progress) as bar:
        actual = format_checksum(_first_pass(fd, ordered, size, path, bar.update, fresh))
    if actual != checksum:
        raise CorruptCheckpointError(f"checksum mismatch (recorded {checksum}, file has {actual}): the file is "
                                     "damaged", path=path,
                                     hint="ckpt skips it on resume; restore an earlier checkpoint")
    if device.type != "cpu":
        obj = _to_device(obj, device)
    filler = _Filler(os.dup(fd), [r for r in ordered if r.dest is not None], path) if direct else None
    return Loaded(obj, filler)


def _device(map_location: Any) -> Optional[torch.device]:
    """The one device every tensor goes to, or None (a dict or callable map_location, or
    None: tensors go where they were saved, which torch.load's path checks)."""
    if map_location is None:
        return None
    if isinstance(map_location, (str, torch.device)):
        try:
            device = torch.device(map_location)
        except (RuntimeError, TypeError):
            return None
        return device if device.type in ("cpu", "cuda") else None
    return None


def _layout(fd: int) -> Optional[Tuple[str, Dict[str, Tuple[int, int, int]], int]]:
    """(record prefix, name -> (data offset, size, crc), file size) of a plain torch archive."""
    size = os.fstat(fd).st_size
    with os.fdopen(os.dup(fd), "rb") as f, zipfile.ZipFile(f) as archive:
        infos: Dict[str, Tuple[int, int, int]] = {}
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > size \
                    or info.compress_size != info.file_size:
                return None  # check_layout refuses it with its message
            head = os.pread(fd, 30, info.header_offset)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            infos[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size, info.CRC)
    pkl = [n for n in infos if n.endswith("/data.pkl")]
    if len(pkl) != 1:
        return None
    prefix = pkl[0][: -len("data.pkl")]
    order = infos.get(prefix + "byteorder")
    if order is not None and _read_record(fd, order) != sys.byteorder.encode():
        return None
    if order is None and sys.byteorder != "little":
        return None
    return prefix, infos, size


def _read_record(fd: int, info: Tuple[int, int, int]) -> bytes:
    offset, size, crc = info
    data = os.pread(fd, size, offset)
    if len(data) != size or crc32(data) != crc:
        raise zipfile.BadZipFile("a record fails its CRC-32")
    return data


def _unpickle(pkl: bytes, prefix: str, infos: Dict[str, Tuple[int, int, int]], records: Dict[str, _Record],
              storages: Dict[str, Tuple[torch.UntypedStorage, torch.dtype]]) -> Any:
    """The pickle, through torch's weights_only unpickler, storages allocated unfilled."""
    from torch import _weights_only_unpickler

    def persistent_load(saved_id: Any) -> Any:
        kind, storage_type, key, _location, numel = saved_id
        if kind not in ("storage", b"storage"):
            raise ValueError("not a storage")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in storages:
            offset, size, _ = infos[f"{prefix}data/{key}"]
            records[key] = _Record(key, offset, size)
            # allocated, not touched: pages that are never written are never resident
            nbytes = numel * torch._utils._element_size(dtype)  # type: ignore[no-untyped-call]
            storages[key] = (torch.UntypedStorage(nbytes), dtype)  # type: ignore[no-untyped-call]
        st, _ = storages[key]
        return torch.storage.TypedStorage(wrap_storage=st, dtype=dtype, _internal=True)  # type: ignore[no-untyped-call]

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pkl), encoding="utf-8")
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    return unpickler.load()  # type: ignore[no-untyped-call]


def _direct(obj: Any, targets: Targets, records: Dict[str, _Record],
            storages: Dict[str, Tuple[torch.UntypedStorage, torch.dtype]]) -> bool:
    """Swap each target whose record can be read straight into its dest; True if any."""
    by_ptr = {st.data_ptr(): key for key, (st, _) in storages.items() if st.nbytes()}
    users: Dict[int, int] = {}
    _count_users(obj, users, set())
    found = False
    for container, key, dest in targets(obj):
        t = container[key]
        if not (isinstance(t, torch.Tensor) and type(t) is torch.Tensor and not t.requires_grad):
            continue
        skey = by_ptr.get(t.untyped_storage().data_ptr())
        if skey is None or users.get(t.untyped_storage().data_ptr()) != 1 or records[skey].dest is not None:
            continue
        if not (t.storage_offset() == 0 and t.is_contiguous() and t.nbytes == records[skey].size
                and dest.shape == t.shape and dest.dtype == t.dtype and dest.is_contiguous()
                and not dest.requires_grad and dest.device.type in ("cpu", "cuda")):
            continue  # fall back: the fresh tensor is read and copied in by load_state_dict
        records[skey].dest = dest
        container[key] = dest
        found = True
    return found


def _count_users(obj: Any, users: Dict[int, int], seen: set) -> None:  # type: ignore[type-arg]
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        users[ptr] = users.get(ptr, 0) + 1
    elif isinstance(obj, (dict, list, tuple)) and id(obj) not in seen:
        seen.add(id(obj))
        for v in obj.values() if isinstance(obj, dict) else obj:
            _count_users(v, users, seen)


def _memory(st: torch.UntypedStorage) -> memoryview:
    """The bytes of a CPU storage, writable (the storage must outlive the view)."""
    return _at(st.data_ptr(), st.nbytes())


def _at(address: int, size: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")


#: Bytes from the start of the file the kernel is asked to read ahead at once.
PREFETCH = 32 << 20
#: Records at least this large are read straight into their fresh storage; smaller
#: ones arrive in runs through a bounce buffer (one read for many of them).
DIRECT_MIN = 1 << 20


def _first_pass(fd: int, ordered: List[_Record], size: int, path: PurePath, update: Callable[[int], None],
                fresh: List[Tuple[int, int]]) -> int:
    """Read the whole file once, in order; fresh records land in their storage, direct
    ones are summed; the CRC-32 of every byte is returned. The reads run on a helper
    thread while this one sums, and ``fresh`` (address, size) memory is faulted in ahead
    of them (see :mod:`ckpt.io.pipelined`)."""
    chunk = pipelined.chunk_size(size)
    segments = _segments(ordered, size, chunk, path)
    starts = [r.offset for r in ordered]
    faulting = pipelined.prefault(fresh) if size >= pipelined.THREAD_MIN else None
    crc = 0
    try:
        reader = pipelined.Reader(functools.partial(_read_at, path=path), fd, segments, chunk,
                                  threaded=size >= pipelined.THREAD_MIN)
        for offset, view, bounced in reader:
            crc = crc32(view, crc)
            if bounced:
                _scatter(ordered, starts, view, offset)
            update(len(view))
    finally:
        if faulting is not None:
            faulting.join()
    return crc


def _segments(ordered: List[_Record], size: int, chunk: int, path: PurePath) -> List[pipelined.Segment]:
    """The file in pieces: big fresh records into their storage, the rest through a bounce buffer."""
    segments: List[pipelined.Segment] = []
    pos = 0
    for r in ordered:
        if r.offset < pos:
            raise CorruptCheckpointError("overlapping records", path=path, hint="the file is damaged")
        if r.view is None or r.size < DIRECT_MIN:
            continue
        segments += pipelined.split(pos, r.offset - pos, chunk)
        segments += pipelined.split(r.offset, r.size, chunk, r.view)
        pos = r.offset + r.size
    segments += pipelined.split(pos, size - pos, chunk)
    return segments


def _scatter(ordered: List[_Record], starts: List[int], view: memoryview, pos: int) -> None:
    """Copy the parts of records in ``view`` (file bytes from ``pos``) to their storages."""
    end = pos + len(view)
    i = max(0, bisect_right(starts, pos) - 1)
    while i < len(ordered) and ordered[i].offset < end:
        r = ordered[i]
        a, b = max(pos, r.offset), min(end, r.offset + r.size)
        if a < b:
            part = view[a - pos: b - pos]
            if r.view is not None:
                r.view[a - r.offset: b - r.offset] = part
            elif r.dest is not None:
                r.crc = crc32(part, r.crc)
        i += 1


def _read_at(fd: int, view: memoryview, offset: int, path: Optional[PurePath] = None) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done: done + READ_CHUNK]], offset + done)
        if n <= 0:
            raise CorruptCheckpointError(f"the file ends at byte {offset + done}, inside a record", path=path,
                                         hint="the file is truncated; restore an earlier checkpoint")
        done += n


def _to_device(obj: Any, device: torch.device) -> Any:
    """Every fresh tensor of ``obj`` moved to ``device`` (storage sharing kept); live ones stay."""
    moved: Dict[int, torch.UntypedStorage] = {}

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            return t
        st = t.untyped_storage()
        if st.data_ptr() not in moved:
            moved[st.data_ptr()] = st.to(device=device)
        out = torch.empty(0, dtype=t.dtype, device=device)
        return out.set_(moved[st.data_ptr()], t.storage_offset(), t.size(), t.stride())

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return move(o)
        if isinstance(o, dict):
            for k in list(o):
                o[k] = walk(o[k])
            return o
        if isinstance(o, list):
            o[:] = [walk(v) for v in o]
            return o
        if isinstance(o, tuple):
            return type(o)(*map(walk, o)) if hasattr(o, "_fields") else tuple(walk(v) for v in o)
        return o
    return walk(obj)


class _Filler:
    """The second pass: verified records from the page cache into the live tensors."""

    def __init__(self, fd: int, records: List[_Record], path: PurePath) -> None:
        self.records, self.path = records, path
        self.fd = fd
        self._close = weakref.finalize(self, os.close, fd)  # never filled (skipped): still closed

    def run(self) -> None:
        try:
            on_cpu = [r for r in self.records if r.dest is not None and r.dest.device.type == "cpu"]
            for r, got in self._cpu(on_cpu):
                self._check(r, got)
            pinned: Optional[torch.Tensor] = None
            for r in self.records:
                assert r.dest is not None
                if r.dest.device.type != "cpu":
                    if pinned is None:
                        pinned = torch.empty(min(READ_CHUNK, max(x.size for x in self.records)),
                                             dtype=torch.uint8, pin_memory=True)
                    self._check(r, self._cuda(r, pinned))
        finally:
            self._close()

    def _check(self, r: _Record, got: int) -> None:
        if got != r.crc:
            raise CorruptCheckpointError(
                f"record {r.key} changed between its check and its load (CRC-32 {got:08x}, "
                f"was {r.crc:08x})", path=self.path,
                hint="something rewrote the file in place; restore an earlier checkpoint")

    def _cpu(self, records: List[_Record]) -> Iterator[Tuple[_Record, int]]:
        """Each record read from the page cache straight into its live tensor, with the
        CRC-32 of what was read; the reads run on a helper thread while this one sums."""
        total = sum(r.size for r in records)
        chunk = pipelined.chunk_size(total)
        segments: List[pipelined.Segment] = []
        owners: List[_Record] = []
        for r in records:
            assert r.dest is not None
            pieces = list(pipelined.split(r.offset, r.size, chunk, _at(r.dest.data_ptr(), r.size)))
            segments += pieces
            owners += [r] * len(pieces)
        reader = pipelined.Reader(functools.partial(_read_at, path=self.path), self.fd, segments, chunk,
                                  threaded=total >= pipelined.THREAD_MIN)
        sums = {id(r): 0 for r in records}
        for (_, view, _), owner in zip(reader, owners):
            sums[id(owner)] = crc32(view, sums[id(owner)])
        return ((r, sums[id(r)]) for r in records)

    def _cuda(self, r: _Record, pinned: torch.Tensor) -> int:
        """Through a pinned buffer: read a piece, copy it to the device, next piece."""
        assert r.dest is not None
        flat = r.dest.view(-1).view(torch.uint8)
        buffer = _memory(pinned.untyped_storage())
        crc, done = 0, 0
        while done < r.size:
            n = min(len(buffer), r.size - done)
            _read_at(self.fd, buffer[:n], r.offset + done, self.path)
            crc = crc32(buffer[:n], crc)
            flat[done: done + n].copy_(pinned[:n])  # synchronous: the buffer is free after it
            done += n
        return crc
