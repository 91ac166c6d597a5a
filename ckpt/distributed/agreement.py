"""What every rank's ``save()`` must agree on under a process group (see docs/howto/ddp.md).

Each rank posts a :class:`Call` (its epoch, step, mid-epoch flag, whether its state is
sharded, its retention options, the names of the metrics it passed, and the manager
options every rank must share: ``async_save``, ``differential``, the save cadence and
the run directory's name); rank 0 commits alone, so a rank that differs would be
silently overruled, or -- ``async_save`` on some ranks only -- would wait in a collective
the others never call. :func:`disagreement` names the first field that differs, with
every rank's value; nothing has been written yet. The first ``save()`` checks them all.

The directory is compared by name only: nodes may mount one shared filesystem at
different paths, but a per-rank name (a timestamp taken on each rank, a rank number in
it) means each rank has a run directory of its own.

Metric *values* may differ (retention decides on rank 0's: pass an all-reduced value),
and a rank may pass no metrics or fewer than rank 0; a metric name that rank 0 did not
pass would be dropped, so it is a disagreement.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .. import policy
from ..errors import CollectiveError, ConfigError

Settings = tuple[tuple[str, str], ...]


class Call(NamedTuple):
    epoch: int
    step: int
    mid_epoch: bool
    sharded: bool
    retention: str
    metrics: tuple[str, ...]
    settings: Settings = ()


def call(epoch: int, step: int, mid_epoch: bool, sharded: bool, retention: policy.RetentionPolicy,
         metrics: dict[str, float], settings: Settings = ()) -> Call:
    return Call(epoch, step, mid_epoch, sharded, describe(retention), tuple(sorted(metrics)), settings)


def settings(**given: object) -> Settings:
    """The options every rank must pass alike, as ``(name, repr)`` pairs (e.g. ``async_save=True``)."""
    return tuple((name, repr(value)) for name, value in given.items())


def _differing(calls: list[Call]) -> ConfigError | None:
    """The error naming the manager options the ranks were given differently (None: the same)."""
    names = [name for name, value in calls[0].settings
             if any(dict(c.settings).get(name) != value for c in calls[1:])]
    if not names:
        return None
    shown = "; ".join(f"{name}: " + ", ".join(f"rank {r}: {dict(c.settings).get(name, '(none)')}"
                                              for r, c in enumerate(calls)) for name in names)
    return ConfigError(f"ranks created their CheckpointManager with different options ({shown}); nothing was saved",
                       hint=f"pass the same {', '.join(names)} to CheckpointManager on every rank (no rank-dependent "
                            f"values; one run directory for every rank), e.g. from the same config or command line")


def describe(retention: policy.RetentionPolicy) -> str:
    """The options a manager was given, e.g. ``keep_last=3 keep_best=1 monitor='loss' mode='min'``."""
    given = {k: v for k, v in retention.to_json().items() if v is not None and k != "mode"}
    if retention.monitor is not None:
        given["mode"] = retention.mode
    order = ("keep_last", "keep_best", "monitor", "mode", "keep_every")
    return " ".join(f"{k}={given[k]!r}" for k in order if k in given) or "keep everything"


def disagreement(calls: list[Call]) -> CollectiveError | ConfigError | None:
    """The error naming what the ranks' ``calls`` disagree on (None if they agree)."""
    def each(show: Any) -> str:
        return ", ".join(f"rank {r}: {show(c)}" for r, c in enumerate(calls))

    first = calls[0]
    options = _differing(calls)
    if options is not None:
        return options
    if any(c[:4] != first[:4] for c in calls):
        shown = each(lambda c: f"epoch={c.epoch} step={c.step}" + (" mid_epoch" if c.mid_epoch else "")
                     + (" sharded" if c.sharded else ""))
        return CollectiveError(f"ranks called save() with different arguments ({shown})",
                               hint="pass the same epoch/step on every rank (and shard the same objects)")
    if any(c.retention != first.retention for c in calls):
        return CollectiveError(f"ranks called save() with different retention options ({each(lambda c: c.retention)})",
                               hint="create the CheckpointManager with the same keep_last/keep_best/monitor/mode/"
                                    "keep_every on every rank (rank 0 applies them)")
    if any(set(c.metrics) - set(first.metrics) for c in calls):
        return CollectiveError(f"ranks called save() with different metric names ({each(lambda c: list(c.metrics))})",
                               hint="pass the same metrics on every rank (all-reduce them), or on rank 0 only: "
                                    "retention decides on rank 0's")
    return None
