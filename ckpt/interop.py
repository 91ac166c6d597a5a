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

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import fileio, format, models, state, storage
from .errors import ConfigError, CorruptCheckpointError, StateMismatchError
from .record import CheckpointRecord

PathLike = Union[str, "os.PathLike[str]"]

_ALIASES = {
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
    fileio.check_archive(path)  # its own CRCs: no index entry to compare with
    obj = fileio.load(path, weights_only=weights_only)
    if format.is_checkpoint(obj):
        format.header(obj, str(path))
        return CheckpointRecord(path=path, size=path.stat().st_size, **format.describe(obj))
    epoch, step, mid_epoch = progress(obj)
    return CheckpointRecord(epoch=epoch, step=step, path=path, metrics=_metrics(obj), mid_epoch=mid_epoch,
                            size=path.stat().st_size, checksum=None, time=path.stat().st_mtime)


def as_checkpoint(obj: Any, trackables: Mapping[str, Any], path: str) -> Dict[str, Any]:
    """``obj`` in ckpt's layout: validated as is when ckpt wrote it, else converted."""
    if format.is_checkpoint(obj):
        format.header(obj, path)
        return obj
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
            "ckpt": {"format": format.FORMAT_VERSION, "library": "foreign", "mid_epoch": mid_epoch,
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


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _map_states(obj: Dict[str, Any], trackables: Mapping[str, Any], path: str) -> Tuple[Dict[str, Any], set]:
    """{tracked name: its state} found in ``obj``, and the keys of ``obj`` that were used."""
    kinds = {name: _kind(o) for name, o in trackables.items()}
    modules = [n for n, k in kinds.items() if k == "module"]
    if _is_state_dict(obj):
        if not modules:
            raise StateMismatchError("the file is a bare state dict, but no module is tracked", path=path,
                                     hint="track the model: CheckpointManager(dir, model=model)")
        name = models.pick_module(modules)
        if name is None:
            raise StateMismatchError(f"the file is a bare state dict, and several modules are tracked "
                                     f"({modules}), none named 'model'", path=path,
                                     hint="track the module it belongs to as model=, or load it "
                                          "yourself: module.load_state_dict(torch.load(path))")
        return {name: _fit(obj, trackables[name])}, set(obj)
    states: Dict[str, Any] = {}
    used: set = set()
    for name in trackables:  # exact names first, so aliases never steal a named entry
        key = next((k for k in (name, f"{name}_state_dict", f"{name}_state") if k in obj), None)
        if key is not None:
            states[name], used = obj[key], used | {key}
    for name, kind in kinds.items():
        if name in states:
            continue
        key = next((k for k in _ALIASES.get(kind, ()) if k in obj and k not in used
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
    step = next((_int(obj[k]) for k in _STEP_KEYS if _int(obj.get(k)) is not None), 0)
    lightning = _lightning_epochs(obj)
    if lightning is not None:
        started, processed = lightning
        if started > processed:  # saved inside an epoch
            return started - 1, step, True
        return max(processed - 1, 0), step, processed == 0
    epoch = next((_int(obj[k]) for k in _EPOCH_KEYS if _int(obj.get(k)) is not None), None)
    return (0, step, True) if epoch is None else (epoch, step, False)


def _lightning_epochs(obj: Mapping[str, Any]) -> Optional[Tuple[int, int]]:
    """(epochs started, epochs whose batches all ran) from Lightning's loop progress."""
    try:
        current = obj["loops"]["fit_loop"]["epoch_progress"]["current"]
        return int(current["started"]), int(current["processed"])
    except (KeyError, TypeError, ValueError):
        return None


def _int(value: Any) -> Optional[int]:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _metrics(obj: Any) -> Dict[str, float]:
    """Top-level float entries (``loss``, ``best_acc``): plain floats or one-element tensors."""
    if not isinstance(obj, Mapping):
        return {}
    out: Dict[str, float] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
            v = v.item()
        if isinstance(k, str) and isinstance(v, float):
            out[k] = v
    return out


# -- safetensors ----------------------------------------------------------------------

def save_safetensors(source: Union[nn.Module, Mapping[str, Any], PathLike], path: PathLike, *,
                     metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write model weights as a ``.safetensors`` file (atomic, durable).

    ``source``: a module, a state dict, or a checkpoint file (ckpt's, a ``save_model``
    file, or a foreign layout; its model entry is used); a state dict's keys are written
    as they are. Tied weights are stored once per name. Needs the optional extra:
    ``pip install "ckpt[safetensors]"``.
    """
    try:
        from safetensors.torch import save as st_save
    except ImportError as e:
        raise ConfigError("saving safetensors needs the safetensors package",
                          hint='pip install "ckpt[safetensors]"') from e
    path = Path(path)
    tensors = _tensors(_weights(source), str(path))
    data = st_save(tensors, metadata=dict(metadata) if metadata else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    return storage.atomic_write(path.parent, path.name, lambda f: f.write(data)).path


def _weights(source: Any) -> Mapping[str, Any]:
    if isinstance(source, nn.Module):
        return state.unwrap(source).state_dict()
    if isinstance(source, Mapping):
        return source
    obj = fileio.load(Path(source))
    if format.is_checkpoint(obj):
        meta = format.header(obj, str(source))
        names = list((meta.get("model_spec") or {}).get("objects") or meta.get("objects", []))
        name = models.pick_module(names)
        if name is None or name not in obj:
            raise ConfigError(f"which module to export? the checkpoint holds {names}, none named 'model'",
                              path=Path(source), hint="pass the state dict itself: save_safetensors("
                                                      "torch.load(path, weights_only=True)['<name>'], out)")
        return obj[name]
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in _ALIASES["module"] if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise ConfigError(f"no model state found among the file's keys {sorted(map(str, obj))}",
                              path=Path(source), hint="pass the state dict itself")
        return obj[key]
    return obj


def _tensors(weights: Mapping[str, Any], where: str) -> Dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own storage (safetensors refuses sharing)."""
    out: Dict[str, torch.Tensor] = {}
    seen: set = set()
    bad: List[str] = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"safetensors stores tensors only; not tensors: {bad[:8]}", path=where,
                          hint="export a model's state dict (optimizer state is not weights)")
    for key, tensor in weights.items():  # no target to fit, so the keys are kept as they are
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out
