"""One large tensor of a differential checkpoint as fixed-size chunks of rows.

A tensor of ``n`` rows (its first dimension; a 1-D tensor's rows are its elements) is
cut into chunks of ``rows`` rows, about :data:`CHUNK_BYTES` each (the last chunk may be
shorter). Its reference in the checkpoint file (format 2, see
``docs/explanation/differential.md``) is::

    {"ckpt_chunks": {"v": 2, "dtype": "float32", "shape": [n, ...], "rows": R,
                     "packs": ["ckpt-blob-<hex>.pt", ...], "where": int32 tensor [chunks, 2]}}

``where[c] = (p, s)``: chunk ``c`` is stored in ``packs[p]`` from row ``s`` on. A pack
is a plain ``torch.save`` of one tensor: the rows of the chunks one save found changed,
one after the other. A save compares every chunk, byte for byte, with the previous
checkpoint's (read back from its packs, each verified against its checksum first) and
writes only the changed chunks, into one new pack.

At most :data:`MAX_PACKS` packs make up one tensor: beyond that the live chunks of the
sparsest packs are written again into the new pack, so restoring reads a bounded number
of files and old packs are freed as retention drops the checkpoints that use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

KEY = "ckpt_chunks"
VERSION = 2
#: About this many bytes per chunk: small enough that a few scattered updated rows
#: rewrite little, large enough that the reference (8 bytes a chunk) stays ~1.6 %.
CHUNK_BYTES = 512
#: The most packs one tensor is spread over (restore reads at most this many files).
MAX_PACKS = 16

#: Loads a pack by name: its tensor, or None when it is missing or fails its checksum.
LoadPack = Callable[[str], Optional[torch.Tensor]]


@dataclass
class Plan:
    """What a save stores for one tensor: the new pack (None when nothing changed)
    and the reference to put in the checkpoint (its ``packs`` end with the new pack's
    placeholder ``""``, filled in once the pack is written)."""

    pack: Optional[torch.Tensor]
    ref: Dict[str, Any]
    reused: List[str]
    trained: bool = False  #: every sampled chunk changed: better stored inline, whole


def is_ref(value: Any) -> bool:
    inner = value.get(KEY) if type(value) is dict and len(value) == 1 else None
    return isinstance(inner, dict)


def rows_per_chunk(data: torch.Tensor) -> int:
    row = data[0].nbytes if data.dim() > 1 else data.element_size()
    return max(1, CHUNK_BYTES // max(1, row))


def as_rows(data: torch.Tensor) -> torch.Tensor:
    """``data`` (contiguous) as a 2-D tensor of its rows."""
    return data.reshape(data.shape[0], -1) if data.dim() > 1 else data.reshape(-1, 1)


def chunk_count(n: int, rows: int) -> int:
    return (n + rows - 1) // rows


def plan(data: torch.Tensor, old: Optional[Dict[str, Any]], peek: LoadPack, verified: Callable[[str], bool]) -> Plan:
    """The chunks of ``data`` (a contiguous CPU tensor, dim >= 1) to write, given the
    previous checkpoint's reference ``old`` for the same entry (or None). ``peek``
    maps a pack without checking it; a chunk is reused only from a pack ``verified``
    (its checksum) says is intact."""
    rows = rows_per_chunk(data)
    n = data.shape[0]
    count = chunk_count(n, rows)
    packs: List[str] = []
    where = torch.zeros((count, 2), dtype=torch.int32)
    changed = torch.ones(count, dtype=torch.bool)
    if old is not None and _compatible(old, data, rows) and old["where"].shape == (count, 2):
        packs = list(old["packs"])
        where = old["where"].to("cpu", torch.int32).clone()
        same = _same(as_rows(data), packs, where, rows, peek, verified)
        if same is None:
            return Plan(None, {}, [], trained=True)
        changed = ~same
        changed |= _sparse_packs(where, changed, len(packs))
    if not bool(changed.any()):
        return Plan(None, _ref(data, rows, packs, where), packs)
    picked = torch.nonzero(changed).flatten()
    pack = _take(as_rows(data), picked, rows, n)
    kept = _drop_unused(packs, where, changed)
    starts = torch.arange(picked.numel(), dtype=torch.int32) * rows
    where[picked, 0] = len(kept)
    where[picked, 1] = starts
    return Plan(pack.reshape((pack.shape[0],) + tuple(data.shape[1:])), _ref(data, rows, kept + [""], where), kept)


#: Chunks compared first: when none of them is unchanged, the tensor is written whole
#: without reading the rest of the previous packs (a trained tensor costs a full save).
SAMPLE = 32


def changed_everywhere(data: torch.Tensor, old: torch.Tensor) -> bool:
    """Does every sampled chunk of ``data`` differ from ``old`` (the previous checkpoint's
    tensor, stored inline)? True also when they cannot be compared."""
    rows = rows_per_chunk(data)
    if old.dtype != data.dtype or old.shape != data.shape:
        return True
    count = chunk_count(data.shape[0], rows)
    cs = torch.tensor(_distinct(torch.linspace(0, count - 1, min(SAMPLE, count)).long()), dtype=torch.long)
    return not bool(_equal_chunks(as_rows(data), as_rows(old.contiguous()), cs, cs * rows, rows).any())


def _same(new: torch.Tensor, packs: List[str], where: torch.Tensor, rows: int, peek: LoadPack,
          verified: Callable[[str], bool]) -> Optional[torch.Tensor]:
    """Per chunk: equal to the stored chunk, in a pack that passes its checksum (None
    when every sampled chunk changed)."""
    count = where.shape[0]
    same = torch.zeros(count, dtype=torch.bool)
    loaded: Dict[int, Optional[torch.Tensor]] = {}

    def pack(p: int) -> Optional[torch.Tensor]:
        if p not in loaded:
            got = peek(packs[p]) if 0 <= p < len(packs) else None
            loaded[p] = as_rows(got) if got is not None and got.dim() >= 1 else None
        return loaded[p]

    def compare(chunks: torch.Tensor) -> None:
        owner = where[chunks, 0].long()
        for p in _distinct(owner):
            cs = chunks[owner == p]
            src = pack(int(p))
            if src is not None and src.dtype == new.dtype and src.shape[1:] == new.shape[1:]:
                same[cs] = _equal_chunks(new, src, cs, where[cs, 1].long(), rows)

    if count > SAMPLE:
        compare(torch.tensor(_distinct(torch.linspace(0, count - 1, SAMPLE).long()), dtype=torch.long))
        if not bool(same.any()):
            return None  # every sampled chunk changed: a trained tensor
    compare(torch.arange(count))
    for p in _distinct(where[same, 0]):
        if not verified(packs[int(p)]):  # damaged: its chunks are written again
            same[where[:, 0] == p] = False
    return same


def _equal_chunks(new: torch.Tensor, src: torch.Tensor, cs: torch.Tensor, starts: torch.Tensor,
                  rows: int) -> torch.Tensor:
    """Per chunk of ``cs``: are its rows in ``new`` the rows of ``src`` from ``starts``?"""
    n = new.shape[0]
    count = chunk_count(n, rows)
    if 2 * cs.numel() > count and src.shape[0] == n and torch.equal(starts, cs * rows):  # as the tensor
        a, b = _bits(new), _bits(src)
        if a is not None and b is not None and torch.equal(a, b):
            return torch.ones(cs.numel(), dtype=torch.bool)
        return same_chunks(new, src, rows)[cs]
    offsets = torch.arange(rows)
    dest, source = (cs[:, None] * rows + offsets).flatten(), (starts[:, None] + offsets).flatten()
    inside = dest < n
    dest, source = dest[inside], source[inside]
    if source.numel() == 0 or int(source.max()) >= src.shape[0]:
        return torch.zeros(cs.numel(), dtype=torch.bool)
    a, b = _bits(new.index_select(0, dest)), _bits(src.index_select(0, source))
    if a is None or b is None:
        return torch.zeros(cs.numel(), dtype=torch.bool)
    differs = (a != b).reshape(dest.numel(), -1).any(dim=1)
    bad = torch.zeros(count, dtype=torch.bool)
    bad[torch.div(dest[differs], rows, rounding_mode="floor")] = True
    return ~bad[cs]


def gather(ref: Dict[str, Any], load: LoadPack, *,
           on_missing: str = "raise") -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """The tensor ``ref`` describes, and which chunks were read (a chunk whose pack is
    missing or damaged is left zero and marked False, or raises ``KeyError(name)`` when
    ``on_missing="raise"``). (None, ...) when the reference itself is unusable."""
    shape = tuple(int(d) for d in ref["shape"])
    rows, where = int(ref["rows"]), ref["where"].to("cpu", torch.int64)
    n = shape[0]
    count = chunk_count(n, rows)
    valid = torch.zeros(count, dtype=torch.bool)
    if where.shape != (count, 2):
        return None, valid
    out: Optional[torch.Tensor] = None
    for p, name in enumerate(ref["packs"]):
        cs = torch.nonzero(where[:, 0] == p).flatten()
        if cs.numel() == 0:
            continue
        pack = load(name)
        if pack is None:
            if on_missing == "raise":
                raise KeyError(name)
            continue
        src = as_rows(pack)
        if out is None:
            out = torch.zeros((n, src.shape[1]), dtype=src.dtype, device=src.device)
        _place(out, src, cs, where[cs, 1], rows, n)
        valid[cs] = True
    if out is None:
        return None, valid
    return out.reshape(shape), valid


def same_chunks(new: torch.Tensor, old: torch.Tensor, rows: int) -> torch.Tensor:
    """Per chunk: are the bytes of ``new`` and ``old`` (2-D, same shape) equal?"""
    n = new.shape[0]
    count = chunk_count(n, rows)
    a, b = _bits(new), _bits(old)
    if a is None or b is None:
        return torch.zeros(count, dtype=torch.bool)
    differs = (a != b).reshape(n, -1).any(dim=1)  # per row
    pad = count * rows - n
    if pad:
        differs = torch.cat([differs, torch.zeros(pad, dtype=torch.bool)])
    return ~differs.reshape(count, rows).any(dim=1)


def _bits(t: torch.Tensor) -> Optional[torch.Tensor]:
    """The bytes of a contiguous tensor as the widest integers that hold them (bitwise:
    -0.0 differs from 0.0, NaN equals itself), one row per row of ``t``."""
    try:
        raw = t.contiguous().reshape(-1).view(torch.uint8)
    except RuntimeError:
        return None
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if t.shape[1] * t.element_size() % size == 0 and raw.data_ptr() % size == 0:
            return raw.view(dtype)
    return raw


def _distinct(values: torch.Tensor) -> List[int]:
    """The distinct values of a tensor of small non-negative integers, ascending."""
    if values.numel() == 0:
        return []
    return [int(v) for v in torch.nonzero(torch.bincount(values.long().flatten())).flatten().tolist()]


def _compatible(old: Dict[str, Any], data: torch.Tensor, rows: int) -> bool:
    try:
        return (old.get("v") == VERSION and str(old["dtype"]) == _dtype_name(data.dtype)
                and [int(d) for d in old["shape"]] == list(data.shape) and int(old["rows"]) == rows
                and isinstance(old["where"], torch.Tensor) and isinstance(old["packs"], list))
    except (KeyError, TypeError, ValueError):
        return False


def _sparse_packs(where: torch.Tensor, changed: torch.Tensor, packs: int) -> torch.Tensor:
    """Chunks to write again so that, with the new pack, at most MAX_PACKS remain:
    those of the packs that hold the fewest live chunks."""
    live = torch.bincount(where[~changed, 0].long(), minlength=packs)
    used = [p for p in range(packs) if live[p] > 0]
    extra = torch.zeros_like(changed)
    if len(used) < MAX_PACKS:
        return extra
    for p in sorted(used, key=lambda p: int(live[p]))[:len(used) - MAX_PACKS + 1]:
        extra |= where[:, 0] == p
    return extra & ~changed


def _drop_unused(packs: List[str], where: torch.Tensor, changed: torch.Tensor) -> List[str]:
    """The packs still referenced by unchanged chunks, renumbered in ``where``."""
    keep = ~changed
    used = _distinct(where[keep, 0])
    remap = torch.full((max(len(packs), 1),), -1, dtype=torch.int32)
    for i, p in enumerate(used):
        remap[p] = i
    if keep.any():
        where[keep, 0] = remap[where[keep, 0].long()]
    return [packs[p] for p in used]


def _take(rows2d: torch.Tensor, picked: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    """The rows of chunks ``picked`` (sorted), one chunk after the other."""
    if picked.numel() == chunk_count(n, rows):
        return rows2d
    index = (picked[:, None] * rows + torch.arange(rows)).flatten()
    return rows2d.index_select(0, index[index < n])


def _place(out: torch.Tensor, src: torch.Tensor, chunks: torch.Tensor, starts: torch.Tensor,
           rows: int, n: int) -> None:
    """Copy chunks ``chunks`` from ``src`` (from rows ``starts``) into ``out``."""
    offsets = torch.arange(rows)
    dest = (chunks[:, None] * rows + offsets).flatten()
    source = (starts[:, None] + offsets).flatten()
    inside = dest < n
    dest, source = dest[inside], source[inside]
    if source.numel() and int(source.max()) >= src.shape[0]:
        raise IndexError(f"a chunk reaches past its pack ({src.shape[0]} rows)")
    out.index_copy_(0, dest.to(out.device), src.index_select(0, source.to(src.device)))


def _ref(data: torch.Tensor, rows: int, packs: List[str], where: torch.Tensor) -> Dict[str, Any]:
    return {KEY: {"v": VERSION, "dtype": _dtype_name(data.dtype), "shape": list(data.shape), "rows": rows,
                  "packs": packs, "where": where}}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
