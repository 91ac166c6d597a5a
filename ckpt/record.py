"""Checkpoint records: what ckpt knows about one committed checkpoint.

A record is frozen and built in one place, :func:`make` (from a validated
:class:`~ckpt.schema.Header` or an index entry): every field has been checked once.
``extra``, the dict saved with the checkpoint, is read from the file on first access
through the loader the record was made with.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, field, replace
from pathlib import PurePath
from typing import Any, Callable, Dict, Optional, Tuple

from . import schema

Key = Tuple[int, int]
#: Reads the ``extra`` dict of a checkpoint (called at most once per record).
ExtraLoader = Callable[[], Dict[str, Any]]


class _Extra:
    """The ``extra`` dict of a record: given at creation, or loaded once on demand."""

    def __init__(self, value: Optional[Dict[str, Any]], loader: Optional[ExtraLoader]) -> None:
        self._value, self._loader = value, loader
        self._lock = threading.Lock()

    def get(self) -> Dict[str, Any]:
        with self._lock:
            if self._value is None:
                self._value = copy.deepcopy(self._loader()) if self._loader is not None else {}
            return self._value


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint: numbers, metrics, file, size, checksum and time."""

    epoch: int
    step: int
    path: PurePath  #: a local Path, or for a remote run an ObjectPath (prints as its URL)
    metrics: Dict[str, float] = field(default_factory=dict)
    mid_epoch: bool = False
    size: int = 0
    checksum: Optional[str] = None
    time: float = 0.0
    #: Differential checkpoints: the tensor files it references, ``((name, checksum), ...)``.
    blobs: Tuple[Tuple[str, str], ...] = ()
    _extra: _Extra = field(default_factory=lambda: _Extra({}, None), repr=False, compare=False)

    @property
    def key(self) -> Key:
        return (self.epoch, self.step)

    @property
    def name(self) -> str:
        """The file (or directory) name inside the run directory."""
        return self.path.name

    @property
    def next_epoch(self) -> int:
        """The epoch a run resumed from this checkpoint continues with."""
        return self.epoch if self.mid_epoch else self.epoch + 1

    @property
    def extra(self) -> Dict[str, Any]:
        """The ``extra`` dict saved with the checkpoint (read from the file on first access)."""
        return self._extra.get()

    def to_json(self) -> Dict[str, Any]:
        """Strict JSON: NaN and +-inf metrics become "nan"/"inf"/"-inf" (float() reads them back)."""
        metrics = {k: v if math.isfinite(v) else str(v) for k, v in self.metrics.items()}
        entry = {"file": self.path.name, "epoch": self.epoch, "step": self.step,
                 "mid_epoch": self.mid_epoch, "metrics": metrics, "size": self.size,
                 "checksum": self.checksum, "time": self.time}
        if self.blobs:
            entry["blobs"] = dict(self.blobs)
        return entry


def make(header: schema.Header, path: PurePath, *, size: int, checksum: Optional[str],
         extra: Optional[Dict[str, Any]] = None, load_extra: Optional[ExtraLoader] = None) -> CheckpointRecord:
    """The record of a checkpoint whose header has been validated."""
    return CheckpointRecord(epoch=header.epoch, step=header.step, path=path, metrics=dict(header.metrics),
                            mid_epoch=header.mid_epoch, size=size, checksum=checksum, time=header.created,
                            blobs=header.blobs, _extra=_Extra(extra, load_extra))


def from_json(entry: Any, path: PurePath, load_extra: Optional[ExtraLoader] = None) -> CheckpointRecord:
    """A record from an index entry; :class:`ValueError` for anything ckpt never writes
    (the caller then rebuilds the index from the files)."""
    if not isinstance(entry, dict):
        raise ValueError(f"index entry {entry!r} is not an object")
    where = str(path)
    checksum = entry.get("checksum")
    if not (isinstance(checksum, str) and checksum.startswith("crc32:") and len(checksum) == 14):
        raise ValueError(f"index entry for {path.name} has checksum {checksum!r}")
    size = entry.get("size")
    if type(size) is not int or size < 0:
        raise ValueError(f"index entry for {path.name} has size {size!r}")
    header = schema.Header(
        epoch=schema.count(entry.get("epoch"), "epoch", where), step=schema.count(entry.get("step"), "step", where),
        mid_epoch=schema.flag(entry.get("mid_epoch", False), "mid_epoch", where),
        metrics=schema.parse_metrics(entry.get("metrics"), where),
        created=schema.parse_time(entry.get("time", 0.0), where),
        format=schema.FORMAT_VERSION, library="", torch="", objects=(), model_spec=None,
        blobs=schema.parse_blobs(entry.get("blobs"), where))
    return make(header, path, size=size, checksum=checksum, load_extra=load_extra)


def with_extra(rec: CheckpointRecord, extra: Dict[str, Any]) -> CheckpointRecord:
    """``rec`` with its ``extra`` already known (a copy, not tied to a file mapping)."""
    return replace(rec, _extra=_Extra(copy.deepcopy(extra), None))
