"""Differential checkpoints: only the chunks of a tensor that changed are written.

With ``CheckpointManager(..., differential=True)`` every tensor of at least
:data:`MIN_BYTES` in the tracked states is stored out of line: cut into fixed-size
chunks of rows, of which a save writes only those whose bytes differ from the previous
committed checkpoint's, into one new file ``ckpt-blob-<16 hex>.pt`` (a *pack*: a plain
``torch.save`` of a tensor). The checkpoint file holds a reference in the tensor's
place (:mod:`ckpt.store.chunks`, format 2), and its header lists every pack it
references with the pack's checksum (``ckpt["blobs"]``), and so does its index entry.
Checkpoints of format 1 (a list of whole-tensor blobs, ``{"ckpt_blob": [...]}``) are
still read. Why chunks of rows: ``docs/explanation/differential.md``.

Guarantees, as for full checkpoints:

* every checkpoint restores on its own through ckpt (its packs are loaded, each
  verified against its checksum); :func:`standalone` gives the plain dict for export;
* a chunk is reused only when its bytes equal the new ones *and* the pack holding it
  matches its recorded checksum (a damaged pack is never referenced again);
* packs are committed (atomically, durably) before the checkpoint that references them,
  so a crash leaves at most unreferenced packs, deleted by a writer that holds the
  directory's lock (``collect``), never by a reader;
* retention deletes a pack only after the commit, and only when no kept checkpoint
  references it.

The comparison is exact (bytes, not a hash): detecting an unchanged chunk costs one
read of the previous packs (usually from the page cache), not a write and an ``fsync``.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch

from .. import schema
from ..errors import CkptError, CorruptCheckpointError, FormatVersionError
from . import chunks, torchfile
from .base import Store
from .local import LocalStore

MARKER = "ckpt_blob"
BLOB_PREFIX = "ckpt-blob-"
#: Smaller tensors stay inline: a file per tensor costs more than it saves below this.
MIN_BYTES = 64 << 10

Path_ = Tuple[Any, ...]
#: Entries of the checkpoint dict that are not tracked state (never stored out of line).
_OWN = frozenset({"epoch", "step", "metrics", "rng", "extra", "ckpt"})


def new_name() -> str:
    return f"{BLOB_PREFIX}{secrets.token_hex(8)}.pt"


def is_marker(value: Any) -> bool:
    """A reference in place of a tensor: format 2 (chunks) or format 1 (whole blobs)."""
    if chunks.is_ref(value):
        return True
    names = value.get(MARKER) if type(value) is dict and len(value) == 1 else None
    return isinstance(names, list) and bool(names) and all(isinstance(n, str) for n in names)


def split(store: Store, checkpoint: schema.Checkpoint, previous: Optional[Dict[str, Any]],
          progress: Optional[bool] = None) -> Tuple[schema.Checkpoint, List[str]]:
    """``checkpoint`` with its large tensors replaced by chunk references, and the names
    of the packs written for it. ``previous``: the previous committed checkpoint's dict
    (references unresolved), whose chunks are reused where the bytes are equal and the
    pack holding them still matches its checksum."""
    before = _references(previous) if previous is not None else {}
    known: Dict[str, str] = dict(previous["ckpt"].get("blobs", {})) if previous is not None else {}
    used: Dict[str, str] = {}
    written: List[str] = []

    def peek(name: str) -> Optional[torch.Tensor]:
        if name not in known:
            return None
        try:
            with store.local_path(name) as local:
                pack = torchfile.load(local, map_location="cpu", mmap=True)  # checked if reused
        except (CkptError, OSError, RuntimeError, ValueError, EOFError):
            return None  # gone or unreadable: its chunks are written again
        return pack if isinstance(pack, torch.Tensor) else None

    def verified(name: str) -> bool:
        return _intact(store, name, known[name])

    def out_of_line(tensor: torch.Tensor, path: Path_) -> Any:
        if tensor.layout != torch.strided or tensor.dim() == 0 or \
                tensor.nelement() * tensor.element_size() < MIN_BYTES:
            return tensor
        old = before.get(path)
        data = _plain(tensor)
        if isinstance(old, torch.Tensor) and chunks.changed_everywhere(data, old):
            return tensor  # trained since the last save too: inline, as in a full save
        prior = old[chunks.KEY] if old is not None and chunks.is_ref(old) else None
        done = chunks.plan(data, prior, peek, verified)
        if done.trained:
            return tensor  # every sampled chunk changed: inline (chunks would cost more)
        ref = done.ref[chunks.KEY]
        for name in done.reused:
            used[name] = known[name]
        if done.pack is not None:
            name = new_name()
            result = torchfile.write(store, name, done.pack, nbytes=done.pack.nbytes, progress=progress)
            written.append(name)
            used[name] = result.checksum
            _remember(store, name, result.checksum)
            ref["packs"] = [name if n == "" else n for n in ref["packs"]]
        return done.ref

    try:
        obj = {k: v if k in _OWN else _walk(v, (k,), out_of_line) for k, v in checkpoint.obj.items()}
    except BaseException:
        remove(store, written)
        raise
    meta = {**checkpoint.obj["ckpt"], "blobs": dict(sorted(used.items())), "differential": chunks.VERSION}
    obj["ckpt"] = meta
    header = replace(checkpoint.header, blobs=tuple(sorted(used.items())))
    small = schema.check_loadable({k: v for k, v in obj.items() if k not in _OWN}, "state")
    return schema.Checkpoint(obj, header, small), written


#: Packs this process wrote or verified: (store, name) -> (checksum, file identity then).
#: A pack whose file is unchanged since (same inode, size and modification time) is not
#: read again to check it; any write to it (a corruption, a replacement) changes that.
_INTACT: Dict[Tuple[str, str], Tuple[str, Tuple[int, ...]]] = {}


def _identity(store: Store, name: str) -> Optional[Tuple[int, ...]]:
    local = getattr(store, "local", store)  # a tiered store: its local cache
    directory = getattr(local, "directory", None)  # local files only: a download is new each time
    if not isinstance(directory, Path):
        return None
    try:
        st = (directory / name).stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _remember(store: Store, name: str, checksum: str) -> None:
    ident = _identity(store, name)
    if ident is not None:
        _INTACT[(store.url, name)] = (checksum, ident)


def _intact(store: Store, name: str, checksum: str) -> bool:
    """Does pack ``name`` match ``checksum``? (Read and summed unless this process saw
    the same file intact already.)"""
    seen = _INTACT.get((store.url, name))
    if seen is not None and seen[0] == checksum and seen[1] == _identity(store, name):
        return True
    try:
        with store.local_path(name) as local, torchfile.opened(local) as real:
            torchfile.verify(real, checksum)
    except (CkptError, OSError):
        _INTACT.pop((store.url, name), None)
        return False
    _remember(store, name, checksum)
    return True


def resolve(store: Store, obj: Dict[str, Any], header: schema.Header, *, map_location: Any = "cpu",
            progress: Optional[bool] = None) -> Dict[str, Any]:
    """The checkpoint dict with every reference (format 1: whole blobs, format 2: chunks)
    replaced by its tensor, each file it reads verified against its checksum."""
    checksums = dict(header.blobs)
    where = store.where(schema.file_name(header.epoch, header.step))

    def load(name: str) -> torch.Tensor:
        if name not in checksums:
            raise CorruptCheckpointError(f"references {name}, which its header does not list", path=where)
        try:
            with store.local_path(name) as local:
                piece = torchfile.load(local, map_location=map_location, checksum=checksums[name],
                                       progress=progress)
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"its tensor file {name} is missing", path=where,
                                         hint="restore an earlier checkpoint (resume() falls back to "
                                              "the newest one that restores)") from e
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"its tensor file {name} is damaged: {e}", path=where,
                                         hint="restore an earlier checkpoint (resume() falls back to "
                                              "the newest one that restores)") from e
        if not isinstance(piece, torch.Tensor):
            raise CorruptCheckpointError(f"{name} does not hold a tensor", path=store.where(name))
        return piece

    def whole(value: Any, path: Path_) -> Any:
        if chunks.is_ref(value):
            return _chunked(value[chunks.KEY], load, where)
        pieces = [load(name) for name in value[MARKER]]
        try:
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        except RuntimeError as e:
            raise CorruptCheckpointError(f"the pieces {value[MARKER]} do not fit together ({e})", path=where) from e

    return {k: v if k in _OWN else _walk(v, (k,), None, whole) for k, v in obj.items()}


def _chunked(ref: Dict[str, Any], load: Callable[[str], torch.Tensor], where: Any) -> torch.Tensor:
    if ref.get("v") != chunks.VERSION:
        raise FormatVersionError(f"a tensor is stored in differential format {ref.get('v')!r}; this ckpt "
                                 f"reads formats 1 and {chunks.VERSION}", path=where,
                                 hint="upgrade ckpt to read it")
    try:
        tensor, _ = chunks.gather(ref, load)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CorruptCheckpointError(f"a chunked tensor reference is malformed ({e})", path=where) from e
    if tensor is None or list(tensor.shape) != [int(d) for d in ref["shape"]]:
        raise CorruptCheckpointError("a chunked tensor reference does not describe its tensor", path=where)
    return tensor


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


def _references(obj: Dict[str, Any]) -> Dict[Path_, Any]:
    """Every reference and every inline tensor of a checkpoint dict, by its path."""
    found: Dict[Path_, Any] = {}

    def note(value: Any, path: Path_) -> Any:
        found[path] = value
        return value

    for k, v in obj.items():
        if k not in _OWN:
            _walk(v, (k,), note, note)
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


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning exactly its bytes (``torch.save`` of a view would
    write the whole storage it views)."""
    data = tensor.detach().to("cpu").contiguous()
    if data.untyped_storage().nbytes() != data.nbytes or data.storage_offset():
        data = data.clone()
    return data


def resolve_beside(path: Path, obj: Any, *, map_location: Any = "cpu") -> Any:
    """A checkpoint read from a file, outside any manager, with its references resolved
    from the files beside it (every other object is returned as it is)."""
    if not schema.is_checkpoint(obj):
        return obj
    head = schema.header(obj, str(path))
    if not head.blobs and not any(is_marker(v) for v in _references(obj).values()):
        return obj
    return resolve(LocalStore(path.parent, create=False), obj, head, map_location=map_location)


def verify_beside(path: Path, blobs: Iterable[Tuple[str, str]], *, progress: Optional[bool] = None) -> None:
    """Raise :class:`CorruptCheckpointError` naming the first tensor file of ``blobs``
    (``(name, checksum)``, beside ``path``) that is missing or fails its checksum."""
    for name, checksum in blobs:
        blob = path.parent / name
        try:
            with torchfile.opened(blob) as real:
                torchfile.verify(real, checksum, progress=progress, shown=blob)
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"its tensor file {name} is missing", path=path,
                                         hint="restore an earlier checkpoint") from e
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"its tensor file {name} is damaged: {e}", path=path,
                                         hint="restore an earlier checkpoint") from e
