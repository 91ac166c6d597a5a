"""Model files that rebuild their architecture: ``save_model`` / ``load_model``.

A model file is an ordinary ckpt checkpoint holding one object, ``model`` (its state
dict), with the architecture spec (:mod:`ckpt.architecture`) in its ``ckpt``
metadata. Checkpoints written by :class:`~ckpt.CheckpointManager` carry the same
metadata for every tracked module, so ``load_model`` reads both. Everything in the
file loads with ``torch.load(path, weights_only=True)``; the spec is plain data.

Stored under ``ckpt["model_spec"]``::

    {"version": 1, "default": "model",
     "objects": {"model": {"architecture": <spec>} | {"error": "<why it was not recorded>"}}}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from torch import nn

from . import __version__, architecture, fileio, format, index, rebuild, state
from .errors import ArchitectureError, CkptError

PathLike = Union[str, "os.PathLike[str]"]
SPECS_VERSION = 1


def save_model(model: nn.Module, path: PathLike) -> Path:
    """Write ``model``'s weights and architecture to ``path`` (atomic, durable).

    Raises :class:`ArchitectureError` before writing anything when the architecture
    cannot be recorded (the message names the argument and the fix).
    """
    path = Path(path)
    module = state.unwrap(model)
    if not isinstance(module, nn.Module):
        raise ArchitectureError(f"save_model expects a torch.nn.Module, got {type(model).__name__}",
                                path=path, hint="pass the model itself, not its state_dict()")
    specs = {"version": SPECS_VERSION, "default": "model",
             "objects": {"model": {"architecture": architecture.capture(module)}}}
    obj, nbytes = format.build({"model": module.state_dict()}, epoch=0, step=0, mid_epoch=True,
                               metrics={}, rng={}, extra={}, library_version=__version__, spec=specs)
    path.parent.mkdir(parents=True, exist_ok=True)
    return fileio.write(path.parent, path.name, obj, nbytes=nbytes, progress=None).path


def tracked_modules(trackables: Mapping[str, Any]) -> Dict[str, nn.Module]:
    """The tracked objects that are modules, unwrapped (DDP, ``torch.compile``), by name."""
    return {n: state.unwrap(o) for n, o in trackables.items() if isinstance(state.unwrap(o), nn.Module)}


def pick_module(names: Iterable[str], wanted: Optional[str] = None) -> Optional[str]:
    """Which tracked module is "the model": ``wanted``, else ``model``, else the only one.

    None when ``wanted`` is not among ``names`` or when the choice is ambiguous: the
    caller raises an error that lists ``names`` and asks for ``object=``.
    """
    names = list(names)
    if wanted is not None:
        return wanted if wanted in names else None
    if "model" in names:
        return "model"
    return names[0] if len(names) == 1 else None


class SpecCache:
    """Architecture specs of tracked modules, captured once per module (a manager owns one).

    Capturing rebuilds torch layers on the meta device and copies tensor arguments, too
    much to repeat at every save. A module's recorded constructor arguments cannot
    change after construction, so its spec is reused while the module tree is the same
    objects under the same names; replacing or adding a submodule captures it again.
    (A torch layer's arguments are read from its attributes: the first capture stands.)
    """

    def __init__(self) -> None:
        self._entries: Dict[str, Tuple[List[Tuple[str, nn.Module]], Dict[str, Any]]] = {}

    def entry(self, name: str, module: nn.Module) -> Dict[str, Any]:
        tree = list(module.named_modules())
        cached = self._entries.get(name)
        if cached is not None and len(cached[0]) == len(tree) and all(
                a == c and b is d for (a, b), (c, d) in zip(cached[0], tree)):
            return cached[1]
        self._entries[name] = (tree, _entry(name, module))
        return self._entries[name][1]


def _entry(name: str, module: nn.Module) -> Dict[str, Any]:
    try:
        return {"architecture": architecture.capture(module, where=name)}
    except Exception as e:  # noqa: BLE001 - an optional record never fails the save
        return {"error": str(e) if isinstance(e, ArchitectureError) else f"{type(e).__name__}: {e}"}


def checkpoint_specs(trackables: Mapping[str, Any], cache: Optional[SpecCache] = None) -> Optional[Dict[str, Any]]:
    """Specs of every tracked module, for CheckpointManager; None when it tracks none.

    A module whose architecture cannot be recorded gets the reason instead, so the
    checkpoint still saves and ``load_model`` can say why it cannot rebuild it. Pass
    the manager's ``cache`` so each module is captured once, not at every save.
    """
    modules = tracked_modules(trackables)
    if not modules:
        return None
    cache = cache if cache is not None else SpecCache()
    objects = {name: cache.entry(name, module) for name, module in modules.items()}
    return {"version": SPECS_VERSION, "default": pick_module(modules), "objects": objects}


def load_model(path: PathLike, trusted: Iterable[str] = (), *, trust_all: bool = False,
               object: Optional[str] = None, device: Any = None, strict: bool = True,
               rename: Optional[Mapping[str, str]] = None) -> nn.Module:
    """Build the model saved in ``path`` (``save_model`` file or manager checkpoint).

    ``trusted``: packages whose code may be imported to rebuild it (``torch.nn`` is
    always trusted); ``trust_all=True`` trusts every module the file names.
    ``object``: which tracked module of a checkpoint (default: ``model``, or the only
    one). ``rename``: ``{"old.module:Class": "new.module:Class"}`` (or whole modules)
    for classes that moved. Returns the model in eval mode, with the saved dtypes,
    on ``device`` (default CPU).
    """
    path = Path(path)
    obj = fileio.load(path, map_location=device or "cpu", checksum=_indexed_checksum(path), mmap=False)
    meta = format.header(obj, str(path))
    name, spec = _pick(meta.get("model_spec"), object, path)
    resolver = rebuild.Resolver(trusted, trust_all=trust_all, rename=rename, source=str(path))
    model = rebuild.build(spec, resolver, where=name)
    weights = state.strip_wrapper_prefix(obj[name], model.state_dict().keys())
    if any(state.module_mismatch(model, weights)):
        state.load_module(name, model, weights, strict=strict, path=str(path))  # names the keys
    else:
        model.load_state_dict(weights, assign=True)  # keeps the saved dtypes, no second copy
    if device is not None:
        model.to(device)
    return model.eval()


def _pick(specs: Any, wanted: Optional[str], path: Path) -> "tuple[str, Dict[str, Any]]":
    """The (name, spec) to rebuild, with errors that say what the file holds instead."""
    if not isinstance(specs, dict) or not isinstance(specs.get("objects"), dict):
        raise ArchitectureError(
            "the file records no model architecture (saved by an older ckpt, or by a manager "
            "that tracks no module)", path=path,
            hint="build the model yourself and load torch.load(path, weights_only=True)['model']")
    objects = specs["objects"]
    name = pick_module(objects, wanted or specs.get("default"))
    if name is None:
        what = f"no module named {wanted!r}" if wanted else "several modules and none is named 'model'"
        raise ArchitectureError(f"the file has {what} (it has {sorted(objects)})",
                                path=path, hint=f"pass object= one of {sorted(objects)}")
    entry = objects[name]
    if "architecture" not in entry:
        raise ArchitectureError(
            f"the architecture of {name!r} was not recorded when the file was saved: "
            f"{entry.get('error', 'unknown reason')}", path=path,
            hint="fix that for future saves; for this file, build the model yourself and load "
                 f"torch.load(path, weights_only=True)[{name!r}]")
    return name, entry["architecture"]


def _indexed_checksum(path: Path) -> Optional[str]:
    """The checksum a manager recorded for ``path``, so damage is caught before loading."""
    try:
        records = index.read(path.parent) or []
    except CkptError:
        return None
    return next((r.checksum for r in records if r.path.name == path.name), None)

