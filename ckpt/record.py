"""Checkpoint records: what the index says about one committed checkpoint."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

_UNSET: Any = object()


@dataclass
class CheckpointRecord:
    """One committed checkpoint: numbers, metrics, file, size, checksum and time.

    ``extra`` (the dict saved with it) is read from the file on first access; the
    tensors of the file are memory-mapped, not read.
    """

    epoch: int
    step: int
    path: Path
    metrics: Dict[str, float] = field(default_factory=dict)
    mid_epoch: bool = False
    size: int = 0
    checksum: Optional[str] = None
    time: float = 0.0
    _extra: Any = field(default=_UNSET, repr=False, compare=False)

    @property
    def key(self) -> Tuple[int, int]:
        return (self.epoch, self.step)

    @property
    def next_epoch(self) -> int:
        """The epoch a run resumed from this checkpoint continues with."""
        return self.epoch if self.mid_epoch else self.epoch + 1

    @property
    def extra(self) -> Dict[str, Any]:
        if self._extra is _UNSET:
            from . import fileio
            self._extra = copy.deepcopy(fileio.load(self.path, checksum=None).get("extra", {}))  # unmapped
        return self._extra

    def to_json(self) -> Dict[str, Any]:
        """Strict JSON: NaN and +-inf metrics become "nan"/"inf"/"-inf" (float() reads them back)."""
        metrics = {k: v if math.isfinite(v) else str(v) for k, v in self.metrics.items()}
        return {"file": self.path.name, "epoch": self.epoch, "step": self.step,
                "mid_epoch": self.mid_epoch, "metrics": metrics, "size": self.size,
                "checksum": self.checksum, "time": self.time}

    @classmethod
    def from_json(cls, entry: Dict[str, Any], directory: Path) -> "CheckpointRecord":
        return cls(epoch=int(entry["epoch"]), step=int(entry["step"]),
                   path=directory / str(entry["file"]),
                   metrics={str(k): float(v) for k, v in dict(entry.get("metrics") or {}).items()},
                   mid_epoch=bool(entry.get("mid_epoch", False)), size=int(entry.get("size", 0)),
                   checksum=entry.get("checksum"), time=float(entry.get("time", 0.0)))
