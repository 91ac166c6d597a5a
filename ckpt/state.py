"""State capture and restore: tracked objects, wrapped models and RNG states."""

from __future__ import annotations

import copy
import random
import sys
import warnings
from contextlib import suppress
from typing import Any, Callable, Collection, Dict, List, Mapping, Tuple

import torch

from . import loaders
from .errors import CkptError, ConfigError, StateMismatchError

_WRAPPER_ATTRS = ("module", "_orig_mod")  # DDP / DataParallel, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LISTED = 8


def _wrapper_types() -> Tuple[type, ...]:
    types: List[type] = [torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel]
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # loaded whenever torch.compile ran
    if dynamo is not None:
        types.append(dynamo.OptimizedModule)
    return tuple(types)


def unwrap(obj: Any) -> Any:
    """The plain module inside DDP, DataParallel and ``torch.compile`` wrappers."""
    wrappers = _wrapper_types()
    while isinstance(obj, wrappers):
        obj = next(getattr(obj, a) for a in _WRAPPER_ATTRS if hasattr(obj, a))
    return obj


def trackable(obj: Any) -> bool:
    """Can ``obj`` be checkpointed (``state_dict``/``load_state_dict``, or a torch.Generator)?"""
    return isinstance(obj, torch.Generator) or all(
        callable(getattr(obj, m, None)) for m in ("state_dict", "load_state_dict"))


def check_trackable(name: str, obj: Any) -> None:
    """Raise :class:`ConfigError` unless ``obj`` can be checkpointed under ``name``."""
    missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(obj, m, None))]
    if missing and not isinstance(obj, torch.Generator):
        raise ConfigError(
            f"tracked object {name!r} ({type(obj).__name__}) has no {' or '.join(missing)}()",
            hint="track objects with state_dict()/load_state_dict() (modules, optimizers, "
                 "schedulers, GradScaler), or store plain values in save(extra=...)")


def capture(trackables: Mapping[str, Any]) -> Dict[str, Any]:
    """``state_dict()`` of every tracked object, models under their unwrapped names."""
    return {name: _state_of(obj) for name, obj in trackables.items()}


def _state_of(obj: Any) -> Any:
    # A torch.Generator (e.g. a DataLoader's generator=) has get_state(), not state_dict().
    if isinstance(obj, torch.Generator):
        return {"generator_state": obj.get_state(), "device": str(obj.device)}
    return loaders.with_position(obj, unwrap(obj).state_dict())


def direct_targets(trackables: Mapping[str, Any]) -> Callable[[Any], List[Tuple[Any, Any, torch.Tensor]]]:
    """For a loaded checkpoint dict: (state dict, key, live tensor) of every module entry
    the file's bytes may be read straight into (see ckpt.format.directread); none for a
    differential checkpoint (its tensors come from other files)."""
    def targets(obj: Any) -> List[Tuple[Any, Any, torch.Tensor]]:
        meta = obj.get("ckpt") if isinstance(obj, Mapping) else None
        if not isinstance(meta, Mapping) or meta.get("blobs"):
            return []
        out: List[Tuple[Any, Any, torch.Tensor]] = []
        for name, target in trackables.items():
            module, saved = unwrap(target), obj.get(name)
            if not isinstance(module, torch.nn.Module) or not isinstance(saved, dict):
                continue
            own = module.state_dict()
            stripped = strip_wrapper_prefix(saved, own.keys())
            for key, mine in zip(list(saved.keys()), list(stripped.keys())):
                dest = own.get(mine)
                if isinstance(dest, torch.Tensor):
                    out.append((saved, key, dest))
        return out
    return targets


def _load_state(target: Any, saved: Any) -> None:
    if isinstance(target, torch.Generator):
        target.set_state(saved["generator_state"].cpu())  # set_state takes a CPU ByteTensor
    else:
        loaders.load_into(target, saved)


def strip_wrapper_prefix(state: Mapping[str, Any], own: Collection[str] = ()) -> Mapping[str, Any]:
    """Drop a ``module.``/``_orig_mod.`` prefix that every key carries (wrapped saves),
    unless the keys already fit ``own``, the target's keys (a child named ``module``)."""
    if any(k in own for k in state):
        return state
    for prefix in _WRAPPER_PREFIXES:
        if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
            return strip_wrapper_prefix({k[len(prefix):]: v for k, v in state.items()}, own)
    return state


def _listing(items: List[str]) -> str:
    shown = ", ".join(items[:_LISTED])
    return shown + (f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else "")


def module_mismatch(module: torch.nn.Module, state: Mapping[str, Any]) -> Tuple[List[str], List[str], List[str]]:
    """(missing keys, unexpected keys, 'key: saved shape vs model shape') of a module load."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items()
              if k in state and isinstance(v, torch.Tensor) and isinstance(state[k], torch.Tensor)
              and state[k].shape != v.shape]
    return missing, unexpected, shapes


def load_module(name: str, module: torch.nn.Module, state: Mapping[str, Any], *,
                strict: bool, path: str) -> None:
    """Load a module's state, naming every missing/unexpected key and shape mismatch."""
    state = strip_wrapper_prefix(state, module.state_dict().keys())
    missing, unexpected, shapes = module_mismatch(module, state)
    if missing or unexpected or shapes:
        parts = [f"missing keys: {_listing(missing)}" if missing else "",
                 f"unexpected keys: {_listing(unexpected)}" if unexpected else "",
                 f"shape mismatches: {_listing(shapes)}" if shapes else ""]
        detail = "; ".join(p for p in parts if p)
        if strict:
            raise StateMismatchError(
                f"the checkpoint's {name!r} does not fit the model ({detail})", path=path,
                hint="build the model with the same architecture, or pass strict=False to "
                     "load the matching entries and skip the rest")
        warnings.warn(f"{path}: loading {name!r} with strict=False skipped {detail}", stacklevel=3)
        bad = {s.split(":")[0] for s in shapes}
        state = {k: v for k, v in state.items() if k not in bad}
    module.load_state_dict(state, strict=strict)


def restore(trackables: Mapping[str, Any], checkpoint: Mapping[str, Any], *,
            strict: bool, path: str, rng: Any = None) -> None:
    """Load every tracked object (and the RNG states ``rng``) from ``checkpoint``, all or nothing.

    Everything that can be checked without changing an object is checked first: every
    module's keys and shapes, every optimizer's parameter groups, the RNG states. Then
    the other objects are loaded, each one's previous state kept (optimizers, whose state
    is not copied aside, after the rest); if one fails, those already loaded are put back
    and nothing else is touched. Modules (already checked) and the RNG come last.
    """
    absent = [n for n in trackables if n not in checkpoint]
    if absent:
        msg = f"the checkpoint has no state for {_listing(absent)}"
        if strict:
            raise StateMismatchError(msg, path=path,
                                     hint="pass strict=False to restore the other objects")
        warnings.warn(f"{path}: {msg}; left as they are", stacklevel=3)
    present = [n for n in trackables if n in checkpoint]
    modules = [n for n in present if isinstance(unwrap(trackables[n]), torch.nn.Module)]
    others = [n for n in present if n not in modules]
    for name in modules:
        check_module(name, unwrap(trackables[name]), checkpoint[name], strict=strict, path=path)
    for name in others:
        _check_optimizer(name, unwrap(trackables[name]), checkpoint[name], path)
        loaders.check(name, trackables[name], checkpoint[name], path)
    rng_states = _parse_rng(rng, path) if rng is not None else None
    _load_others(trackables, checkpoint, others, path)
    for name in others:
        loaders.after_load(unwrap(trackables[name]), checkpoint[name])
    for name in modules:
        load_module(name, unwrap(trackables[name]), checkpoint[name], strict=strict, path=path)
    if rng_states is not None:
        _apply_rng(rng_states)


def _load_others(trackables: Mapping[str, Any], checkpoint: Mapping[str, Any], others: List[str],
                 path: str) -> None:
    """Load the objects that are not modules (checked already), each one's previous state
    kept; if one fails, those already loaded are put back. Then the modules' tensors are
    filled from the file (``checkpoint.fill``), when it reads them straight in."""
    owned = getattr(checkpoint, "owned", False)  # fresh tensors, not a file mapping
    done: List[Tuple[Any, Any]] = []
    # optimizers (checked above, and not kept aside: a copy of their state costs as much as
    # the model) load after every other object, so a sampler or scheduler that refuses its
    # state leaves them untouched
    loading = sorted(others, key=lambda n: isinstance(unwrap(trackables[n]), torch.optim.Optimizer))
    try:
        for name in loading:
            target = unwrap(trackables[name])
            before = None if isinstance(target, torch.optim.Optimizer) else \
                {} if loaders.is_stateful_loader(target) else copy.deepcopy(_state_of(target))
            try:
                # optimizers keep the tensors they are given: copy them out of the checkpoint's
                # file mapping, which would otherwise pin the file (and its disk space once
                # retention deletes it) for the rest of the run; fresh tensors are kept as
                # they are (read where the optimizer keeps them)
                mapped = not (owned and isinstance(target, torch.optim.Optimizer))
                _load_state(target, copy.deepcopy(checkpoint[name]) if mapped else checkpoint[name])
            except (KeyError, ValueError, RuntimeError, TypeError, IndexError, AttributeError) as e:
                raise _load_error(name, target, e, path) from e
            if before is not None:
                done.append((target, before))
        fill = getattr(checkpoint, "fill", None)
        if fill is not None:  # every check passed: the modules' records into their tensors
            fill()
    except BaseException:
        for target, before in reversed(done):
            with suppress(Exception):
                _load_state(target, before)
        raise


def _load_error(name: str, target: Any, error: Exception, path: str) -> StateMismatchError:
    """A failed ``load_state_dict``; an object's own typed error keeps its message and hint."""
    reason, hint = (error.message, error.hint) if isinstance(error, CkptError) else (str(error), "")
    return StateMismatchError(f"cannot load the checkpoint's {name!r} into {type(target).__name__}: {reason}; "
                              "nothing was restored", path=path,
                              hint=hint or "track the same kind of object, built the same way, as when the "
                                           "checkpoint was saved")


def check_module(name: str, module: torch.nn.Module, saved: Any, *, strict: bool, path: str) -> None:
    """Raise :class:`StateMismatchError` (when ``strict``) if ``saved`` does not fit ``module``."""
    if not isinstance(saved, Mapping):
        raise StateMismatchError(f"the checkpoint's {name!r} is a {type(saved).__name__}, not a state dict",
                                 path=path, hint="the file was not written for this model")
    if strict:
        state = strip_wrapper_prefix(saved, module.state_dict().keys())
        missing, unexpected, shapes = module_mismatch(module, state)
        if missing or unexpected or shapes:
            load_module(name, module, state, strict=True, path=path)  # raises, naming them


def _check_optimizer(name: str, target: Any, saved: Any, path: str) -> None:
    """What ``Optimizer.load_state_dict`` would refuse, checked before anything is loaded."""
    if not isinstance(target, torch.optim.Optimizer):
        return
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    ok = (isinstance(groups, list) and isinstance(saved.get("state"), Mapping)
          and len(groups) == len(target.param_groups)
          and all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                  and len(g["params"]) == len(t["params"]) for g, t in zip(groups, target.param_groups)))
    if not ok:
        raise StateMismatchError(f"cannot load the checkpoint's {name!r} into {type(target).__name__} "
                                 "(different parameter groups or sizes); nothing was restored", path=path,
                                 hint="build the optimizer over the same parameters as when it was saved")


def capture_rng() -> Dict[str, Any]:
    """Python, NumPy (when installed), torch CPU and every initialised CUDA device."""
    version, internal, gauss = random.getstate()
    rng: Dict[str, Any] = {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
                           "torch": torch.get_rng_state()}
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        rng["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: Mapping[str, Any], path: str = "the checkpoint") -> None:
    """Restore what :func:`capture_rng` saved; absent entries are left alone."""
    _apply_rng(_parse_rng(rng, path))


def _parse_rng(rng: Any, path: str) -> Dict[str, Any]:
    """The RNG states in the form their setters take (CPU tensors, Python tuples), checked,
    so that applying them cannot fail half-way."""
    if not isinstance(rng, Mapping):
        raise StateMismatchError(f"the RNG entry is a {type(rng).__name__}, not a dict", path=path,
                                 hint="the file is damaged or was not written by ckpt")
    out: Dict[str, Any] = {}
    try:
        if "python" in rng:
            version, internal, gauss = rng["python"]
            out["python"] = (version, tuple(int(x) for x in internal.tolist()), gauss)
            random.Random().setstate(out["python"])  # validates without touching the global RNG
        if "torch" in rng:
            out["torch"] = rng["torch"].cpu()
            torch.Generator().set_state(out["torch"])
        np = _numpy()
        if np is not None and "numpy" in rng:
            kind, keys, pos, has_gauss, cached = rng["numpy"]
            out["numpy"] = (kind, keys.cpu().numpy().astype("uint32"), pos, has_gauss, cached)
            np.random.RandomState().set_state(out["numpy"])
        if "cuda" in rng:
            out["cuda"] = [state.cpu() for state in rng["cuda"]]
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise StateMismatchError(f"the saved RNG states are malformed ({type(e).__name__}: {e}); "
                                 "nothing was restored", path=path,
                                 hint="the file is damaged or was not written by ckpt") from e
    return out


def _apply_rng(states: Mapping[str, Any]) -> None:
    if "python" in states:
        random.setstate(states["python"])
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    np = _numpy()
    if np is not None and "numpy" in states:
        np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        count = torch.cuda.device_count()
        if len(cuda) != count:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda)} devices, this machine "
                          f"has {count}; restoring the first {min(count, len(cuda))}", stacklevel=3)
        for device, state in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(state, device)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy
