"""Checkpoints that ckpt did not write, and weights for other tools.

``CheckpointManager.restore(path)`` reads the dicts users already have and maps them
onto the tracked objects:

* the common ``torch.save`` layouts: ``model_state_dict`` / ``optimizer_state_dict`` /
  ``scheduler_state_dict`` / ``epoch`` / ``loss`` (and the short names ``model``,
  ``optimizer``, ``scheduler``, ``scaler``, ``<name>_state_dict`` for any tracked name);
* a bare state dict (``torch.save(model.state_dict(), path)``);
* PyTorch Lightning ``.ckpt`` files: ``state_dict`` (the LightningModule's attribute
  prefix, e.g. ``net.``, is dropped when that makes the keys fit), ``optimizer_states``
  and ``lr_schedulers`` (in the order the optimizers/schedulers are tracked),
  ``global_step``, and the epoch from Lightning's loop progress.

``epoch`` in a plain file is read as the last *finished* epoch (the PyTorch tutorial
convention: resume at ``epoch + 1``); a file without one restores as "epoch 0, not yet
finished", so ``record.next_epoch`` is 0. Top-level numbers become ``metrics``; every
other entry that is not mapped is kept in ``record.extra``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from .. import record, schema, state
from ..errors import CorruptCheckpointError, StateMismatchError
from ..format import torchfile
from ..record import CheckpointRecord
from ..spec import pick_module

ALIASES = {
    "module": ("model_state_dict", "model_state", "state_dict", "model", "net", "network", "module"),
    "optimizer": ("optimizer_state_dict", "optimizer_state", "optimizer", "optim", "opt"),
    "scheduler": ("scheduler_state_dict", "lr_scheduler_state_dict", "scheduler", "lr_scheduler", "sched"),
    "scaler": ("scaler_state_dict", "grad_scaler_state_dict", "scaler", "grad_scaler"),
}
_LIGHTNING_LISTS = {"optimizer": "optimizer_states", "scheduler": "lr_schedulers"}
_EPOCH_KEYS = ("epoch",)
_STEP_KEYS = ("global_step", "step", "iteration", "iter")
_LIGHTNING_KEYS = ("pytorch-lightning_version", "loops", "callbacks", "hparams_name")


def record_for(path: Path, *, weights_only: bool = True) -> CheckpointRecord:
    """A record for any checkpoint file: ckpt's own, or a foreign layout."""
    obj = torchfile.load(path, weights_only=weights_only, check_records=True)  # its own CRCs
    return record_of(obj, path, weights_only=weights_only)


def record_of(obj: Any, path: Path, *, weights_only: bool = True) -> CheckpointRecord:
    """The record of a loaded file: ckpt's own header, or what a foreign layout says."""
    if schema.is_checkpoint(obj):
        head = schema.header(obj, str(path))
    else:
        epoch, step, mid_epoch = progress(obj)
        head = schema.Header(epoch=epoch, step=step, mid_epoch=mid_epoch, metrics=_metrics(obj),
                             created=path.stat().st_mtime, format=schema.FORMAT_VERSION, library="foreign",
                             torch="", objects=(), model_spec=None)
    extra = obj.get("extra") if schema.is_checkpoint(obj) else None
    return record.make(head, path, size=path.stat().st_size, checksum=None,
                       extra=dict(extra) if isinstance(extra, dict) else None,
                       load_extra=lambda: torchfile.load(path, weights_only=weights_only, mmap=False).get("extra", {}))


def as_checkpoint(obj: Any, trackables: Mapping[str, Any], path: str) -> Dict[str, Any]:
    """``obj`` in ckpt's layout: validated as is when ckpt wrote it, else converted."""
    if schema.is_checkpoint(obj):
        schema.header(obj, path)
        return dict(obj)
    if isinstance(obj, nn.Module):  # torch.save(model): only loads with weights_only=False
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CorruptCheckpointError(f"holds a {type(obj).__name__}, not a checkpoint dict", path=path,
                                     hint="restore() reads dicts of state dicts and bare state dicts")
    states, used = _map_states(dict(obj), trackables, path)
    epoch, step, mid_epoch = progress(obj)
    extra = {k: v for k, v in obj.items() if k not in used and k not in _metrics(obj)
             and k not in _EPOCH_KEYS + _STEP_KEYS}
    return {**states, "epoch": epoch, "step": step, "metrics": _metrics(obj), "rng": {}, "extra": extra,
            "ckpt": {"format": schema.FORMAT_VERSION, "library": "foreign", "mid_epoch": mid_epoch,
                     "objects": list(states)}}


def _kind(obj: Any) -> str:
    obj = state.unwrap(obj)
    if isinstance(obj, nn.Module):
        return "module"
    if isinstance(obj, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
        return "scheduler"
    if type(obj).__name__ == "GradScaler":
        return "scaler"
    return "other"


def is_state_dict(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _map_states(obj: Dict[str, Any], trackables: Mapping[str, Any], path: str) -> Tuple[Dict[str, Any], Set[str]]:
    """{tracked name: its state} found in ``obj``, and the keys of ``obj`` that were used."""
    kinds = {name: _kind(o) for name, o in trackables.items()}
    modules = [n for n, k in kinds.items() if k == "module"]
    if is_state_dict(obj):
        if not modules:
            raise StateMismatchError("the file is a bare state dict, but no module is tracked", path=path,
                                     hint="track the model: CheckpointManager(dir, model=model)")
        name = pick_module(modules)
        if name is None:
            raise StateMismatchError(f"the file is a bare state dict, and several modules are tracked "
                                     f"({modules}), none named 'model'", path=path,
                                     hint="track the module it belongs to as model=, or load it "
                                          "yourself: module.load_state_dict(torch.load(path))")
        return {name: _fit(obj, trackables[name])}, set(obj)
    states: Dict[str, Any] = {}
    used: Set[str] = set()
    for name in trackables:  # exact names first, so aliases never steal a named entry
        key = next((k for k in (name, f"{name}_state_dict", f"{name}_state") if k in obj), None)
        if key is not None:
            states[name], used = obj[key], used | {key}
    for name, kind in kinds.items():
        if name in states:
            continue
        key = next((k for k in ALIASES.get(kind, ()) if k in obj and k not in used
                    and isinstance(obj[k], (Mapping, nn.Module))), None)
        if key is not None:
            states[name], used = obj[key], used | {key}
        elif kind in _LIGHTNING_LISTS and isinstance(obj.get(_LIGHTNING_LISTS[kind]), list):
            same = [n for n, k in kinds.items() if k == kind]
            entries = obj[_LIGHTNING_LISTS[kind]]
            if same.index(name) < len(entries):
                states[name] = entries[same.index(name)]
                used.add(_LIGHTNING_LISTS[kind])
    for name, value in list(states.items()):
        if isinstance(value, nn.Module):
            value = value.state_dict()
        if kinds[name] == "module" and isinstance(value, Mapping):
            value = _fit(value, trackables[name])
        states[name] = value
    return states, used


def _fit(weights: Mapping[str, Any], module: Any) -> Mapping[str, Any]:
    """Drop a Lightning-style attribute prefix (``net.``) when that makes the keys fit."""
    own = set(state.unwrap(module).state_dict())
    weights = state.strip_wrapper_prefix(weights, own)
    if set(weights) == own:
        return weights
    for prefix in sorted({k.split(".", 1)[0] + "." for k in weights if "." in k}):
        inner = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if set(inner) == own:
            return inner
    return weights  # state.restore names the missing and unexpected keys


def progress(obj: Any) -> Tuple[int, int, bool]:
    """(epoch, step, mid_epoch) of a foreign checkpoint dict."""
    if not isinstance(obj, Mapping):
        return 0, 0, True
    step = next((n for n in (_int(obj.get(k)) for k in _STEP_KEYS) if n is not None), 0)
    lightning = _lightning_epochs(obj)
    if lightning is not None:
        started, processed = lightning
        if started > processed:  # saved inside an epoch
            return started - 1, step, True
        return max(processed - 1, 0), step, processed == 0
    epoch = next((n for n in (_int(obj.get(k)) for k in _EPOCH_KEYS) if n is not None), None)
    return (0, step, True) if epoch is None else (epoch, step, False)


def has_counters(obj: Any) -> bool:
    """Whether a foreign dict records its epoch or step at all (else both read as 0)."""
    return isinstance(obj, Mapping) and (_lightning_epochs(obj) is not None or any(
        _int(obj.get(k)) is not None for k in _EPOCH_KEYS + _STEP_KEYS))


def _lightning_epochs(obj: Mapping[str, Any]) -> Optional[Tuple[int, int]]:
    """(epochs started, epochs whose batches all ran) from Lightning's loop progress."""
    try:
        current = obj["loops"]["fit_loop"]["epoch_progress"]["current"]
        started, processed = _int(current["started"]), _int(current["processed"])
    except (KeyError, TypeError, ValueError):
        return None
    return None if started is None or processed is None else (started, processed)


def _int(value: Any) -> Optional[int]:
    """A counter: a non-negative int (a negative one is damage or a foreign convention:
    ignored, so that no save is named with a negative epoch)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _metrics(obj: Any) -> Dict[str, float]:
    """Top-level float entries (``loss``, ``best_acc``): plain floats or one-element tensors."""
    if not isinstance(obj, Mapping) or all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {}  # a bare state dict: a one-element tensor there is a weight (a bias), not a metric
    out: Dict[str, float] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
            v = v.item()
        if isinstance(k, str) and isinstance(v, float):
            out[k] = v
    return out
