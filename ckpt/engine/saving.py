"""What a save is made of: its arguments checked, the checkpoint dict, its commit.

Both engines (:mod:`ckpt.engine.local`, and the collective one of a process group,
:mod:`ckpt.engine.collective`) check a save's arguments here before anything is
captured or written, build the dict here and commit through here, over the manager's
:class:`~ckpt.engine.base.ManagerView`; the engine decides when each runs.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from .. import options as opts
from .. import policy, resume, sampler, schema, spec
from .._version import __version__
from ..cadence import Cadence
from ..catalog.commit import check_new
from ..errors import CheckpointExistsError, ConfigError
from ..record import CheckpointRecord
from .base import ManagerView

Key = Tuple[int, int]


class SaveArgs(NamedTuple):
    """``save()``'s arguments, checked and with their defaults."""

    epoch: int
    step: int
    mid_epoch: bool
    overwrite: bool
    metrics: Dict[str, float]
    extra: Dict[str, Any]


def checked(mgr: ManagerView, epoch: Optional[int], step: Optional[int], metrics: Optional[Mapping[str, Any]],
            extra: Optional[Mapping[str, Any]], mid_epoch: bool, overwrite: bool) -> SaveArgs:
    """save()'s arguments, checked (nothing written yet) and with the manager's defaults."""
    return check_args(epoch, step, metrics, extra, mid_epoch, overwrite, counters=(mgr.epoch, mgr.step),
                      retention=mgr.policy, records=mgr.records, resumed=mgr.resumed, trackables=mgr.trackables)


def check_args(epoch: Optional[int], step: Optional[int], metrics: Optional[Mapping[str, Any]],
               extra: Optional[Mapping[str, Any]], mid_epoch: bool, overwrite: bool, *,
               counters: tuple[int, int], retention: policy.RetentionPolicy,
               records: Sequence[CheckpointRecord], resumed: Optional[CheckpointRecord],
               trackables: Mapping[str, Any]) -> SaveArgs:
    """The arguments of a save, checked (nothing written yet); ``counters`` are the
    (epoch, step) a save without numbers uses. Warnings point at the caller of save()."""
    epoch = counters[0] if epoch is None else opts.count("epoch", epoch)
    step = counters[1] if step is None else opts.count("step", step)
    mid_epoch = opts.flag("mid_epoch", mid_epoch)
    overwrite = opts.flag("overwrite", overwrite)
    metric_values = schema.metrics_to_floats(metrics)
    opts.check_monitored(retention, metric_values, mid_epoch, epoch, step)
    opts.check_monitor_recorded(retention, metric_values, list(records), epoch, step)
    if extra is not None and not isinstance(extra, Mapping):
        raise ConfigError(f"extra must be a dict, got {type(extra).__name__}",
                          hint="pass extra={'lr': lr, 'best_acc': best_acc}")
    try:
        check_new((epoch, step), mid_epoch, overwrite, list(records))
    except CheckpointExistsError as e:
        raise resume.restored_older(e, (epoch, step), resumed, records[-1] if records else None) from None
    inside = [] if mid_epoch else sampler.inside_epoch(trackables)
    if inside:
        warnings.warn(f"save(epoch={epoch}, step={step}) is an end-of-epoch checkpoint, but "
                      f"{', '.join(map(repr, inside))} is part-way "
                      "through the epoch: resuming from it starts the next epoch and skips the "
                      "rest of this one; pass mid_epoch=True for step checkpoints", stacklevel=5)
    return SaveArgs(epoch, step, mid_epoch, overwrite, metric_values, dict(extra or {}))


def protection(resumed: Optional[Key], key: Key) -> Tuple[Tuple[Key, ...], bool]:
    """What retention must keep besides the checkpoint ``key`` being committed: the
    checkpoint the run resumed from (``resumed``) until a newer one is committed; and
    whether ``key`` is newer (the manager then forgets ``resumed``)."""
    newer = resumed is None or key > resumed
    return (() if newer or resumed is None else (resumed,)), newer


def build(mgr: ManagerView, states: Dict[str, Any], epoch: int, step: int, mid_epoch: bool,
          metrics: Dict[str, float], extra: Dict[str, Any], rngs: List[Dict[str, Any]], *,
          defer_check: bool = False) -> schema.Checkpoint:
    """The checkpoint dict of ``states`` (captured from the manager's objects); ``rngs``
    holds every rank's RNG states (rank 0's first). ``defer_check``: the states are
    checked when they are staged (see :func:`ckpt.schema.build`)."""
    args = SaveArgs(epoch, step, mid_epoch, False, metrics, extra)
    return build_dict(states, args, rngs, trackables=mgr.trackables, specs=mgr.specs, cadence=mgr.cadence,
                      defer_check=defer_check)


def build_dict(states: Dict[str, Any], args: SaveArgs, rngs: List[Dict[str, Any]], *,
               trackables: Mapping[str, Any], specs: spec.SpecCache, cadence: Cadence,
               defer_check: bool = False) -> schema.Checkpoint:
    """The checkpoint dict; ``rngs`` holds every rank's RNG states (rank 0's first)."""
    checkpoint = schema.build(states, epoch=args.epoch, step=args.step, mid_epoch=args.mid_epoch,
                              metrics=args.metrics, rng=rngs[0], extra=args.extra, library_version=__version__,
                              spec=spec.checkpoint_specs(trackables, specs),
                              cadence=cadence.state_dict() if cadence.enabled else None, defer_check=defer_check)
    if len(rngs) > 1:  # a process group: each rank restores its own (see ckpt.distributed)
        checkpoint.obj["ckpt"]["rng_per_rank"] = rngs
    return checkpoint


def commit(mgr: ManagerView, checkpoint: schema.Checkpoint, overwrite: bool) -> CheckpointRecord:
    """Commit ``checkpoint`` and apply retention, in the catalog's transaction; the
    catalog's records become those kept (runs on the writer thread with ``async_save``)."""
    protected, newer = protection(mgr.protected, checkpoint.key)
    record, _ = mgr.catalog.commit(checkpoint, retention=mgr.policy, overwrite=overwrite,
                                             protected=protected, progress=mgr.options.progress,
                                             differential_save=mgr.options.differential)
    if newer:
        mgr.protected = None  # a newer checkpoint is committed: the resume source may go
    return record


def retain(mgr: ManagerView, records: List[CheckpointRecord], new: CheckpointRecord,
           indexed: Optional[Callable[[], None]] = None) -> List[CheckpointRecord]:
    """The catalog's commit-and-retention transaction over ``new``, already in place (a
    sharded save; the caller holds the lock): ``records`` and ``new`` are indexed as
    retention keeps them, then ``indexed()`` runs; the catalog's records become those kept."""
    protected, newer = protection(mgr.protected, new.key)
    candidates = sorted([r for r in records if r.key != new.key] + [new], key=lambda r: r.key)
    kept, _ = mgr.catalog.retain(candidates, mgr.policy, protected, new=new, indexed=indexed)
    if newer:
        mgr.protected = None
    return kept
