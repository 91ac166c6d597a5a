"""The human-readable JSON index (``ckpt-index.json``) of a run directory.

It lists each committed checkpoint's file, epoch, step, metrics, size, checksum and
time. It is a cache: checkpoint files describe themselves, so an index that is
missing, torn, or odd in any way (a field of the wrong type, a name that does not
match its epoch and step, no checksum, a FIFO in its place) is discarded whole and
rebuilt from the files; it is never the only copy of a checkpoint's record (on a store
that cannot append it carries the current metric history segment: its field
``"history"``, :mod:`ckpt.catalog.history`, read apart from the entries).

A large index is not rewritten on every save: the snapshot ``ckpt-index.json`` is
followed by a journal ``ckpt-index.log`` (JSON lines, one per commit: the records it
added, the files it dropped), folded back into the snapshot when it grows past it
(see :mod:`ckpt.catalog.book`). Readers replay the journal over the snapshot; a torn
last line (a crash mid-append) is ignored, since its checkpoint file describes itself.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

from .. import record, schema
from ..errors import FormatVersionError
from ..record import CheckpointRecord
from ..storage.base import INDEX_NAME as INDEX_NAME  # the name is the storage layer's: see there
from ..storage.base import JOURNAL_NAME as JOURNAL_NAME  # the storage layer writes it whole
from ..storage.base import Capabilities, Store, capabilities
from . import history

INDEX_VERSION = 1
#: An index larger than this is not one ckpt wrote (about 300 bytes per checkpoint).
MAX_INDEX_BYTES = 256 << 20
#: The ``extra`` loader of a checkpoint, by name.
LoaderFor = Callable[[str], record.ExtraLoader]


class Raw(NamedTuple):
    """The index's bytes as read: the snapshot and the journal (None: absent)."""

    snapshot: Optional[bytes]
    journal: Optional[bytes] = None


#: (inode, size, mtime_ns) of the snapshot and of the journal (None: absent); equal
#: identities mean no writer has committed in between.
FileId = Optional[Tuple[int, int, int]]
Identity = Tuple[FileId, FileId]


def _json(raw: bytes) -> Any:
    """Strict JSON: NaN and Infinity are refused, too deep a nesting is a ValueError."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_constant)
    except RecursionError as e:
        raise ValueError("nested too deeply") from e


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode(store: Store, raw: bytes, loader: Optional[LoaderFor] = None) -> List[CheckpointRecord]:
    """Records listed by the index bytes ``raw``; :class:`ValueError` for anything odd."""
    if len(raw) > MAX_INDEX_BYTES:
        raise ValueError(f"{len(raw)} bytes is larger than any index ckpt writes")
    data = _json(raw)
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
        raise ValueError("no list of checkpoints")
    version = data.get("format")
    if type(version) is int and version > INDEX_VERSION:
        raise FormatVersionError(f"index format {version} is newer than this ckpt reads "
                                 f"({INDEX_VERSION})", path=store.where(INDEX_NAME),
                                 hint="upgrade ckpt (pip install -U ckpt) to use this directory")
    records = [_entry(store, entry, loader) for entry in data["checkpoints"]]
    if len({r.key for r in records}) != len(records):
        raise ValueError("lists a checkpoint twice")
    return records


def replay(store: Store, records: List[CheckpointRecord], journal: bytes,
           loader: Optional[LoaderFor] = None) -> Tuple[List[CheckpointRecord], int]:
    """``records`` with the journal's whole lines applied, and the bytes those lines
    span (a torn last line is not applied); :class:`ValueError` for anything odd."""
    by_name: Dict[str, CheckpointRecord] = {r.name: r for r in records}
    end = journal.rfind(b"\n") + 1
    for line in journal[:end].splitlines():
        entry = _json(line)
        add, drop = (entry.get("add"), entry.get("drop")) if isinstance(entry, dict) else (None, None)
        if not isinstance(add, list) or not isinstance(drop, list) or set(entry) != {"add", "drop"}:
            raise ValueError(f"journal line {line[:80]!r} is not one ckpt writes")
        for name in drop:
            if not isinstance(name, str) or schema.parse_name(name) is None:
                raise ValueError(f"journal drops {str(name)[:80]}, which names no checkpoint file")
            by_name.pop(name, None)
        for item in add:
            rec = _entry(store, item, loader)
            by_name[rec.name] = rec
    return sorted(by_name.values(), key=lambda r: r.key), end


def _entry(store: Store, entry: Any, loader: Optional[LoaderFor]) -> CheckpointRecord:
    name = entry.get("file") if isinstance(entry, dict) else None
    key = schema.parse_name(name) if isinstance(name, str) else None
    if key is None or not isinstance(name, str):
        raise ValueError(f"entry {str(entry)[:80]} names no checkpoint file")
    rec = record.from_json(entry, store.where(name), loader(name) if loader is not None else None)
    if rec.key != key:  # a record must never point at another checkpoint's file
        raise ValueError(f"entry for {name} says epoch {rec.epoch}, step {rec.step}")
    return rec


def read(store: Store, raw: Raw, loader: Optional[LoaderFor] = None) -> Optional[List[CheckpointRecord]]:
    """Records of the index bytes ``raw`` (None: no index, or one to rebuild, with a warning)."""
    return read_all(store, raw, loader)[0]


def read_all(store: Store, raw: Raw,
             loader: Optional[LoaderFor] = None) -> Tuple[Optional[List[CheckpointRecord]], int]:
    """:func:`read`, and the journal bytes applied (the rest is a torn line)."""
    if raw.snapshot is None and raw.journal is None:
        return None, 0
    try:
        if raw.snapshot is None:
            raise ValueError(f"a journal ({JOURNAL_NAME}) without its snapshot")
        records = decode(store, raw.snapshot, loader)
        if raw.journal is None:
            return records, 0
        if len(raw.journal) > MAX_INDEX_BYTES:
            raise ValueError(f"a journal of {len(raw.journal)} bytes is larger than any ckpt writes")
        return replay(store, records, raw.journal, loader)
    except FormatVersionError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        warnings.warn(f"{store.where(INDEX_NAME)}: index unreadable ({e}); rebuilding it from the "
                      "checkpoint files", stacklevel=4)
        return None, 0


def read_raw(store: Store) -> Raw:
    """The index's bytes (snapshot and journal)."""
    return Raw(_read_one(store, INDEX_NAME), _read_one(store, JOURNAL_NAME))


def _read_one(store: Store, name: str) -> Optional[bytes]:
    """The bytes of ``name``, None when there is none (or something that is not a file)."""
    try:
        return store.read_bytes(name)
    except FileNotFoundError:
        return None
    except OSError:  # a directory, a FIFO, a device in its place: read() warns and rebuilds
        return b""


def identity(store: Store, caps: Optional[Capabilities] = None) -> Optional[Identity]:
    """The index's ``Identity``, None where the store cannot tell (then it is re-read);
    ``caps``: the store's capabilities, if the caller keeps them."""
    ident = (caps or capabilities(store)).identity
    if ident is None:
        return None
    return ident(INDEX_NAME), ident(JOURNAL_NAME)


def encode(records: Iterable[CheckpointRecord], segment: Optional[str] = None) -> bytes:
    """The snapshot's bytes; ``segment``: the current metric history segment, kept in the
    index on a store that cannot append (:func:`ckpt.catalog.history.stage`)."""
    ordered = sorted(records, key=lambda r: r.key)
    payload: Dict[str, Any] = {"format": INDEX_VERSION, "checkpoints": [r.to_json() for r in ordered]}
    if segment is not None:
        payload[history.INDEX_FIELD] = segment
    return (json.dumps(payload, indent=1) + "\n").encode("utf-8")


def encode_line(added: Iterable[CheckpointRecord], dropped: Iterable[str]) -> bytes:
    """One journal line: the records a commit added and the files it dropped."""
    payload = {"add": [r.to_json() for r in added], "drop": list(dropped)}
    return (json.dumps(payload, separators=(",", ":")) + "\n").encode("utf-8")


def write(store: Store, records: Iterable[CheckpointRecord]) -> int:
    """Commit the index whole, atomically and durably (same protocol as checkpoints),
    then drop the journal it folds in; returns the snapshot's size. A journal that
    outlives its snapshot (a crash in between) replays to the same records. On a store
    that cannot append, the current metric history segment rides along (the save's
    line too, once staged: :func:`ckpt.catalog.history.stage`)."""
    written = False
    try:
        data = encode(records, history.for_index(store))
        store.write(INDEX_NAME, lambda f: f.write(data))
        written = True
    finally:
        history.indexed(store, written)
    ident = identity(store)
    if ident is None or ident[1] is not None:
        store.delete(JOURNAL_NAME)
    return len(data)
