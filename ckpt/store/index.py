"""The human-readable JSON index (``ckpt-index.json``) of a run directory.

It lists each committed checkpoint's file, epoch, step, metrics, size, checksum and
time. It is a cache: checkpoint files describe themselves, so an index that is
missing, torn, or odd in any way (a field of the wrong type, a name that does not
match its epoch and step, no checksum, a FIFO in its place) is discarded whole and
rebuilt from the files; it is never the only copy of anything.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Callable, Iterable, List, Optional

from .. import record, schema
from ..errors import FormatVersionError
from ..record import CheckpointRecord
from .base import Store

INDEX_NAME = "ckpt-index.json"
INDEX_VERSION = 1
#: An index larger than this is not one ckpt wrote (about 300 bytes per checkpoint).
MAX_INDEX_BYTES = 256 << 20
#: The ``extra`` loader of a checkpoint, by name.
LoaderFor = Callable[[str], record.ExtraLoader]


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode(store: Store, raw: bytes, loader: Optional[LoaderFor] = None) -> List[CheckpointRecord]:
    """Records listed by the index bytes ``raw``; :class:`ValueError` for anything odd."""
    if len(raw) > MAX_INDEX_BYTES:
        raise ValueError(f"{len(raw)} bytes is larger than any index ckpt writes")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_constant)
    except RecursionError as e:
        raise ValueError("nested too deeply") from e
    if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
        raise ValueError("no list of checkpoints")
    version = data.get("format")
    if type(version) is int and version > INDEX_VERSION:
        raise FormatVersionError(f"index format {version} is newer than this ckpt reads "
                                 f"({INDEX_VERSION})", path=store.where(INDEX_NAME),
                                 hint="upgrade ckpt (pip install -U ckpt) to use this directory")
    records: List[CheckpointRecord] = []
    for entry in data["checkpoints"]:
        name = entry.get("file") if isinstance(entry, dict) else None
        key = schema.parse_name(name) if isinstance(name, str) else None
        if key is None or not isinstance(name, str):
            raise ValueError(f"entry {str(entry)[:80]} names no checkpoint file")
        rec = record.from_json(entry, store.where(name), loader(name) if loader is not None else None)
        if rec.key != key:  # a record must never point at another checkpoint's file
            raise ValueError(f"entry for {name} says epoch {rec.epoch}, step {rec.step}")
        records.append(rec)
    if len({r.key for r in records}) != len(records):
        raise ValueError("lists a checkpoint twice")
    return records


def read(store: Store, raw: Optional[bytes], loader: Optional[LoaderFor] = None) -> Optional[List[CheckpointRecord]]:
    """Records of the index bytes ``raw`` (None: no index, or one to rebuild, with a warning)."""
    if raw is None:
        return None
    try:
        return decode(store, raw, loader)
    except FormatVersionError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        warnings.warn(f"{store.where(INDEX_NAME)}: index unreadable ({e}); rebuilding it from the "
                      "checkpoint files", stacklevel=3)
        return None


def read_raw(store: Store) -> Optional[bytes]:
    """The index's bytes, None when there is none (or something that is not a file)."""
    try:
        return store.read_bytes(INDEX_NAME)
    except FileNotFoundError:
        return None
    except OSError:  # a directory, a FIFO, a device in its place: read() warns and rebuilds
        return b""


def encode(records: Iterable[CheckpointRecord]) -> bytes:
    ordered = sorted(records, key=lambda r: r.key)
    payload = {"format": INDEX_VERSION, "checkpoints": [r.to_json() for r in ordered]}
    return (json.dumps(payload, indent=1) + "\n").encode("utf-8")


def write(store: Store, records: Iterable[CheckpointRecord]) -> None:
    """Commit the index atomically and durably (same protocol as checkpoints)."""
    data = encode(records)
    store.write(INDEX_NAME, lambda f: f.write(data))


def restore_bytes(store: Store, before: Optional[bytes]) -> None:
    """Put the index back to the bytes ``before`` (None: no index). The caller is raising
    the original error; if this fails too, the next scan repairs what it finds."""
    try:
        if before is None:
            store.delete(INDEX_NAME)
        else:
            store.write(INDEX_NAME, lambda f: f.write(before))
    except OSError:
        pass
