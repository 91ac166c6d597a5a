"""Retention policy: which checkpoints to keep.

Pure functions over records: no I/O, no torch, no clocks. A record is anything with
``epoch``, ``step``, ``mid_epoch`` and ``metrics``; order is by ``(epoch, step)``
numbers, never by file time. The rules (see docs/explanation/retention.md):

* no option set: keep everything (ckpt never deletes without being told to);
* otherwise keep the union of the ``keep_last`` newest, the ``keep_best`` best by
  ``monitor``/``mode``, the milestones of ``keep_every``, the newest record, and any
  ``protected`` keys (the checkpoint a run resumed from, the one just written);
* best-K ties: the earlier checkpoint keeps its place; NaN ranks below every number
  (it may fill a free slot but never evicts a finite value); +-inf are ordinary values;
  records without the monitored metric are not eligible.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Collection, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Set, Tuple, TypeVar

from .errors import ConfigError

Key = Tuple[int, int]


class RecordLike(Protocol):
    @property
    def epoch(self) -> int: ...
    @property
    def step(self) -> int: ...
    @property
    def mid_epoch(self) -> bool: ...
    @property
    def metrics(self) -> Mapping[str, float]: ...


R = TypeVar("R", bound=RecordLike)


def key_of(record: RecordLike) -> Key:
    return (record.epoch, record.step)


@dataclass(frozen=True)
class RetentionPolicy:
    """Validated retention options; see the module docstring for the semantics."""

    keep_last: Optional[int] = None
    keep_best: Optional[int] = None
    monitor: Optional[str] = None
    mode: str = "min"
    keep_every: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_best", "keep_every"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an int or None, got {value!r}",
                                  hint=f"pass {name}=3, for example, or leave it out")
            if value < (1 if name == "keep_every" else 0):
                low = "1 or more" if name == "keep_every" else "0 or more"
                raise ConfigError(f"{name} must be {low}, got {value}",
                                  hint=f"pass {name}=None to disable this rule")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {self.mode!r}",
                              hint="mode='min' for a loss, mode='max' for an accuracy")
        if self.keep_best and not self.monitor:
            raise ConfigError("keep_best needs monitor, the metric to rank by",
                              hint="pass monitor='val_loss' (a key of save(metrics=...))")
        if self.monitor is not None and not isinstance(self.monitor, str):
            raise ConfigError(f"monitor must be a metric name (str), got {self.monitor!r}",
                              hint="pass monitor='val_loss'")

    def to_json(self) -> Dict[str, Any]:
        """The options as a JSON object (the run history and ``ckpt ls --json`` store it)."""
        return {"keep_last": self.keep_last, "keep_best": self.keep_best, "monitor": self.monitor,
                "mode": self.mode, "keep_every": self.keep_every}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> RetentionPolicy:
        """The policy :meth:`to_json` wrote; raises :class:`ConfigError` (or TypeError) if invalid."""
        return cls(**{k: value.get(k) for k in ("keep_last", "keep_best", "monitor", "keep_every")},
                   mode=value.get("mode") or "min")

    @property
    def deletes(self) -> bool:
        """True when some rule may evict checkpoints."""
        return any(v is not None for v in (self.keep_last, self.keep_best, self.keep_every))


def rank_key(record: RecordLike, monitor: str, mode: str) -> Tuple[bool, float, Key]:
    """Sort key for best-K: best first, NaN last, the earlier record first on ties."""
    value = float(record.metrics[monitor])
    nan = math.isnan(value)
    return (nan, 0.0 if nan else (value if mode == "min" else -value), key_of(record))


def best(records: Iterable[R], monitor: str, mode: str, k: int) -> List[R]:
    """The ``k`` best records that carry ``monitor``, best first."""
    eligible = [r for r in records if monitor in r.metrics]
    return sorted(eligible, key=lambda r: rank_key(r, monitor, mode))[:k]


def is_milestone(record: RecordLike, keep_every: int) -> bool:
    """An end-of-epoch checkpoint after every ``keep_every`` completed epochs."""
    return not record.mid_epoch and (record.epoch + 1) % keep_every == 0


def select_kept(records: Sequence[RecordLike], policy: RetentionPolicy,
                protected: Collection[Key] = ()) -> Set[Key]:
    """Keys of the records to keep; every other record may be deleted."""
    keys = {key_of(r) for r in records}
    if not policy.deletes or not records:
        return keys
    ordered = sorted(records, key=key_of)
    kept = {key_of(ordered[-1])} | (set(protected) & keys)
    if policy.keep_last:
        kept |= {key_of(r) for r in ordered[-policy.keep_last:]}
    if policy.keep_best and policy.monitor:
        kept |= {key_of(r) for r in best(records, policy.monitor, policy.mode, policy.keep_best)}
    if policy.keep_every:
        kept |= {key_of(r) for r in records if is_milestone(r, policy.keep_every)}
    return kept


@dataclass(frozen=True)
class UnknownMonitor:
    """``monitor`` names a metric that no checkpoint of the run records."""

    monitor: str
    seen: Tuple[str, ...]  #: every metric name the run's checkpoints record, sorted
    closest: Optional[str]  #: the recorded name most like ``monitor`` (None when there is none)

    def describe(self) -> str:
        seen = ", ".join(map(repr, self.seen)) if self.seen else "none"
        close = f" (closest: {self.closest!r})" if self.closest else ""
        return (f"no checkpoint of the run records the monitored metric {self.monitor!r}; "
                f"metrics recorded: {seen}{close}")


def unknown_monitor(monitor: Optional[str], records: Iterable[RecordLike],
                    current: Collection[str] = (), *, require: bool = False) -> Optional[UnknownMonitor]:
    """The mismatch when neither ``records`` nor the ``current`` save's metrics carry
    ``monitor`` although an end-of-epoch checkpoint of the run records metrics (a typo
    would rank every checkpoint last and let best-K delete the best). ``require``: also
    when nothing is ranked yet (``ckpt prune --keep-best`` needs the metric on disk)."""
    if monitor is None or monitor in current:
        return None
    seen: Set[str] = set(current)
    ranked = require  # an end-of-epoch checkpoint with metrics: the run ranks by them
    for r in records:
        if monitor in r.metrics:
            return None
        seen.update(r.metrics)
        ranked = ranked or (bool(r.metrics) and not r.mid_epoch)
    if not ranked:
        return None  # only step checkpoints so far (training metrics): normal, nothing ranked yet
    folded = [m for m in sorted(seen) if m.casefold() == monitor.casefold()]
    close = folded or difflib.get_close_matches(monitor, sorted(seen), n=1, cutoff=0.0)
    return UnknownMonitor(monitor, tuple(sorted(seen)), close[0] if close else None)
