"""The second pass of a direct resume: verified records into the live tensors.

:mod:`~ckpt.format.directread` reads a checkpoint once, checks it, and leaves the
records of the modules' tensors in the page cache; :class:`Filler` then reads them
straight into the live tensors (in two streams on two threads, the copies out of the
page cache being CPU work), checking each record's CRC-32 against the zip
directory's (part of the file the first pass verified; a mismatch means the file was
rewritten in place meanwhile).
Here too are the small helpers both passes share. See
docs/explanation/performance-internals.md.
"""

from __future__ import annotations

import ctypes
import functools
import os
import weakref
from pathlib import PurePath
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import CorruptCheckpointError
from ..io import pipelined
from ..io.checksum import READ_CHUNK, crc32


class Record:
    """A tensor record of the file: where it is, and where its bytes go."""

    __slots__ = ("key", "offset", "size", "view", "dest", "crc")

    def __init__(self, key: str, offset: int, size: int, crc: int) -> None:
        self.key, self.offset, self.size = key, offset, size
        self.view: Optional[memoryview] = None  # fresh storage to read into
        self.dest: Optional[torch.Tensor] = None  # live tensor, filled after the checks
        self.crc = crc  # the zip directory's, trusted once the whole file's CRC-32 matched


def memory(st: torch.UntypedStorage) -> memoryview:
    """The bytes of a CPU storage, writable (the storage must outlive the view)."""
    return at(st.data_ptr(), st.nbytes())


def at(address: int, size: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")


def read_at(fd: int, view: memoryview, offset: int, path: Optional[PurePath] = None) -> None:
    """Fill ``view`` with the file's bytes from ``offset``; a short file is damage."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done: done + READ_CHUNK]], offset + done)
        if n <= 0:
            raise CorruptCheckpointError(f"the file ends at byte {offset + done}, inside a record", path=path,
                                         hint="the file is truncated; restore an earlier checkpoint")
        done += n


def halves(records: List[Record]) -> List[List[Record]]:
    """``records`` (in file order) in two runs of about the same bytes (one if that is all)."""
    total = sum(r.size for r in records)
    if total < pipelined.THREAD_MIN or len(records) < 2:
        return [records]
    done = 0
    for i, r in enumerate(records):
        if done and done + r.size / 2 > total / 2:
            return [records[:i], records[i:]]
        done += r.size
    return [records]


class Filler:
    """The second pass: verified records from the page cache into the live tensors."""

    def __init__(self, fd: int, records: List[Record], path: PurePath) -> None:
        self.records, self.path = records, path
        self.fd = fd
        self._close = weakref.finalize(self, os.close, fd)  # never filled (skipped): still closed

    def run(self) -> None:
        try:
            on_cpu = [r for r in self.records if r.dest is not None and r.dest.device.type == "cpu"]
            chunk = pipelined.chunk_size(sum(r.size for r in on_cpu))
            for part in pipelined.in_parallel([functools.partial(self._cpu, run, chunk)
                                               for run in halves(on_cpu)]):
                for r, got in part:
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

    def _check(self, r: Record, got: int) -> None:
        if got != r.crc:
            raise CorruptCheckpointError(
                f"record {r.key} changed between its check and its load (CRC-32 {got:08x}, "
                f"the verified file's is {r.crc:08x})", path=self.path,
                hint="something rewrote the file in place; restore an earlier checkpoint")

    def _cpu(self, records: List[Record], chunk: int) -> List[Tuple[Record, int]]:
        """Each record read from the page cache straight into its live tensor, piece by
        piece, with the CRC-32 of what was read (summed while the piece is in cache)."""
        sums: List[Tuple[Record, int]] = []
        for r in records:
            assert r.dest is not None
            crc = 0
            for offset, _, view in pipelined.split(r.offset, r.size, chunk, at(r.dest.data_ptr(), r.size)):
                assert view is not None
                read_at(self.fd, view, offset, self.path)
                crc = crc32(view, crc)
            sums.append((r, crc))
        return sums

    def _cuda(self, r: Record, pinned: torch.Tensor) -> int:
        """Through a pinned buffer: read a piece, copy it to the device, next piece."""
        assert r.dest is not None
        flat = r.dest.view(-1).view(torch.uint8)
        buffer = memory(pinned.untyped_storage())
        crc, done = 0, 0
        while done < r.size:
            n = min(len(buffer), r.size - done)
            read_at(self.fd, buffer[:n], r.offset + done, self.path)
            crc = crc32(buffer[:n], crc)
            flat[done: done + n].copy_(pinned[:n])  # synchronous: the buffer is free after it
            done += n
        return crc


def to_device(obj: Any, device: torch.device) -> Any:
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
