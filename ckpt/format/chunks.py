"""One large tensor of a differential checkpoint as fixed-size chunks of rows.

A tensor of ``n`` rows (its first dimension; a 1-D tensor's rows are its elements) is
cut into chunks of ``rows`` rows, about :data:`CHUNK_BYTES` each (the last chunk may be
shorter). Its reference in the checkpoint file (format 2, see
``docs/explanation/differential.md``) is::

    {"ckpt_chunks": {"v": 2, "dtype": "float32", "shape": [n, ...], "rows": R,
                     "packs": ["ckpt-blob-<hex>.pt", ...], "where": int32 tensor [chunks, 2],
                     "digests": int64 tensor [chunks]}}   # digests: object stores only

``where[c] = (p, s)``: chunk ``c`` is stored in ``packs[p]`` from row ``s`` on. A pack
is a plain ``torch.save`` of one tensor: the rows of the chunks one save found changed,
one after the other. Which chunks changed is decided in :mod:`ckpt.format.changes`; this
module lays them out (and compares chunks with the packs holding them).

At most :data:`MAX_PACKS` packs make up one tensor: beyond that the live chunks of the
sparsest packs are written again into the new pack, so restoring reads a bounded number
of files and old packs are freed as retention drops the checkpoints that use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
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
#: Pack ``i`` of a reference, as rows (mapped, not checked), or None when it cannot be read.
Packs = Callable[[int], Optional[torch.Tensor]]
#: Per chunk flags and chunk numbers (numpy arrays: bool, int64).
Mask = Any
Index = Any


@dataclass
class Plan:
    """What a save stores for one tensor: the new pack (None when nothing changed)
    and the reference to put in the checkpoint (its ``packs`` end with the new pack's
    placeholder ``""``, filled in once the pack is written)."""

    pack: Optional[torch.Tensor]
    ref: Dict[str, Any]
    reused: List[str]


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


def layout(data: torch.Tensor, rows: int, old: Optional[Dict[str, Any]], changed: Mask) -> Plan:
    """The pack and reference for ``data`` (contiguous, CPU, dim >= 1) when the chunks
    marked ``changed`` are written and every other chunk stays where ``old`` (the previous
    reference's inner dict, :func:`compatible`, or None) says it is. The live chunks of the
    sparsest packs are written again so that at most :data:`MAX_PACKS` make up the tensor."""
    n = data.shape[0]
    count = chunk_count(n, rows)
    packs: List[str] = []
    where = np.zeros((count, 2), dtype=np.int32)
    if old is not None:
        packs = list(old["packs"])
        where = old["where"].numpy().astype(np.int32)  # a copy
        changed = changed | _sparse_packs(where, changed, len(packs))
    if not changed.any():
        return Plan(None, _ref(data, rows, packs, where), packs)
    picked = np.flatnonzero(changed)
    pack = _take(data, picked, rows)
    kept = _drop_unused(packs, where, changed)
    where[picked, 0] = len(kept)
    where[picked, 1] = np.arange(picked.size, dtype=np.int32) * rows
    return Plan(pack, _ref(data, rows, kept + [""], where), kept)


def compatible(old: Dict[str, Any], data: torch.Tensor, rows: int, count: int) -> bool:
    """Can ``data`` reuse the chunks of the reference ``old`` (inner dict)?"""
    try:
        where, packs = old["where"], old["packs"]
        if not (old.get("v") == VERSION and str(old["dtype"]) == _dtype_name(data.dtype)
                and [int(d) for d in old["shape"]] == list(data.shape) and int(old["rows"]) == rows
                and isinstance(where, torch.Tensor) and tuple(where.shape) == (count, 2)
                and isinstance(packs, list)):
            return False
        w = where.numpy()
        return bool(count == 0 or (w[:, 0].min() >= 0 and w[:, 0].max() < len(packs) and w[:, 1].min() >= 0))
    except (KeyError, TypeError, ValueError, RuntimeError):
        return False


def differ_from_packs(new: torch.Tensor, ref: Dict[str, Any], picked: Index, rows: int, packs: Packs) -> Mask:
    """Per chunk of ``picked`` (ascending): do its rows of ``new`` (2-D) differ from the
    bytes stored for it (True also when its pack cannot be read)? A pack holding a large
    share of the tensor in place (a first save's) is compared as a whole, not gathered."""
    n = new.shape[0]
    count = chunk_count(n, rows)
    where = ref["where"].numpy()
    owner, starts = where[picked, 0].astype(np.int64), where[picked, 1].astype(np.int64)
    order = np.argsort(owner, kind="stable")
    sizes = np.bincount(owner, minlength=len(ref["packs"]))
    changed = np.ones(picked.size, dtype=bool)
    bits = raw_bits(new)
    at = 0
    for p in np.flatnonzero(sizes).tolist():
        sel = order[at:at + sizes[p]]
        at += int(sizes[p])
        cs, st = picked[sel], starts[sel]
        src = packs(p)
        if src is None or src.dtype != new.dtype or src.shape[1:] != new.shape[1:]:
            continue
        src_bits = raw_bits(src)
        if src.shape[0] == n and 4 * cs.size >= count and np.array_equal(st, cs * rows):
            changed[sel] = ~_same_bits(bits, src_bits, rows)[cs]
        else:
            changed[sel] = ~_equal_gathered(bits, src_bits, cs, st, rows)
    return changed


def mark_untrusted(changed: Mask, ref: Dict[str, Any], trusted: Callable[[int], bool]) -> None:
    """Mark changed every chunk of a pack that would be reused but fails its checksum."""
    owner = ref["where"].numpy()[:, 0]
    for p in np.unique(owner[~changed]).tolist():
        if not trusted(p):
            changed |= owner == p


def same_chunks(new: torch.Tensor, old: torch.Tensor, rows: int) -> Mask:
    """Per chunk: are the bytes of ``new`` and ``old`` (2-D, same shape) equal?"""
    return _same_bits(raw_bits(new), raw_bits(old), rows)


def raw_bits(rows2d: torch.Tensor) -> Any:
    """The bytes of a 2-D tensor as a numpy array, one row per row, in the widest integers
    that hold a row (bitwise: -0.0 differs from 0.0, NaN equals itself). Comparisons run
    in numpy, on one thread: on a busy machine a parallel torch operation waits for its
    slowest thread, and a save makes many small ones."""
    bits = _bits(rows2d)
    if bits is None:
        bits = rows2d.contiguous().reshape(-1).view(torch.uint8)
    return bits.numpy().reshape(rows2d.shape[0], -1)


def _same_bits(a: Any, b: Any, rows: int) -> Mask:
    """Per chunk: are the rows of ``a`` and ``b`` (bits) equal?"""
    n = a.shape[0]
    count = chunk_count(n, rows)
    if a.shape != b.shape or a.dtype != b.dtype:
        return np.zeros(count, dtype=bool)
    differs = np.not_equal(a, b).any(axis=1)  # per row
    pad = count * rows - n
    if pad:
        differs = np.concatenate([differs, np.zeros(pad, dtype=bool)])
    return ~differs.reshape(count, rows).any(axis=1)


def _equal_gathered(a: Any, b: Any, cs: Index, starts: Index, rows: int) -> Mask:
    """Per chunk of ``cs``: are its rows of ``a`` the rows of ``b`` from ``starts``? (bits)"""
    n, m = a.shape[0], b.shape[0]
    if cs.size == 0 or m == 0:
        return np.zeros(cs.size, dtype=bool)
    if n % rows == 0 and m % rows == 0 and not (starts % rows).any() and int(starts.max()) < m:
        whole, packed = a.reshape(n // rows, -1), b.reshape(m // rows, -1)  # one chunk a row
        theirs = starts // rows
        right = packed[:cs.size] if np.array_equal(theirs, np.arange(cs.size)) else packed[theirs]
        result: Mask = (whole[cs] == right).all(axis=1)
        return result
    offsets = np.arange(rows)
    dest, source = cs[:, None] * rows + offsets, starts[:, None] + offsets
    inside = dest < n  # the last chunk may be short
    short = ((source >= m) & inside).any(axis=1)  # reaches past the pack: malformed, not equal
    left, right = a[np.minimum(dest, n - 1).ravel()], b[np.minimum(source, m - 1).ravel()]
    equal = (left == right).all(axis=1).reshape(cs.size, rows) | ~inside
    result = equal.all(axis=1) & ~short
    return result


def _sparse_packs(where: Any, changed: Mask, packs: int) -> Mask:
    """Chunks to write again so that, with the new pack, at most MAX_PACKS remain:
    those of the packs that hold the fewest live chunks."""
    live = np.bincount(where[~changed, 0], minlength=packs)
    used = np.flatnonzero(live)
    if used.size < MAX_PACKS:
        return np.zeros_like(changed)
    drop = used[np.argsort(live[used], kind="stable")][:used.size - MAX_PACKS + 1]
    extra: Mask = np.isin(where[:, 0], drop) & ~changed
    return extra


def _drop_unused(packs: List[str], where: Any, changed: Mask) -> List[str]:
    """The packs still referenced by unchanged chunks, renumbered in ``where``."""
    keep = ~changed
    used = np.unique(where[keep, 0])
    remap = np.full(max(len(packs), 1), -1, dtype=np.int32)
    remap[used] = np.arange(used.size, dtype=np.int32)
    where[keep, 0] = remap[where[keep, 0]]
    return [packs[p] for p in used.tolist()]


def _take(data: torch.Tensor, picked: Index, rows: int) -> torch.Tensor:
    """The rows of chunks ``picked`` (ascending), one chunk after the other, as a tensor
    of ``data``'s dtype (``data`` itself when every chunk is picked)."""
    n = data.shape[0]
    if picked.size == chunk_count(n, rows):
        return data
    bits = raw_bits(as_rows(data))
    if n % rows == 0:
        taken = bits.reshape(n // rows, -1)[picked]  # one chunk a row
        length = picked.size * rows
    else:
        index = (picked[:, None] * rows + np.arange(rows)).ravel()
        index = index[index < n]
        taken, length = bits[index], index.size
    out = torch.from_numpy(taken).reshape(-1).view(torch.uint8).view(data.dtype)
    return out.reshape((length,) + tuple(data.shape[1:]))


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



def _ref(data: torch.Tensor, rows: int, packs: List[str], where: Any) -> Dict[str, Any]:
    return {KEY: {"v": VERSION, "dtype": _dtype_name(data.dtype), "shape": list(data.shape), "rows": rows,
                  "packs": packs, "where": torch.from_numpy(where)}}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
