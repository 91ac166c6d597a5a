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
chain of segments. The writer keeps the current segment ``ckpt-history.jsonl`` (at
most :data:`SEGMENT_MAX` bytes) in memory and rewrites it whole at each commit: one
small object, whatever the run's length. A full segment is first written under a name
of its own (``ckpt-history-<ns>.jsonl``), and the new current segment starts with a
line naming it (``{"previous": ...}``), so a reader of the newest saves (``ckpt ls``)
reads one object and ``ckpt plot`` walks the chain back.
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
from ..storage.base import Store, capabilities

#: A segment of an object store's history is rewritten whole until it holds this much.
SEGMENT_MAX = 64 << 10
#: A chain of segments longer than this is not one ckpt wrote.
MAX_SEGMENTS = 100_000
#: The current segment's bytes, as this process last wrote or read them, per store.
_TAILS: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()
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
    """Append ``rec``'s line (the caller holds the lock and has committed the index).

    Best effort: the checkpoint is already committed, so a failure warns and the save
    succeeds.
    """
    data = encode(rec, retention, protected)
    if capabilities(store).local_root is None:  # no real file to append to
        _rewrite(store, data)
        return
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


def _rewrite(store: Store, line: bytes) -> None:
    """Append ``line`` to the current segment of a store that cannot append (best effort)."""
    try:
        tail = _TAILS.get(store)
        if tail is None:
            try:
                tail = store.read_bytes(HISTORY_NAME)
            except FileNotFoundError:
                tail = b""
            if tail and not tail.endswith(b"\n"):
                tail += b"\n"
        if tail and len(tail) + len(line) > SEGMENT_MAX:
            archive = f"ckpt-history-{time.time_ns():020d}.jsonl"
            full = tail
            store.write(archive, lambda f: f.write(full))
            tail = json.dumps({"previous": archive}, separators=(",", ":")).encode() + b"\n"
        data = tail + line
        _TAILS.pop(store, None)  # until the write succeeded
        store.write(HISTORY_NAME, lambda f: f.write(data))
        _TAILS[store] = data
    except (OSError, TypeError) as e:
        warnings.warn(f"{store.where(HISTORY_NAME)}: could not record the save in the metric history ({e}); "
                      "the checkpoint is committed", stacklevel=3)


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
        raw = store.read_bytes(HISTORY_NAME)
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
            lines = store.read_bytes(HISTORY_NAME).split(b"\n")
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
