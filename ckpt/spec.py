"""Architecture specs: a model's class and constructor arguments, as plain data.

A spec is what ``load_model`` needs to build a model again before loading its
weights: ``{"version": 1, "module": "pkg.mod", "qualname": "Net", "args": [...],
"kwargs": {...}}``. It holds only values that ``torch.load(weights_only=True)``
reads (numbers, strings, lists, tuples, dicts, tensors, dtypes); classes, enums and
functions are stored by import path, never pickled, and nothing is ever ``eval``-ed.

An argument that is not plain data is a dict tagged by ``"kind"``: the vocabulary,
and the walks over it, are :mod:`ckpt.specvalues`.

How the arguments are known, without a hand-written config:

* ``torch.nn`` layers and containers (``nn.Sequential`` of torch layers) need
  nothing: their arguments are read back from the attributes torch stores under the
  argument names, and the result is checked by building the layer again on the
  ``meta`` device and comparing it with the original, so a wrong guess is refused at
  save time instead of rebuilding a different model.
* Your own classes record the arguments of each construction with the
  :func:`rebuildable` class decorator. Nothing fully automatic is possible without
  patching ``torch.nn.Module.__init__`` for every module in the process (or a
  tracing hook during construction): the arguments are gone once ``__init__``
  returns, and guessing them from attributes runs your ``__init__`` again at save time
  with no guarantee it matches. One decorator line per class is the least ceremony
  that is exact and free of global side effects.

Rebuilding, and the trust rule for what may be imported, live in :mod:`ckpt.models.build`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import inspect
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Type, TypeVar

import torch
from torch import nn

from . import specvalues as sv
from .errors import ArchitectureError, ConfigError
from .schema import Header
from .specvalues import NATIVE, global_ref, qualified_name, ref
from .specvalues import describe as describe  # re-exported: ckpt.spec.describe
from .state import unwrap

SPEC_VERSION = 1
RECORD_ATTR = "_ckpt_init_args"
_SKIPPED_PARAMS = frozenset({"device", "dtype"})
_FIX = ("decorate the class with @ckpt.rebuildable so its constructor arguments are recorded, "
        "or use ckpt.export(model, path, example_inputs=...), which needs no class at all")

M = TypeVar("M", bound=Type[nn.Module])


# -- recording your own classes ---------------------------------------------------------

def rebuildable(cls: M) -> M:
    """Class decorator: record the arguments of every construction of ``cls``.

    The arguments are kept on the instance (containers copied, so a later mutation of
    a dict you passed does not change the record) and turned into a spec when the
    model is saved. Only the class that was decorated records: a subclass needs its
    own decorator, since its arguments differ.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"@rebuildable decorates torch.nn.Module subclasses, got {cls!r}",
                          hint="put @ckpt.rebuildable on the line above `class MyModel(nn.Module):`")
    original = cls.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        record = _bind(signature, self, args, kwargs) if type(self) is cls else None
        original(self, *args, **kwargs)
        if record is not None:
            object.__setattr__(self, RECORD_ATTR, (cls, *record))

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def _bind(signature: inspect.Signature, obj: Any, args: Tuple[Any, ...],
          kwargs: Dict[str, Any]) -> Optional[Tuple[List[Any], Dict[str, Any]]]:
    """Split a call's arguments into positional and keyword ones, by parameter kind."""
    try:
        bound = signature.bind(obj, *args, **kwargs)
    except TypeError:
        return None  # the real __init__ raises the user-facing error
    params = signature.parameters
    has_varargs = any(params[n].kind is inspect.Parameter.VAR_POSITIONAL for n in bound.arguments)
    out_args: List[Any] = []
    out_kwargs: Dict[str, Any] = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        kind = params[name].kind
        if i == 0 and kind is not inspect.Parameter.VAR_POSITIONAL:
            continue  # self
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out_args.extend(_snapshot(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out_kwargs.update((k, _snapshot(v)) for k, v in value.items())
        elif kind is inspect.Parameter.POSITIONAL_ONLY or (
                has_varargs and kind is inspect.Parameter.POSITIONAL_OR_KEYWORD):
            out_args.append(_snapshot(value))
        else:
            out_kwargs[name] = _snapshot(value)
    return out_args, out_kwargs


def _snapshot(value: Any) -> Any:
    """Copy plain containers (not their leaves) so the record survives later mutation."""
    kind = type(value)
    if kind in (list, tuple, set, frozenset):
        return kind(_snapshot(v) for v in value)
    if kind in (dict, collections.OrderedDict):
        return kind((k, _snapshot(v)) for k, v in value.items())
    return value


# -- capture -------------------------------------------------------------------------

def capture(module: nn.Module, where: str = "model") -> Dict[str, Any]:
    """The spec of ``module``; :class:`ArchitectureError` when it cannot be recorded."""
    cls = type(module)
    record = module.__dict__.get(RECORD_ATTR)
    if record is not None and record[0] is cls:
        args, kwargs = record[1], record[2]
    elif _is_torch_class(cls):
        args, kwargs = _infer(module, where)
    else:
        raise ArchitectureError(
            f"{where} ({qualified_name(cls)}) does not record its constructor arguments, so it "
            "cannot be built again from the file", hint=_FIX)
    module_name, qualname = global_ref(cls, where)
    return {"version": SPEC_VERSION, "module": module_name, "qualname": qualname,
            "args": [encode(v, f"{where}[{i}]") for i, v in enumerate(args)],
            "kwargs": {k: encode(v, f"{where}.{k}") for k, v in kwargs.items()}}


def encode(value: Any, where: str) -> Any:
    """One argument value as plain data; tagged dicts for what is not plain."""
    kind = type(value)
    if kind in NATIVE:
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, nn.Module):
        return {"kind": sv.MODULE, "spec": capture(value, where)}
    if isinstance(value, enum.Enum):
        return {"kind": sv.ENUM, **ref(type(value), where), "name": value.name}
    if kind is list:
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind is tuple:
        return tuple(encode(v, f"{where}[{i}]") for i, v in enumerate(value))
    if kind in (dict, collections.OrderedDict):
        items = [[encode(k, f"{where} key {k!r}"), encode(v, f"{where}[{k!r}]")] for k, v in value.items()]
        return {"kind": sv.ODICT if kind is collections.OrderedDict else sv.DICT, "items": items}
    if kind in (set, frozenset):
        return {"kind": sv.SET if kind is set else sv.FROZENSET, "items": [encode(v, f"{where} item") for v in value]}
    if isinstance(value, tuple) and hasattr(kind, "_fields"):
        return {"kind": sv.NAMEDTUPLE, **ref(kind, where),
                "items": [encode(v, f"{where}.{f}") for f, v in zip(kind._fields, value)]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: encode(getattr(value, f.name), f"{where}.{f.name}")
                  for f in dataclasses.fields(value) if f.init}
        return {"kind": sv.DATACLASS, **ref(kind, where), "fields": fields}
    if isinstance(value, functools.partial):
        return {"kind": sv.PARTIAL, "func": encode(value.func, f"{where}.func"),
                "args": [encode(v, f"{where}.args[{i}]") for i, v in enumerate(value.args)],
                "kwargs": {k: encode(v, f"{where}.{k}") for k, v in value.keywords.items()}}
    if isinstance(value, type) or inspect.isfunction(value) or inspect.isbuiltin(value):
        return {"kind": sv.GLOBAL, **ref(value, where)}
    raise ArchitectureError(
        f"argument {where} is a {qualified_name(kind)}, which a spec cannot record",
        hint="pass plain values (numbers, strings, tuples, lists, dicts, enums, dataclasses), "
             "tensors, modules, or classes and functions importable by name; or use ckpt.export")


# -- inference for torch.nn's own classes ------------------------------------------------

def _is_torch_class(cls: type) -> bool:
    return cls.__module__ == "torch.nn" or cls.__module__.startswith("torch.nn.")


def _infer(module: nn.Module, where: str) -> Tuple[List[Any], Dict[str, Any]]:
    """Constructor arguments of a torch.nn class, read from its attributes and verified."""
    cls = type(module)
    if cls is nn.Sequential:
        children = dict(module._modules)
        if list(children) == [str(i) for i in range(len(children))]:
            return list(children.values()), {}
        return [collections.OrderedDict(children)], {}
    if cls is nn.ModuleList:
        return [list(module.children())], {}
    if cls is nn.ModuleDict:
        return [dict(module._modules)], {}
    kwargs: Dict[str, Any] = {}
    for name, default in _init_params(cls):
        try:
            value = getattr(module, name)
            found = not inspect.ismethod(value)
        except Exception:  # noqa: BLE001 - AttributeError, or a property that fails
            value, found = None, False
        if found and isinstance(default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None  # bias=True is stored as a Parameter, bias=False as None
        if not found or isinstance(value, torch.Tensor):
            if default is inspect.Parameter.empty:
                raise ArchitectureError(
                    f"{where} ({qualified_name(cls)}): cannot read its constructor argument "
                    f"{name!r} back from the layer", hint="build this layer inside your own module "
                    "class decorated with @ckpt.rebuildable, or use ckpt.export")
            continue
        if not _same(value, default):
            kwargs[name] = value
    _verify(module, kwargs, where)
    return [], kwargs


def _init_params(cls: type) -> Tuple[Tuple[str, Any], ...]:
    """(name, default) of the constructor parameters that describe the layer."""
    if issubclass(cls, nn.RNNBase):  # LSTM/GRU/RNN take (*args, **kwargs) and pass a mode
        params = [(n, p.default) for n, p in inspect.signature(nn.RNNBase).parameters.items() if n != "mode"]
        return tuple(params + ([("nonlinearity", "tanh")] if issubclass(cls, nn.RNN) else []))
    return tuple((name, p.default) for name, p in inspect.signature(cls).parameters.items()
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                 and name not in _SKIPPED_PARAMS and not name.startswith("_"))


def _same(value: Any, default: Any) -> bool:
    if default is inspect.Parameter.empty or type(value) is not type(default):
        return False
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001 - an exotic __eq__ just means "record it"
        return False


def _verify(module: nn.Module, kwargs: Dict[str, Any], where: str) -> None:
    """Refuse inferred arguments unless they build a layer identical to ``module``."""
    cls = type(module)
    error: Optional[BaseException] = None
    try:
        expected = _rebuilt_fingerprint(cls, kwargs)
        differs = [part for part, a, b in zip(_PARTS, _fingerprint(module), expected) if a != b]
    except Exception as e:  # noqa: BLE001 - any failure means the guess is wrong
        error, differs = e, [f"construction ({type(e).__name__}: {e})"]
    if differs:
        raise ArchitectureError(
            f"{where} ({qualified_name(cls)}): its constructor arguments cannot be read back from "
            f"the layer (a layer rebuilt from {kwargs} differs in {', '.join(differs)})",
            hint="build this layer inside your own module class decorated with @ckpt.rebuildable, "
                 "or use ckpt.export") from error


def _rebuilt_fingerprint(cls: type, kwargs: Dict[str, Any]) -> Tuple[Any, ...]:
    """Fingerprint of ``cls(**kwargs)`` built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return _fingerprint(cls(**kwargs))


_PARTS = ("extra_repr", "attributes", "parameters", "buffers", "children")


def _fingerprint(module: nn.Module) -> Tuple[Any, ...]:
    attrs = {k: v for k, v in vars(module).items()
             if not k.startswith("_") and k != "training" and _is_plain(v)}
    return (module.extra_repr(), attrs,
            {k: None if v is None else tuple(v.shape) for k, v in module._parameters.items()},
            {k: None if v is None else tuple(v.shape) for k, v in module._buffers.items()},
            [(k, type(v)) for k, v in module._modules.items()])


def _is_plain(value: Any) -> bool:
    if type(value) in NATIVE:
        return True
    if type(value) in (tuple, list):
        return all(_is_plain(v) for v in value)
    return False


# -- the specs a manager records in every checkpoint ----------------------------------------

SPECS_VERSION = 1


def model_spec(objects: Dict[str, Dict[str, Any]], default: Optional[str]) -> Dict[str, Any]:
    """The ``model_spec`` a checkpoint's header carries: per tracked module
    ``{"architecture": <spec>}`` or ``{"error": <why it was not recorded>}``, and the
    module that ``load_model`` rebuilds by default."""
    return {"version": SPECS_VERSION, "default": default, "objects": objects}


def module_names(head: Header) -> List[str]:
    """The tracked modules of a checkpoint: those its ``model_spec`` records, or every
    tracked object when it has none (an older file, or one ckpt did not capture)."""
    return list((head.model_spec or {}).get("objects") or head.objects)


def tracked_modules(trackables: Mapping[str, Any]) -> Dict[str, nn.Module]:
    """The tracked objects that are modules, unwrapped (DDP, ``torch.compile``), by name."""
    return {n: unwrap(o) for n, o in trackables.items() if isinstance(unwrap(o), nn.Module)}


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
        return {"architecture": capture(module, where=name)}
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
    return model_spec(objects, default=pick_module(modules))
