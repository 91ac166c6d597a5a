"""What a save is made of: its arguments, checked, and the checkpoint dict.

``CheckpointManager.save`` and the collective save of a process group
(:mod:`ckpt.distributed.coordinator`) both check the arguments here before anything is
captured or written, and build the dict here; the manager decides when they run.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from . import options as opts
from . import policy, resume, sampler, schema, spec
from ._version import __version__
from .cadence import Cadence
from .errors import CheckpointExistsError, ConfigError
from .record import CheckpointRecord
from .store.commit import check_new

Key = Tuple[int, int]


class SaveArgs(NamedTuple):
    """``save()``'s arguments, checked and with their defaults."""

    epoch: int
    step: int
    mid_epoch: bool
    overwrite: bool
    metrics: Dict[str, float]
    extra: Dict[str, Any]


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


def build(states: Dict[str, Any], args: SaveArgs, rngs: List[Dict[str, Any]], *, trackables: Mapping[str, Any],
          specs: spec.SpecCache, cadence: Cadence) -> schema.Checkpoint:
    """The checkpoint dict; ``rngs`` holds every rank's RNG states (rank 0's first)."""
    checkpoint = schema.build(states, epoch=args.epoch, step=args.step, mid_epoch=args.mid_epoch,
                              metrics=args.metrics, rng=rngs[0], extra=args.extra, library_version=__version__,
                              spec=spec.checkpoint_specs(trackables, specs),
                              cadence=cadence.state_dict() if cadence.enabled else None)
    if len(rngs) > 1:  # a process group: each rank restores its own (see ckpt.distributed)
        checkpoint.obj["ckpt"]["rng_per_rank"] = rngs
    return checkpoint
