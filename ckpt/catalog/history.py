"""The metric history of a run: one JSON line per committed save (``ckpt-history.jsonl``).

The index lists only what retention kept; the history keeps every save's epoch, step,
metrics and time, evicted ones included, and the retention policy in force (so that
``ckpt ls`` can say why each checkpoint is kept). A commit appends one short line after
its index is committed: a save's bookkeeping stays constant however long the run. It is
append-only and not fsynced (its own fsync would cost each save as much as the
index's): a torn or foreign line is ignored by the reader, and a crash between the index
and the append, or a power cut, loses at most the newest lines (readers merge the
index's records back in).

Object stores (and a tiered run's two tiers) cannot append: there the history is a
chain of segments. The writer keeps the current segment (at most :data:`SEGMENT_MAX`
bytes) in memory and writes it inside the index, its field ``"history"``, at each
commit (:func:`stage` before the index write): the same PUT as the index, so the save's
line and its commit are one atomic write and cost no request of their own. A full
segment is first written under a name of its own (``ckpt-history-<ns>.jsonl``), and
the new current segment starts with a line naming it (``{"previous": ...}``), so a
reader of the newest saves (``ckpt ls``) reads the index and ``ckpt plot`` walks the
chain back. A run written by an earlier ckpt kept its current segment in its own
object, ``ckpt-history.jsonl``: read when the index has no such field, and carried
into the index by the next commit.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Collection, Dict, List, Optional, Tuple

from .. import policy, schema
from ..errors import ConfigError, CorruptCheckpointError
from ..record import CheckpointRecord
from ..storage.base import HISTORY_NAME as HISTORY_NAME  # the storage layer writes it whole
from ..storage.base import INDEX_NAME, Store, capabilities

#: A segment of an object store's history is rewritten whole until it holds this much.
SEGMENT_MAX = 64 << 10
#: A chain of segments longer than this is not one ckpt wrote.
MAX_SEGMENTS = 100_000
#: The current segment's bytes, as this process last wrote or read them, per store.
_TAILS: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()
#: The segment :func:`stage` prepared for the index write in progress, per store.
_STAGED: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()
#: The index's field that holds the current segment on a store that cannot append.
INDEX_FIELD = "history"
#: A line longer than this is not one ckpt wrote.
MAX_LINE = 1 << 16
Key = Tuple[int, int]


@dataclass(frozen=True)
class Entry:
    """One committed save, as the history recorded it."""

    epoch: int
    step: int
    mid_epoch: bool
    metrics: Dict[str, float]
    time: float
    retention: Optional[policy.RetentionPolicy]  #: the policy the save was committed with
    protected: Tuple[Key, ...]  #: other checkpoints it protected (the run's resume source)

    @property
    def key(self) -> Key:
        return (self.epoch, self.step)


def encode(rec: CheckpointRecord, retention: policy.RetentionPolicy, protected: Collection[Key]) -> bytes:
    metrics = {k: v if math.isfinite(v) else str(v) for k, v in rec.metrics.items()}
    keep = retention.to_json()
    line = {"epoch": rec.epoch, "step": rec.step, "mid_epoch": rec.mid_epoch, "metrics": metrics,
            "time": rec.time, "retention": keep, "protected": sorted(k for k in set(protected) if k != rec.key)}
    return (json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8")


def append(store: Store, rec: CheckpointRecord, retention: policy.RetentionPolicy,
           protected: Collection[Key] = ()) -> None:
    """Append ``rec``'s line to the run directory's file (a store that appends: see
    :func:`in_index`; the caller holds the lock and has committed the index).

    Best effort: the checkpoint is already committed, so a failure warns and the save
    succeeds.
    """
    data = encode(rec, retention, protected)
    try:
        fd = os.open(store.where(HISTORY_NAME), os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                     0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a torn last line stays alone on its line
            os.write(fd, data)  # no fsync: a power cut may lose the newest line, never the index
        finally:
            os.close(fd)
    except OSError as e:
        warnings.warn(f"{store.where(HISTORY_NAME)}: could not append to the metric history ({e}); "
                      "the checkpoint is committed", stacklevel=2)


def in_index(store: Store) -> bool:
    """Whether ``store`` keeps its current segment in the index (it has no real file to
    append to): then a commit calls :func:`stage`, not :func:`append`."""
    return capabilities(store).local_root is None


def stage(store: Store, rec: CheckpointRecord, retention: policy.RetentionPolicy,
          protected: Collection[Key] = ()) -> None:
    """Before the index commit (the caller holds the lock): the current segment with
    ``rec``'s line, for that index write to carry (:func:`for_index`); a full segment is
    written under a name of its own first."""
    line = encode(rec, retention, protected)
    tail = _tail(store, keep=True)
    if tail and len(tail) + len(line) > SEGMENT_MAX:
        archive = f"ckpt-history-{time.time_ns():020d}.jsonl"
        store.write(archive, lambda f: f.write(tail))
        tail = json.dumps({"previous": archive}, separators=(",", ":")).encode() + b"\n"
    _STAGED[store] = tail + line


def for_index(store: Store) -> Optional[str]:
    """The current segment the index write about to happen carries (None: ``store``
    appends its history to a file of its own): the staged one, else the current one."""
    if not in_index(store):
        return None
    data = _STAGED.get(store)
    return (data if data is not None else _tail(store)).decode("utf-8", "replace")


def indexed(store: Store, written: bool) -> None:
    """The index write is over: the segment it carried is the current one if ``written``."""
    data = _STAGED.pop(store, None)
    if written and data is not None:
        _TAILS[store] = data


def _tail(store: Store, keep: bool = False) -> bytes:
    """The current segment as this process knows it, else as the store has it; ``keep``:
    remember it (a writer's commit, under the lock: no one else writes it from now on)."""
    tail = _TAILS.get(store)
    if tail is None:
        tail = _stored(store)
        if tail and not tail.endswith(b"\n"):
            tail += b"\n"
        if keep:
            _TAILS[store] = tail
    return tail


def _stored(store: Store) -> bytes:
    """The current segment in the store: the index's field, else (a run an earlier ckpt
    wrote) the object ``ckpt-history.jsonl``; empty when there is neither."""
    try:
        data = json.loads(store.read_bytes(INDEX_NAME).decode("utf-8"))
    except FileNotFoundError:
        data = None
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None  # an index ckpt did not write: its segment (if any) is lost with it
    field = data.get(INDEX_FIELD) if isinstance(data, dict) else None
    if isinstance(field, str):
        return field.encode("utf-8")
    try:
        return store.read_bytes(HISTORY_NAME)
    except FileNotFoundError:
        return b""


def _previous(raw: bytes) -> Optional[str]:
    """The segment before this one, named by its first line (None: the first segment)."""
    first = raw.split(b"\n", 1)[0]
    try:
        data = json.loads(first.decode("utf-8")) if first.startswith(b'{"previous"') else None
    except (ValueError, UnicodeDecodeError):
        return None
    name = data.get("previous") if isinstance(data, dict) else None
    ok = isinstance(name, str) and name.startswith("ckpt-history-") and "/" not in name
    return name if ok else None


def _segments(store: Store) -> List[bytes]:
    """The history's bytes, oldest segment first (a missing segment ends the chain)."""
    try:
        raw = _stored(store) if in_index(store) else store.read_bytes(HISTORY_NAME)
    except OSError:
        return []
    out, seen = [raw], set()
    name = _previous(raw)
    while name is not None and name not in seen and len(out) < MAX_SEGMENTS:
        seen.add(name)
        try:
            raw = store.read_bytes(name)
        except OSError:
            break
        out.append(raw)
        name = _previous(raw)
    return out[::-1]


def read(store: Store) -> List[Entry]:
    """Every recorded save in commit order; torn or foreign lines are skipped."""
    entries: List[Entry] = []
    for line in b"\n".join(_segments(store)).split(b"\n"):
        if not line.strip() or len(line) > MAX_LINE:
            continue
        entry = parse(line)
        if entry is not None:
            entries.append(entry)
    return entries


def last(store: Store) -> Optional[Entry]:
    """The newest entry that records a policy, reading only the file's tail (``ckpt ls``
    stays fast however long the run)."""
    try:
        if capabilities(store).local_root is not None:
            with open(store.where(HISTORY_NAME), "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - 4 * MAX_LINE))
                raw = f.read()
                lines = raw.split(b"\n")[1 if size > 4 * MAX_LINE else 0:]  # the first may be cut
        else:
            lines = _stored(store).split(b"\n")
    except OSError:
        return None
    for line in reversed(lines):
        entry = parse(line) if line.strip() and len(line) <= MAX_LINE else None
        if entry is not None and entry.retention is not None:
            return entry
    return None


def parse(line: bytes) -> Optional[Entry]:
    """The entry of one line, None for anything ckpt never writes."""
    where = HISTORY_NAME
    try:
        data = json.loads(line.decode("utf-8"))
        if not isinstance(data, dict):
            return None
        protected = tuple((schema.count(k[0], "epoch", where), schema.count(k[1], "step", where))
                          for k in data.get("protected", []) if isinstance(k, list) and len(k) == 2)
        return Entry(epoch=schema.count(data.get("epoch"), "epoch", where),
                     step=schema.count(data.get("step"), "step", where),
                     mid_epoch=schema.flag(data.get("mid_epoch", False), "mid_epoch", where),
                     metrics=schema.parse_metrics(data.get("metrics"), where),
                     time=schema.parse_time(data.get("time", 0.0), where),
                     retention=_policy(data.get("retention")), protected=protected)
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError, CorruptCheckpointError):
        return None


def _policy(value: Any) -> Optional[policy.RetentionPolicy]:
    if not isinstance(value, dict):
        return None
    try:
        return policy.RetentionPolicy.from_json(value)
    except (ConfigError, TypeError):
        return None


def merged(entries: List[Entry], records: List[CheckpointRecord]) -> List[Entry]:
    """One entry per (epoch, step), the last save of each, sorted; committed records the
    history lacks (a crash before the append, a run older than the history) are added."""
    by_key: Dict[Key, Entry] = {e.key: e for e in entries}
    for rec in records:
        if rec.key not in by_key:
            by_key[rec.key] = Entry(rec.epoch, rec.step, rec.mid_epoch, dict(rec.metrics), rec.time, None, ())
    return [by_key[k] for k in sorted(by_key)]
