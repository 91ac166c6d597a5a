"""Differential checkpoints: a tensor whose bytes did not change is stored once.

With ``CheckpointManager(..., differential=True)`` every tensor of at least
:data:`MIN_BYTES` in the tracked states is stored out of line, in a file of its own,
``ckpt-blob-<16 hex>.pt`` (a plain ``torch.save`` of the tensor), and the checkpoint file
holds a reference in its place, ``{"ckpt_blob": ["<name>", ...]}``: a tensor larger than
:data:`CHUNK_BYTES` is cut along its first dimension into pieces of about that size, each
its own blob, so an embedding table with a few rows updated rewrites only the pieces that
hold them. The checkpoint's header lists every blob
it references with the blob's checksum (``ckpt["blobs"]``), and so does its index entry.
A save compares each large tensor with the same entry of the previous committed
checkpoint, byte for byte against that blob mapped from disk, and references the old
blob when they are equal: a frozen backbone is written once, and each later
checkpoint costs its changed tensors plus a small file.

Guarantees, as for full checkpoints:

* every checkpoint restores on its own through ckpt (its blobs are loaded, each
  verified against its checksum); :func:`standalone` gives the plain dict for export;
* blobs are committed (atomically, durably) before the checkpoint that references them,
  so a crash leaves at most unreferenced blobs, which the next writer to open the
  directory deletes;
* retention deletes a blob only after the commit, and only when no kept checkpoint
  references it.

The comparison is exact (bytes, not a hash): detecting an unchanged tensor costs one
read of the previous blob (usually from the page cache), not a write and an ``fsync``.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch

from .. import schema
from ..errors import CorruptCheckpointError
from . import torchfile, torchio
from .base import Store

MARKER = "ckpt_blob"
BLOB_PREFIX = "ckpt-blob-"
#: Smaller tensors stay inline: a file per tensor costs more than it saves below this.
MIN_BYTES = 64 << 10
#: Larger tensors are stored in pieces of about this size (rows of the first dimension).
CHUNK_BYTES = 16 << 20

Path_ = Tuple[Any, ...]
#: Entries of the checkpoint dict that are not tracked state (never stored out of line).
_OWN = frozenset({"epoch", "step", "metrics", "rng", "extra", "ckpt"})


def new_name() -> str:
    return f"{BLOB_PREFIX}{secrets.token_hex(8)}.pt"


def is_marker(value: Any) -> bool:
    names = value.get(MARKER) if type(value) is dict and len(value) == 1 else None
    return isinstance(names, list) and bool(names) and all(isinstance(n, str) for n in names)


def split(store: Store, checkpoint: schema.Checkpoint, previous: Optional[Dict[str, Any]],
          progress: Optional[bool] = None) -> Tuple[schema.Checkpoint, List[str]]:
    """``checkpoint`` with its large tensors replaced by blob references, and the names of
    the blobs written for it. ``previous``: the previous committed checkpoint's dict
    (references unresolved), whose blobs are reused where the bytes are equal."""
    before = _references(previous) if previous is not None else {}
    known: Dict[str, str] = dict(previous["ckpt"].get("blobs", {})) if previous is not None else {}
    used: Dict[str, str] = {}
    written: List[str] = []

    def out_of_line(tensor: torch.Tensor, path: Path_) -> Any:
        if tensor.layout != torch.strided or tensor.nelement() * tensor.element_size() < MIN_BYTES:
            return tensor
        old = before.get(path, [])
        names = []
        for i, piece in enumerate(_pieces(_plain(tensor))):
            if i < len(old) and old[i] in known and _same_bytes(store, old[i], piece):
                names.append(old[i])
                used[old[i]] = known[old[i]]
                continue
            name = new_name()
            result = torchfile.write(store, name, piece, nbytes=piece.nbytes, progress=progress)
            written.append(name)
            used[name] = result.checksum
            names.append(name)
        return {MARKER: names}

    try:
        obj = {k: v if k in _OWN else _walk(v, (k,), out_of_line) for k, v in checkpoint.obj.items()}
    except BaseException:
        remove(store, written)
        raise
    obj["ckpt"] = {**checkpoint.obj["ckpt"], "blobs": dict(sorted(used.items()))}
    header = replace(checkpoint.header, blobs=tuple(sorted(used.items())))
    small = schema.check_loadable({k: v for k, v in obj.items() if k not in _OWN}, "state")
    return schema.Checkpoint(obj, header, small), written


def resolve(store: Store, obj: Dict[str, Any], header: schema.Header, *, map_location: Any = "cpu",
            progress: Optional[bool] = None) -> Dict[str, Any]:
    """The checkpoint dict with every blob reference replaced by its (verified) tensor."""
    checksums = dict(header.blobs)
    where = store.where(schema.file_name(header.epoch, header.step))

    def load(value: Any, path: Path_) -> Any:
        pieces = []
        for name in value[MARKER]:
            if name not in checksums:
                raise CorruptCheckpointError(f"references {name}, which its header does not list", path=where)
            with store.local_path(name) as local:
                piece = torchfile.load(local, map_location=map_location, checksum=checksums[name], progress=progress)
            if not isinstance(piece, torch.Tensor):
                raise CorruptCheckpointError(f"{name} does not hold a tensor", path=store.where(name))
            pieces.append(piece)
        try:
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        except RuntimeError as e:
            raise CorruptCheckpointError(f"the pieces {value[MARKER]} do not fit together ({e})", path=where) from e

    return {k: v if k in _OWN else _walk(v, (k,), None, load) for k, v in obj.items()}


def standalone(obj: Dict[str, Any]) -> Dict[str, Any]:
    """A resolved dict as a plain, full checkpoint (for export): no blob list."""
    meta = {k: v for k, v in obj["ckpt"].items() if k != "blobs"}
    return {**obj, "ckpt": meta}


def remove(store: Store, names: Iterable[str]) -> None:
    for name in names:
        store.delete(name)


def unreferenced(store: Store, referenced: Set[str]) -> List[str]:
    """Blobs in the store that no checkpoint in ``referenced`` names."""
    return sorted(n for n in store.list(BLOB_PREFIX) if schema.BLOB_RE.fullmatch(n) and n not in referenced)


def _references(obj: Dict[str, Any]) -> Dict[Path_, List[str]]:
    found: Dict[Path_, List[str]] = {}

    def note(value: Any, path: Path_) -> Any:
        found[path] = value[MARKER]
        return value

    for k, v in obj.items():
        if k not in _OWN:
            _walk(v, (k,), None, note)
    return found


def _walk(value: Any, path: Path_, on_tensor: Optional[Callable[[torch.Tensor, Path_], Any]],
          on_marker: Optional[Callable[[Any, Path_], Any]] = None) -> Any:
    """``value`` rebuilt with tensors passed through ``on_tensor`` and blob references
    through ``on_marker`` (either may be None: left as they are)."""
    if isinstance(value, torch.Tensor):
        return on_tensor(value, path) if on_tensor is not None else value
    if is_marker(value):
        return on_marker(value, path) if on_marker is not None else value
    kind = type(value)
    if isinstance(value, dict):
        return kind((k, _walk(v, path + (k,), on_tensor, on_marker)) for k, v in value.items())
    if kind in (list, tuple):
        return kind(_walk(v, path + (i,), on_tensor, on_marker) for i, v in enumerate(value))
    return value


def _pieces(data: torch.Tensor) -> List[torch.Tensor]:
    """``data`` cut along its first dimension into pieces of about :data:`CHUNK_BYTES`."""
    if data.dim() == 0 or data.nbytes <= CHUNK_BYTES:
        return [data]
    rows = max(1, CHUNK_BYTES // max(1, data[0].nbytes))
    return [_plain(piece) for piece in torch.split(data, rows)]


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning exactly its bytes (``torch.save`` of a view would
    write the whole storage it views)."""
    data = tensor.detach().to("cpu").contiguous()
    if data.untyped_storage().nbytes() != data.nbytes or data.storage_offset():
        data = data.clone()
    return data


def _same_bytes(store: Store, name: str, data: torch.Tensor) -> bool:
    """Exactly the bytes of blob ``name`` (mapped from disk, not hashed)."""
    try:
        with store.local_path(name) as local:
            old = torchio.load(local, mmap=True)
    except (OSError, RuntimeError, ValueError, EOFError):
        return False  # gone or unreadable: write the tensor again
    if not isinstance(old, torch.Tensor) or old.dtype != data.dtype or old.shape != data.shape:
        return False
    return bool(torch.equal(_bits(old.contiguous()), _bits(data)))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as the widest integers that hold them (a bitwise
    comparison: -0.0 differs from 0.0, NaN equals itself; 8 bytes at a time is ~8x faster)."""
    raw = t.reshape(-1).view(torch.uint8)
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if raw.numel() % size == 0 and raw.data_ptr() % size == 0:
            return raw.view(dtype)
    return raw
