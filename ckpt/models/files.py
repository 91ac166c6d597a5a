"""Model files that rebuild their architecture: ``save_model`` / ``load_model``.

A model file is an ordinary ckpt checkpoint holding one object, ``model`` (its state
dict), with the architecture spec (:mod:`ckpt.spec`) in its ``ckpt``
metadata. Checkpoints written by :class:`~ckpt.CheckpointManager` carry the same
metadata for every tracked module, so ``load_model`` reads both. Everything in the
file loads with ``torch.load(path, weights_only=True)``; the spec is plain data.

Stored under ``ckpt["model_spec"]``::

    {"version": 1, "default": "model",
     "objects": {"model": {"architecture": <spec>} | {"error": "<why it was not recorded>"}}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

from torch import nn

from .. import schema, spec, state
from .._version import __version__
from ..catalog import differential, index
from ..catalog.namespace import refuse_run_file
from ..errors import ArchitectureError, CkptError, PathLike
from ..format import torchfile, torchio
from ..spec import pick_module
from ..storage import LocalStore
from ..storage.local import write_file
from . import build


def save_model(model: nn.Module, path: PathLike) -> Path:
    """Write ``model``'s weights and architecture to ``path`` (atomic, durable).

    Raises :class:`ArchitectureError` before writing anything when the architecture
    cannot be recorded (the message names the argument and the fix).
    """
    path = Path(path)
    refuse_run_file(path, "a model file")
    module = state.unwrap(model)
    if not isinstance(module, nn.Module):
        raise ArchitectureError(f"save_model expects a torch.nn.Module, got {type(model).__name__}",
                                path=path, hint="pass the model itself, not its state_dict()")
    specs = spec.model_spec({"model": {"architecture": spec.capture(module)}}, default="model")
    checkpoint = schema.build({"model": module.state_dict()}, epoch=0, step=0, mid_epoch=True,
                              metrics={}, rng={}, extra={}, library_version=__version__, spec=specs)
    return write_file(path, lambda f: torchio.save(checkpoint.obj, f))


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
    obj = torchfile.load(path, map_location=device or "cpu", checksum=_indexed_checksum(path), mmap=False)
    obj = differential.resolve_beside(path, obj, map_location=device or "cpu")
    head = schema.header(obj, str(path))
    name, arch = _pick(head.model_spec, object, path)
    if not isinstance(obj.get(name), dict):
        raise ArchitectureError(f"the file has no weights for {name!r}", path=path,
                                hint="the file is damaged or was not written by ckpt")
    resolver = build.Resolver(trusted, trust_all=trust_all, rename=rename, source=str(path))
    model = build.build(arch, resolver, where=name, weights=obj[name], strict=strict)
    weights = state.strip_wrapper_prefix(obj[name], model.state_dict().keys())
    if any(state.module_mismatch(model, weights)):
        state.load_module(name, model, weights, strict=strict, path=str(path))  # names the keys
    else:
        model.load_state_dict(weights, assign=True)  # keeps the saved dtypes, no second copy
    if device is not None:
        model.to(device)
    return model.eval()


def _pick(specs: Any, wanted: Optional[str], path: Path) -> tuple[str, Dict[str, Any]]:
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
        store = LocalStore(path.parent, create=False)
        records = index.read(store, index.read_raw(store)) or []
    except (CkptError, OSError):
        return None
    return next((r.checksum for r in records if r.path.name == path.name), None)

