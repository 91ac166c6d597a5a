"""Resume without a second copy: read each tensor record of a checkpoint into the memory it ends in.

A torch-format file stores every storage as an uncompressed zip record at a known
offset. Here the pickle is unpickled first (torch's ``weights_only`` unpickler, the
same allow-list as ``torch.load``) with storages that are allocated but not yet
filled; then the file is read once, in order, every byte summed into the file's
CRC-32: records of storages that stay (optimizer state: ``load_state_dict`` keeps the
tensors it is given) are read into their storage, records whose destination is a
live tensor of the same shape, dtype and layout (a module's parameters and buffers)
are only summed into the file's CRC-32 (their pages stay in the page cache). Only
once the whole file matches its recorded checksum is anything applied:
:attr:`Loaded.fill` then reads those records from the page cache straight into the
live tensors, checking each against its CRC-32 in the zip directory (verified with
the file: those bytes are summed once per pass). Anything this cannot do exactly as
``torch.load`` would (a legacy or compressed file, another byte order,
``weights_only=False``, a map_location other than one device) returns None, and the
caller loads the usual way. See
docs/explanation/performance-internals.md.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import sys
import threading
import zipfile
from bisect import bisect_right
from pathlib import PurePath
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import CorruptCheckpointError
from ..io import pipelined
from ..io.checksum import crc32, crc32_combine, format_checksum
from ..progress import Progress
from .directfill import Filler, Record, memory, read_at, to_device

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

    def __init__(self, obj: Dict[str, Any], filler: Optional[Filler]) -> None:
        super().__init__(obj)
        self._filler = filler

    def fill(self) -> None:
        if self._filler is not None:
            filler, self._filler = self._filler, None
            filler.run()


def load(fd: int, path: PurePath, *, checksum: Optional[str], map_location: Any,
         targets: Targets, progress: Optional[bool] = None) -> Optional[Loaded]:
    """The checkpoint in ``fd``, verified against ``checksum``, with ``targets``'s tensors
    left to :meth:`Loaded.fill`; None where only ``torch.load`` can load it."""
    device = _device(map_location)
    if checksum is None or device is None or (device.type == "cuda" and not torch.cuda.is_available()):
        return None
    pipelined.sequential(fd)
    pipelined.prefetch(fd, PREFETCH)  # the disk starts on the data while the pickle is read
    try:
        layout = _layout(fd)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, KeyError):
        return None  # not for this reader: torch.load's path examines it
    if layout is None:
        return None
    prefix, infos, size = layout
    pkl = _read_record(fd, infos[prefix + "data.pkl"])
    records: Dict[str, Record] = {}
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
            records[key].view = memory(st)
    ordered = sorted(records.values(), key=lambda r: r.offset)
    fresh = [(storages[r.key][0].data_ptr(), r.size, r.offset) for r in ordered
             if r.view is not None and r.size >= DIRECT_MIN]
    with Progress(f"verifying {path.name}", size, progress) as bar:
        actual = format_checksum(_first_pass(fd, ordered, size, path, bar.update, fresh))
    if actual != checksum:
        raise CorruptCheckpointError(f"checksum mismatch (recorded {checksum}, file has {actual}): the file is "
                                     "damaged", path=path,
                                     hint="ckpt skips it on resume; restore an earlier checkpoint",
                                     summary="checksum mismatch: the file is damaged")
    if device.type != "cpu":
        obj = to_device(obj, device)
    filler = Filler(os.dup(fd), [r for r in ordered if r.dest is not None], path) if direct else None
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
        listed = archive.infolist()
        for info in listed:  # the disk fetches every local header at once, not one after another
            pipelined.prefetch(fd, 30, info.header_offset)
        for info in listed:
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


def _unpickle(pkl: bytes, prefix: str, infos: Dict[str, Tuple[int, int, int]], records: Dict[str, Record],
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
            offset, size, crc = infos[f"{prefix}data/{key}"]
            records[key] = Record(key, offset, size, crc)
            # allocated, not touched: pages that are never written are never resident
            nbytes = numel * torch._utils._element_size(dtype)  # type: ignore[no-untyped-call]
            storages[key] = (torch.UntypedStorage(nbytes), dtype)  # type: ignore[no-untyped-call]
        st, _ = storages[key]
        return torch.storage.TypedStorage(wrap_storage=st, dtype=dtype, _internal=True)  # type: ignore[no-untyped-call]

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pkl), encoding="utf-8")
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    return unpickler.load()  # type: ignore[no-untyped-call]


def _direct(obj: Any, targets: Targets, records: Dict[str, Record],
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


#: Bytes from the start of the file the kernel is asked to read ahead at once.
PREFETCH = 32 << 20
#: Records at least this large are read straight into their fresh storage; smaller
#: ones arrive in runs through a bounce buffer (one read for many of them).
DIRECT_MIN = 1 << 20


def _first_pass(fd: int, ordered: List[Record], size: int, path: PurePath, update: Callable[[int], None],
                fresh: List[Tuple[int, int, int]]) -> int:
    """Read the whole file once; fresh records land in their storage, direct ones are
    summed; the CRC-32 of every byte is returned. A large file is read as two streams
    (its halves, split where a record starts) on two threads, each half summed as it
    is read and the two sums combined, while ``fresh`` (address, size, offset) memory is
    faulted in ahead of the reads (see :mod:`ckpt.io.pipelined`)."""
    chunk = pipelined.chunk_size(size)
    large = size >= pipelined.THREAD_MIN
    middle = next((r.offset for r in ordered if r.offset >= size // 2), size) if large else size
    spans = [(0, middle), (middle, size)] if 0 < middle < size else [(0, size)]
    starts = [r.offset for r in ordered]
    lock = threading.Lock()

    def stream(lo: int, hi: int) -> int:
        crc = 0
        reader = pipelined.Reader(functools.partial(read_at, path=path), fd,
                                  _segments([r for r in ordered if lo <= r.offset < hi], lo, hi, chunk, path),
                                  chunk, threaded=large and len(spans) == 1)
        for offset, view, bounced in reader:
            crc = crc32(view, crc)
            if bounced:
                _scatter(ordered, starts, view, offset)
            with lock:
                update(len(view))
        return crc
    faulting = pipelined.prefault(_alternating(fresh, middle)) if large else None
    try:
        crcs = pipelined.in_parallel([functools.partial(stream, lo, hi) for lo, hi in spans])
    finally:
        if faulting is not None:
            faulting.join()
    return crcs[0] if len(spans) == 1 else crc32_combine(crcs[0], crcs[1], size - middle)


def _alternating(fresh: List[Tuple[int, int, int]], middle: int) -> List[Tuple[int, int]]:
    """``fresh`` (address, size, file offset) regions in the order the two streams
    reach them: one of the first half, one of the second, and so on."""
    first = [(a, n) for a, n, off in fresh if off < middle]
    second = [(a, n) for a, n, off in fresh if off >= middle]
    out: List[Tuple[int, int]] = []
    for i in range(max(len(first), len(second))):
        out += first[i:i + 1] + second[i:i + 1]
    return out


def _segments(ordered: List[Record], lo: int, hi: int, chunk: int, path: PurePath) -> List[pipelined.Segment]:
    """File bytes ``[lo, hi)`` in pieces: big fresh records into their storage, the rest
    through a bounce buffer."""
    segments: List[pipelined.Segment] = []
    pos = lo
    for r in ordered:
        if r.offset < pos:
            raise CorruptCheckpointError("overlapping records", path=path, hint="the file is damaged")
        if r.view is None or r.size < DIRECT_MIN:
            continue
        segments += pipelined.split(pos, r.offset - pos, chunk)
        segments += pipelined.split(r.offset, r.size, chunk, r.view)
        pos = r.offset + r.size
    segments += pipelined.split(pos, hi - pos, chunk)
    return segments


def _scatter(ordered: List[Record], starts: List[int], view: memoryview, pos: int) -> None:
    """Copy the parts of records in ``view`` (file bytes from ``pos``) to their fresh storages."""
    end = pos + len(view)
    i = max(0, bisect_right(starts, pos) - 1)
    while i < len(ordered) and ordered[i].offset < end:
        r = ordered[i]
        a, b = max(pos, r.offset), min(end, r.offset + r.size)
        if a < b:
            part = view[a - pos: b - pos]
            if r.view is not None:
                r.view[a - r.offset: b - r.offset] = part
        i += 1
