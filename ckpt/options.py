"""The manager's options, validated in one place, before anything is read or written.

A configuration mistake is never taken for file damage and never deletes a
checkpoint: a device this machine lacks, a flag that is not a bool, a misspelled
option, a monitored metric missing from an epoch's metrics all raise
:class:`~ckpt.errors.ConfigError` here, naming what was given and what to pass.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional

import torch

from . import policy, schema, state
from .errors import ConfigError

#: The keyword options of CheckpointManager (anything else is a tracked object).
OPTION_NAMES = ("keep_last", "keep_best", "monitor", "mode", "keep_every", "map_location", "weights_only",
                "strict", "progress", "preemption", "async_save", "every_steps", "every_seconds", "max_overhead",
                "differential", "storage_options", "cache_dir", "collective_timeout")


@dataclass(frozen=True)
class Options:
    """How a manager loads and writes (retention is :class:`~ckpt.policy.RetentionPolicy`)."""

    map_location: Any = "cpu"
    weights_only: bool = True
    strict: bool = True
    progress: Optional[bool] = None
    async_save: bool = False
    differential: bool = False
    collective_timeout: Optional[float] = None  # None: the process group's own timeout + a margin

    @classmethod
    def check(cls, *, map_location: Any, weights_only: Any, strict: Any, progress: Any,
              async_save: Any, differential: Any = False, collective_timeout: Any = None) -> Options:
        if progress is not None:
            flag("progress", progress)
        return cls(map_location=check_map_location(map_location), weights_only=flag("weights_only", weights_only),
                   strict=flag("strict", strict), progress=progress, async_save=flag("async_save", async_save),
                   differential=flag("differential", differential),
                   collective_timeout=None if collective_timeout is None
                   else seconds("collective_timeout", collective_timeout))


def seconds(name: str, value: Any) -> float:
    """A positive, finite number of seconds (a bool or a string is a mistake)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}",
                          hint=f"pass {name}=600.0, for example")
    return float(value)


def flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool: ``weights_only=0`` or ``overwrite="no"`` are mistakes."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}",
                          hint=f"pass {name}=True or {name}=False")
    return value


def count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative int, got {value!r}",
                          hint=f"pass {name}=<loop counter>, e.g. save(epoch=epoch, step=global_step)")
    return value


def check_map_location(value: Any) -> Any:
    """A ``map_location`` that this machine can load onto (checked before any load, so a
    typo or a missing device is a clear error, never a file that looks damaged)."""
    if value is None or callable(value) or isinstance(value, dict):
        return value  # torch's own forms: applied per storage, checked by torch itself
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"map_location={value!r} is not a device ({e})",
                          hint="pass 'cpu' (the default), 'cuda', 'cuda:1' or a torch.device") from e
    if device.type == "cpu" or device.type == "meta":
        present = device.index in (None, 0)
    elif device.type == "cuda":
        present = torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    elif device.type == "mps":
        present = bool(torch.backends.mps.is_available()) and device.index in (None, 0)
    else:
        present = False
    if not present:
        raise ConfigError(f"map_location={value!r}: this machine has no device {str(device)!r}",
                          hint="pass map_location='cpu' (loads anything), or a device this machine has")
    return value


def check_location(location: Any, storage_options: Any, cache_dir: Any) -> None:
    """The run directory is a path or a URL; ``storage_options`` and ``cache_dir`` belong
    to a URL run directory, and have their types."""
    from .storage import is_url  # the store package imports nothing of the manager's
    if not isinstance(location, (str, os.PathLike)) or not isinstance(os.fspath(location), str):
        raise ConfigError(f"the run directory must be a path, got {location!r} ({type(location).__name__})",
                          hint="pass a pathlib.Path or a str path such as 'runs/exp1' (created if missing), "
                               "or a URL such as 's3://bucket/runs/exp1' for remote storage")
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise ConfigError(f"storage_options must be a dict, got {type(storage_options).__name__}",
                          hint="pass storage_options={'key': ..., 'secret': ..., "
                               "'client_kwargs': {'endpoint_url': ...}}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise ConfigError(f"cache_dir must be a local directory path, got {cache_dir!r}",
                          hint="pass cache_dir='/local/ssd/run1'")
    if (storage_options is not None or cache_dir is not None) and not is_url(location):
        raise ConfigError(f"storage_options and cache_dir apply to a URL run directory, not {location!r}",
                          hint="pass a URL such as 's3://bucket/run1', or drop these options")
    if cache_dir is not None and is_url(cache_dir):
        raise ConfigError(f"cache_dir must be a local directory, got the URL {cache_dir!r}",
                          hint="pass a path on a local disk")


def check_trackables(trackables: Mapping[str, Any]) -> None:
    """Every keyword that is not an option must be an object ckpt can track."""
    for name, obj in trackables.items():
        if name in schema.RESERVED:
            raise ConfigError(f"{name!r} is a reserved checkpoint entry, not a trackable name",
                              hint=f"track it under another name, e.g. my_{name}=...")
        close = difflib.get_close_matches(name, OPTION_NAMES, n=1, cutoff=0.6)
        if close and not state.trackable(obj) and _option_like(obj):
            raise ConfigError(f"{name}={obj!r} is not an option of CheckpointManager - did you mean "
                              f"{close[0]!r}?", hint=f"pass {close[0]}=...; options are {', '.join(OPTION_NAMES)}")
        state.check_trackable(name, obj)


def _option_like(value: Any) -> bool:
    """Could ``value`` be meant for an option (a number, a string, a flag, a list of signals)?"""
    if isinstance(value, (list, tuple)):
        return all(_option_like(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.device))


def check_monitored(retention: policy.RetentionPolicy, metrics: Dict[str, float], mid_epoch: bool,
                    epoch: int, step: int) -> None:
    """An end-of-epoch save whose metrics lack the monitored one is a typo, not a
    checkpoint to rank last: it would let best-K delete every other checkpoint."""
    monitor = retention.monitor
    if monitor is None or not metrics or mid_epoch or monitor in metrics:
        return
    close = difflib.get_close_matches(monitor, list(metrics), n=1, cutoff=0.0)
    raise ConfigError(
        f"save(epoch={epoch}, step={step}) got metrics {sorted(metrics)} without the monitored "
        f"{monitor!r}" + (f" (closest: {close[0]!r})" if close else "") + "; nothing was written",
        hint=f"pass metrics={{{monitor!r}: ...}}, or create the manager with monitor={close[0]!r}"
             if close else f"pass metrics={{{monitor!r}: ...}}")


def check_monitor_recorded(retention: policy.RetentionPolicy, metrics: Dict[str, float],
                           records: Iterable[policy.RecordLike], epoch: int, step: int) -> None:
    """Best-K ranks by ``monitor``: when neither this save nor any checkpoint of the run
    records it (a typo, another name after a restart), retention would keep none of the
    best and delete them; a mid-epoch save or ``metrics={}`` must not slip past this."""
    if not retention.keep_best:
        return
    wrong = policy.unknown_monitor(retention.monitor, records, metrics)
    if wrong is None:
        return
    fix = f"create the manager with monitor={wrong.closest!r}" if wrong.closest else \
        f"pass metrics={{{wrong.monitor!r}: ...}} at the end of an epoch"
    raise ConfigError(f"save(epoch={epoch}, step={step}): {wrong.describe()}; nothing was written or deleted",
                      hint=f"{fix}, or pass metrics={{{wrong.monitor!r}: ...}} if it is a new metric")
