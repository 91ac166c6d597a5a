"""Which chunks of one tensor changed since the previous checkpoint, found cheaply.

A differential save decides per large tensor (see ``docs/explanation/differential.md``):

1. A **sample** of :data:`SAMPLE` chunks, spread over the tensor, is compared with the
   same chunks of the previous checkpoint (kept in memory by the writer since its last
   save, so this reads no file). When more than :data:`INLINE_ABOVE` of them changed, the
   tensor is written whole, inline, as in a full save: nothing else is read, hashed or
   copied (a trained tensor costs what a full save costs).
2. Otherwise every chunk is compared with the bytes stored for it, exactly (the previous
   inline tensor or the packs, memory-mapped, usually from the page cache), or, on an
   object store without a local cache, with the chunk **digests** the previous checkpoint
   recorded (nothing is downloaded). When more than :data:`INLINE_ABOVE` of all chunks
   changed, the tensor is written whole too.
3. Otherwise the changed chunks are written into a new pack (:mod:`ckpt.format.chunks`).

Knows nothing of stores: packs come through callables.
"""

from __future__ import annotations

import ctypes
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from . import chunks

#: Chunks compared first (the writer keeps their first bytes between saves: 2 KiB a tensor).
SAMPLE = 32
#: Bytes of each sampled chunk compared (a prefix; see :func:`take`).
SAMPLE_BYTES = 64
#: More than this fraction of the chunks changed: the tensor is written whole, inline.
#: Why one half: docs/explanation/differential.md ("When a tensor is written whole").
INLINE_ABOVE = 0.5
#: Bytes of one chunk digest (BLAKE2b): a changed chunk goes unnoticed with odds 2**-64.
DIGEST_BYTES = 8


@dataclass
class Before:
    """What the previous checkpoint holds for one entry: the bytes of its sampled chunks
    (``sample``, None when not kept), and either the tensor itself (stored inline and
    read from its file) or its chunk reference (``ref``, the inner dict)."""

    sample: Any = None  #: numpy array, one sampled chunk a row
    tensor: Optional[torch.Tensor] = None
    ref: Optional[Dict[str, Any]] = None


@dataclass
class Decision:
    """For one tensor: write it whole (``inline``), or the chunks marked ``changed``.
    ``sample``: its sampled chunks' bytes (a copy, kept for the next save); ``digests``:
    one per chunk, when the store compares by digest; ``reuse``: the previous reference
    whose chunks the unchanged ones stay in (None when every chunk is written)."""

    inline: bool
    changed: Optional[chunks.Mask]
    sample: Any
    digests: Optional[torch.Tensor] = None
    reuse: Optional[Dict[str, Any]] = None


def decide(data: torch.Tensor, before: Optional[Before], packs: chunks.Packs, trusted: Callable[[int], bool], *,
           by_digest: bool) -> Decision:
    """The decision for ``data`` (a contiguous CPU tensor, dim >= 1) given what the previous
    checkpoint holds for the same entry. ``packs(i)``: pack ``i`` of ``before.ref`` as rows,
    mapped, not checked (None when it cannot be read); ``trusted(i)``: does that pack match
    its recorded checksum? (Asked only of packs whose chunks would be reused.)"""
    rows = chunks.rows_per_chunk(data)
    new = chunks.as_rows(data)
    count = chunks.chunk_count(new.shape[0], rows)
    sample = take(new, rows)
    if before is not None and before.sample is not None and before.sample.shape == sample.shape \
            and before.sample.dtype == sample.dtype \
            and np.count_nonzero((before.sample != sample).any(axis=1)) > INLINE_ABOVE * len(sample):
        return Decision(True, None, sample)  # trained: nothing more is read, hashed or copied
    everything = np.ones(count, dtype=bool)
    if before is None or not _fits(before, data, rows, count):
        return Decision(False, everything, sample, digest_all(new, rows) if by_digest else None)
    picked = sample_index(new.shape[0], rows)
    seen = _sample_changed(sample, before, picked, new, rows, packs, by_digest)
    if seen is not None and seen.size and np.count_nonzero(seen) > INLINE_ABOVE * seen.size:
        return Decision(True, None, sample)
    digests = digest_all(new, rows) if by_digest else None
    changed = _all_changed(new, before, rows, packs, digests)
    if changed is None:
        return Decision(False, everything, sample, digests)  # nothing to compare with: all new
    if int(changed.sum()) > INLINE_ABOVE * count:
        return Decision(True, None, sample)
    if before.ref is None:  # stored inline before: no pack to reuse, every chunk is written once
        return Decision(False, everything, sample, digests)
    chunks.mark_untrusted(changed, before.ref, trusted)  # a damaged pack is never reused
    return Decision(False, changed, sample, digests, reuse=before.ref)


def sample_index(n: int, rows: int) -> chunks.Index:
    """The sampled chunks: up to :data:`SAMPLE` complete chunks at a regular stride."""
    full = n // rows
    return np.arange(0, full, max(1, full // SAMPLE))[:SAMPLE]


def take(rows2d: torch.Tensor, rows: int) -> Any:
    """The first :data:`SAMPLE_BYTES` of each sampled chunk of ``rows2d``, one chunk a row
    (a numpy copy: one strided copy, no index built). A prefix, not the whole chunk: a
    trained chunk differs in it, and an equal prefix only sends the tensor on to the full
    comparison."""
    n = rows2d.shape[0]
    full = n // rows
    bits = chunks.raw_bits(rows2d)[:full * rows].reshape(full, -1)
    words = max(1, SAMPLE_BYTES // bits.itemsize)
    return bits[::max(1, full // SAMPLE)][:SAMPLE, :words].copy()


def digest_all(rows2d: torch.Tensor, rows: int, picked: Optional[chunks.Index] = None) -> torch.Tensor:
    """One BLAKE2b digest of :data:`DIGEST_BYTES` per chunk of ``rows2d`` (contiguous; of
    ``picked`` only, if given), as int64."""
    flat = rows2d.contiguous().reshape(-1).view(torch.uint8)
    raw = memoryview((ctypes.c_char * flat.numel()).from_address(flat.data_ptr())).cast("B")  # flat stays alive
    step = rows * rows2d[0].nbytes
    which: List[int] = picked.tolist() if picked is not None else list(range((len(raw) + step - 1) // step))
    blake = hashlib.blake2b
    out = b"".join([blake(raw[c * step:(c + 1) * step], digest_size=DIGEST_BYTES).digest() for c in which])
    return torch.frombuffer(bytearray(out), dtype=torch.int64) if out else torch.zeros(0, dtype=torch.int64)


def _fits(before: Before, data: torch.Tensor, rows: int, count: int) -> bool:
    if before.tensor is not None:
        return before.tensor.dtype == data.dtype and before.tensor.shape == data.shape
    if before.ref is not None:
        return chunks.compatible(before.ref, data, rows, count)
    return before.sample is not None


def _sample_changed(sample: Any, before: Before, picked: chunks.Index, new: torch.Tensor, rows: int,
                    packs: chunks.Packs, by_digest: bool) -> Optional[chunks.Mask]:
    """Per sampled chunk: changed? (None: the previous bytes are not at hand.)"""
    old = before.sample
    if old is None and before.tensor is not None:
        old = take(chunks.as_rows(before.tensor), rows)
    if old is not None:
        if old.shape != sample.shape or old.dtype != sample.dtype:
            return None
        return (old != sample).any(axis=1)
    ref = before.ref
    if ref is None:
        return None
    if by_digest:
        recorded = ref.get("digests")
        if not isinstance(recorded, torch.Tensor):
            return None
        return (digest_all(new, rows, picked) != recorded[torch.from_numpy(picked)]).numpy()
    return chunks.differ_from_packs(new, ref, picked, rows, packs)


def _all_changed(new: torch.Tensor, before: Before, rows: int, packs: chunks.Packs,
                 digests: Optional[torch.Tensor]) -> Optional[chunks.Mask]:
    """Per chunk: changed? (None: nothing to compare with.)"""
    if before.tensor is not None:
        return ~chunks.same_chunks(new, chunks.as_rows(before.tensor), rows)
    ref = before.ref
    if ref is None:
        return None
    if digests is not None:
        recorded = ref.get("digests")
        if not isinstance(recorded, torch.Tensor) or recorded.shape != digests.shape:
            return None
        return (digests != recorded).numpy()
    return chunks.differ_from_packs(new, ref, np.arange(chunks.chunk_count(new.shape[0], rows)), rows, packs)
