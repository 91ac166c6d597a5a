"""Differential checkpoints: only the chunks of a tensor that changed are written.

With ``CheckpointManager(..., differential=True)`` every tensor of at least
:data:`MIN_BYTES` in the tracked states is stored out of line: cut into fixed-size
chunks of rows, of which a save writes only those whose bytes differ from the previous
committed checkpoint's, into one new file ``ckpt-blob-<16 hex>.pt`` (a *pack*: a plain
``torch.save`` of a tensor). The checkpoint file holds a reference in the tensor's
place (:mod:`ckpt.format.chunks`, format 2), and its header lists every pack it
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

Which chunks changed is decided in :mod:`ckpt.format.changes`: a sample first (a tensor
trained everywhere is written whole, inline, as in a full save, after comparing a few
chunks), then every chunk, exactly, against the previous packs (usually from the page
cache), or on an object store without a local cache against the chunk digests the
previous checkpoint recorded (nothing is downloaded). The writer keeps what its last save
produced (:class:`Previous`), so a save reads the previous checkpoint's file only after
the process started.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch

from .. import schema
from ..errors import CkptError, CorruptCheckpointError, FormatVersionError, wrapped
from ..format import changes, chunks, torchfile
from ..record import CheckpointRecord
from ..storage.base import Store, capabilities
from ..storage.local import LocalStore

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


@dataclass
class Previous:
    """What the previous committed checkpoint holds, for the next differential save: per
    entry what :mod:`ckpt.format.changes` compares with, and the checksum of every pack it
    references. The writer keeps the one its own save produced (``name`` and ``checksum``
    say which checkpoint it describes), so that a save reads no file to decide."""

    entries: Dict[Path_, changes.Before]
    blobs: Dict[str, str]
    name: str = ""
    checksum: Optional[str] = None


def from_file(obj: Dict[str, Any]) -> Previous:
    """The :class:`Previous` of a checkpoint dict read from its file (references unresolved)."""
    entries: Dict[Path_, changes.Before] = {}
    for path, value in _references(obj).items():
        if isinstance(value, torch.Tensor):
            entries[path] = changes.Before(tensor=value)
        elif chunks.is_ref(value):
            entries[path] = changes.Before(ref=value[chunks.KEY])
    blobs = obj["ckpt"].get("blobs", {}) if isinstance(obj.get("ckpt"), dict) else {}
    return Previous(entries, dict(blobs) if isinstance(blobs, dict) else {})


def previous(memo: Optional[Previous], rec: CheckpointRecord,
             read: Callable[[CheckpointRecord], Optional[Dict[str, Any]]]) -> Optional[Previous]:
    """What ``rec`` (the newest checkpoint) holds, for a differential save: ``memo`` (what
    this writer's own last save produced) when it describes ``rec``, else read from its
    file (None if unreadable: the save then writes every tensor)."""
    if memo is not None and memo.name == rec.name and memo.checksum == rec.checksum is not None:
        return memo
    obj = read(rec)
    return from_file(obj) if obj is not None else None


def split(store: Store, checkpoint: schema.Checkpoint, previous: Optional[Previous],
          progress: Optional[bool] = None) -> Tuple[schema.Checkpoint, List[str], Previous]:
    """``checkpoint`` with its large tensors replaced by chunk references, the names of the
    packs written for it, and what the next save compares with. ``previous``: what the
    previous committed checkpoint holds; its chunks are reused where the bytes are equal
    and the pack holding them still matches its checksum."""
    cut = _Split(store, previous, progress)
    try:
        obj = {k: v if k in _OWN else _walk(v, (k,), cut.out_of_line) for k, v in checkpoint.obj.items()}
    except BaseException:
        remove(store, cut.written)
        raise
    used = cut.used
    meta = {**checkpoint.obj["ckpt"], "blobs": dict(sorted(used.items())), "differential": chunks.VERSION}
    obj["ckpt"] = meta
    header = replace(checkpoint.header, blobs=tuple(sorted(used.items())))
    small = schema.check_loadable({k: v for k, v in obj.items() if k not in _OWN}, "state")
    return schema.Checkpoint(obj, header, small), cut.written, Previous(cut.following, dict(used))


class _Split:
    """One differential save's walk over the checkpoint's tensors (see :func:`split`):
    the packs it wrote, the blobs it uses, what the next save compares with."""

    def __init__(self, store: Store, previous: Optional[Previous], progress: Optional[bool]) -> None:
        self.store, self.progress = store, progress
        self.before = previous.entries if previous is not None else {}
        self.known = previous.blobs if previous is not None else {}
        self.by_digest = _remote_only(store)
        self.used: Dict[str, str] = {}
        self.written: List[str] = []
        self.following: Dict[Path_, changes.Before] = {}

    def out_of_line(self, tensor: torch.Tensor, path: Path_) -> Any:
        """``tensor`` itself (small, or written whole), or its chunk reference."""
        if tensor.layout != torch.strided or tensor.dim() == 0 or \
                tensor.nelement() * tensor.element_size() < MIN_BYTES:
            return tensor
        data = tensor.detach().to("cpu").contiguous()
        old = self.before.get(path)
        decision = self._decide(data, old)
        self.following[path] = changes.Before(sample=decision.sample)
        if decision.inline or decision.changed is None:
            return tensor  # written whole, as in a full save
        done = chunks.layout(data, chunks.rows_per_chunk(data), decision.reuse, decision.changed)
        ref = done.ref[chunks.KEY]
        for name in done.reused:
            self.used[name] = self.known[name]
        if decision.digests is not None:
            ref["digests"] = decision.digests
        if done.pack is not None:
            self._write_pack(done.pack, ref)
        self.following[path].ref = ref
        return done.ref

    def _decide(self, data: torch.Tensor, old: Optional[changes.Before]) -> changes.Decision:
        """Which chunks of ``data`` changed since ``old`` (the previous save's packs opened
        only when needed, trusted only once their checksum matches)."""
        store, known = self.store, self.known
        names = list(old.ref["packs"]) if old is not None and old.ref is not None else []
        opened: Dict[int, Optional[torch.Tensor]] = {}

        def pack(i: int) -> Optional[torch.Tensor]:
            if i not in opened:
                opened[i] = _peek(store, names[i]) if 0 <= i < len(names) and names[i] in known else None
            return opened[i]

        def trusted(i: int) -> bool:
            return 0 <= i < len(names) and names[i] in known and _intact(store, names[i], known[names[i]])

        return changes.decide(data, old, pack, trusted, by_digest=self.by_digest)

    def _write_pack(self, pack: torch.Tensor, ref: Dict[str, Any]) -> None:
        """Write the changed chunks as a new pack; ``ref`` names it where it said ``""``."""
        name = new_name()
        pack_data = _plain(pack)
        result = torchfile.write(self.store, name, pack_data, nbytes=pack_data.nbytes, progress=self.progress)
        self.written.append(name)
        self.used[name] = result.checksum
        _remember(self.store, name, result.checksum)
        ref["packs"] = [name if n == "" else n for n in ref["packs"]]


def _peek(store: Store, name: str) -> Optional[torch.Tensor]:
    """Pack ``name`` as rows, memory-mapped and not checked (its checksum is checked
    before any of its chunks is reused), or None when it is gone or unreadable."""
    try:
        with store.local_path(name) as local:
            pack = torchfile.load(local, map_location="cpu", mmap=True)
    except (CkptError, OSError, RuntimeError, ValueError, EOFError):
        return None  # its chunks are written again
    return chunks.as_rows(pack) if isinstance(pack, torch.Tensor) and pack.dim() >= 1 else None


def _remote_only(store: Store) -> bool:
    """An object store without a local copy of the packs: chunks are compared by digest
    (reading the packs would download them)."""
    return capabilities(store).local_copies is None


#: Packs this process wrote or verified: (store, name) -> (checksum, file identity then).
#: A pack whose file is unchanged since (same inode, size and modification time) is not
#: read again to check it; any write to it (a corruption, a replacement) changes that.
_INTACT: Dict[Tuple[str, str], Tuple[str, Tuple[int, ...]]] = {}


def _identity(store: Store, name: str) -> Optional[Tuple[int, ...]]:
    directory = capabilities(store).local_copies  # local files only: a download is new each time
    if directory is None:
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
    the same file intact already. On an object store without a local copy: does its
    commit record say so? Reading it would download it.)"""
    seen = _INTACT.get((store.url, name))
    if seen is not None and seen[0] == checksum and seen[1] == _identity(store, name):
        return True
    recorded = capabilities(store).recorded_checksum
    if _remote_only(store) and recorded is not None:
        try:
            return bool(recorded(name) == checksum)
        except OSError:
            return False
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
            raise wrapped(CorruptCheckpointError, f"its tensor file {name} is damaged", e, path=where,
                          hint="restore an earlier checkpoint (resume() falls back to the newest one that "
                               "restores)") from e
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
    except CkptError:  # a piece missing or damaged (a ValueError too): not a malformed reference
        raise
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
            raise wrapped(CorruptCheckpointError, f"its tensor file {name} is damaged", e, path=path,
                          hint="restore an earlier checkpoint") from e
