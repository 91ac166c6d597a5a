"""The metric history of a run: one JSON line per committed save (``ckpt-history.jsonl``).

The index lists only what retention kept; the history keeps every save's epoch, step,
metrics and time, evicted ones included, and the retention policy in force (so that
``ckpt ls`` can say why each checkpoint is kept). A commit appends one short line after
its index is committed: a save's bookkeeping stays constant however long the run. It is
append-only and not fsynced (its own fsync would cost each save as much as the
index's): a torn or foreign line is ignored by the reader, and a crash between the index
and the append, or a power cut, loses at most the newest lines (readers merge the
index's records back in). Stores without a local directory (object stores) have
no appendable file: there the history is not kept.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Collection, Dict, List, Optional, Tuple

from .. import policy, schema
from ..errors import ConfigError, CorruptCheckpointError
from ..record import CheckpointRecord
from ..storage.base import Store
from ..storage.local import LocalStore

HISTORY_NAME = "ckpt-history.jsonl"
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
    if not isinstance(store, LocalStore):
        return
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


def read(store: Store) -> List[Entry]:
    """Every recorded save in commit order; torn or foreign lines are skipped."""
    try:
        raw = store.read_bytes(HISTORY_NAME)
    except OSError:
        return []
    entries: List[Entry] = []
    for line in raw.split(b"\n"):
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
        if isinstance(store, LocalStore):
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
