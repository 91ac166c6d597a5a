"""Building a model again from its architecture spec, under the trust rule.

Importing a module runs its code, and a spec read from a file names what gets
imported, constructed and handed to the model (which may call it), so every name is
checked twice before anything is built:

* by module name, before importing: ``torch`` and ``torch.nn`` are importable by
  default, anything else only when the caller lists its package (``trusted=["mypkg"]``
  trusts ``mypkg`` and ``mypkg.*``) or passes ``trust_all=True``;
* by object, after the lookup: the name is looked up only through classes (never
  through a module, so ``torch:hub.load`` is refused), and the object's own defining
  module must be trusted. By default that means classes defined in ``torch.nn`` and
  a short allow-list of tensor functions (activations, elementwise math, ``nn.init``);
  never ``torch.hub``, ``torch.load``, ``os``, ``builtins``.

Even then a spec only constructs ``nn.Module`` subclasses, enums, dataclasses and named
tuples; other names are passed as values, never called by ckpt.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import importlib
import inspect
import types
from typing import Any, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

from .. import specvalues as sv
from .. import state
from ..errors import ArchitectureError, ConfigError, FormatVersionError, StateMismatchError, UntrustedModuleError
from ..spec import SPEC_VERSION
from ..specvalues import describe, refs

DEFAULT_TRUSTED = ("torch.nn",)  # importable, and their classes usable, by default
_DEFAULT_EXACT = ("torch",)  # importable by default; only _SAFE_FUNCTIONS from it are usable
_SAFE_FUNCTIONS = {  # functions of tensors only: no files, no imports, no code objects
    "torch": ("abs", "clamp", "cos", "erf", "exp", "log", "log1p", "log_softmax", "neg", "relu",
              "rsqrt", "sigmoid", "sign", "sin", "softmax", "sqrt", "square", "tanh"),
    "torch.nn.functional": (
        "celu", "elu", "gelu", "glu", "hardshrink", "hardsigmoid", "hardswish", "hardtanh",
        "leaky_relu", "log_softmax", "logsigmoid", "mish", "normalize", "relu", "relu6", "rrelu",
        "selu", "sigmoid", "silu", "softmax", "softmin", "softplus", "softshrink", "softsign",
        "tanh", "tanhshrink"),
    "torch.nn.init": ("constant_", "dirac_", "eye_", "kaiming_normal_", "kaiming_uniform_",
                      "normal_", "ones_", "orthogonal_", "trunc_normal_", "uniform_",
                      "xavier_normal_", "xavier_uniform_", "zeros_"),
}


class Resolver:
    """Finds the objects a spec names: renames applied, trust checked, imports done."""

    def __init__(self, trusted: Iterable[str] = (), *, trust_all: bool = False,
                 rename: Optional[Mapping[str, str]] = None, source: str = "the spec") -> None:
        if isinstance(trusted, bool):
            raise ConfigError(f"trusted= takes package names, got {trusted!r}",
                              hint="pass trusted=['mypkg'], or trust_all=True to trust every module")
        if isinstance(trusted, str):
            trusted = [trusted]
        self.trusted = tuple(p.rstrip(".") for p in trusted)
        self.trust_all = trust_all
        self.rename = dict(rename or {})
        self.source = source
        self.safe = [f for m, names in _SAFE_FUNCTIONS.items() for n in names
                     if (f := getattr(importlib.import_module(m), n, None)) is not None]

    def name(self, module: str, qualname: str) -> Tuple[str, str]:
        """(module, qualname) after ``rename``: ``"old.mod:Net"`` or a whole ``"old.mod"``."""
        full = self.rename.get(f"{module}:{qualname}")
        if full is not None:
            new_module, _, new_qualname = full.partition(":")
            return new_module, new_qualname or qualname
        return self.rename.get(module, module), qualname

    def is_trusted(self, module: str) -> bool:
        """May ``module`` be imported (the first check, by name only)?"""
        return (self.trust_all or module in _DEFAULT_EXACT
                or _under(module, DEFAULT_TRUSTED + self.trusted))

    def permits(self, obj: Any) -> bool:
        """May a spec use ``obj`` (the second check, on the object found)?"""
        if isinstance(obj, types.ModuleType):
            return False
        if self.trust_all:
            return True
        home = getattr(obj, "__module__", None)
        if isinstance(home, str) and _under(home, self.trusted):
            return True
        if isinstance(obj, type):
            return isinstance(home, str) and _under(home, DEFAULT_TRUSTED)
        return any(obj is f for f in self.safe)

    def check(self, spec: Mapping[str, Any]) -> None:
        """Refuse a spec that names anything untrusted, before anything is built.

        Every untrusted module is named at once and none is imported; then each name is
        looked up (importing trusted modules only) and checked as :meth:`resolve` does.
        """
        names = list(refs(spec))
        refused = sorted({(self.name(*ref)[0], f"{ref[0]}:{ref[1]}") for ref in names
                          if not self.is_trusted(self.name(*ref)[0])})
        if refused:
            untrusted = sorted({m for m, _ in refused})
            packages = sorted({m.split(".")[0] for m in untrusted})
            shown = ", ".join(r for _, r in refused[:5]) + (", ..." if len(refused) > 5 else "")
            raise UntrustedModuleError(
                f"{self.source} names {shown}: code in {', '.join(repr(m) for m in untrusted)}, which "
                "is not trusted; importing it would run its code, so nothing was imported",
                hint=f"if you trust it, pass trusted={packages!r} "
                     "(or trust_all=True to trust every module the file names)")
        for module, qualname in names:
            self.resolve(module, qualname, "the model spec")

    def resolve(self, module: str, qualname: str, where: str, expect: Optional[type] = None) -> Any:
        """The object ``module:qualname`` names, trust-checked; a subclass of ``expect`` if given."""
        new_module, new_qualname = self.name(module, qualname)
        recorded = f"{module}:{qualname}"
        if not self.is_trusted(new_module):  # check() ran first; this guards direct callers
            raise UntrustedModuleError(f"{self.source}: {where} names {recorded}, and {new_module!r} "
                                       "is not trusted; nothing was imported",
                                       hint=f"if you trust it, pass trusted=[{new_module.split('.')[0]!r}]")
        obj = self._walk(self._import(new_module, recorded, where), new_module, new_qualname, recorded, where)
        if not self.permits(obj):
            raise _refused(obj, recorded, self.source, where)
        if expect is not None and not (isinstance(obj, type) and issubclass(obj, expect)):
            raise ArchitectureError(f"{where}: {new_module}:{new_qualname} is not a "
                                    f"{expect.__module__}.{expect.__qualname__} subclass",
                                    hint="the file is damaged or was not written by ckpt")
        return obj

    def _import(self, module: str, recorded: str, where: str) -> Any:
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and not module.startswith(e.name):  # the module's own import failed
                raise ArchitectureError(f"{where}: importing {module!r} for {recorded} failed: {e}",
                                        hint=f"install what {module!r} needs") from e
            raise ArchitectureError(f"{where}: the recorded {recorded} cannot be imported "
                                    f"(no module named {e.name!r})", hint=_moved(recorded)) from e

    def _walk(self, obj: Any, module: str, qualname: str, recorded: str, where: str) -> Any:
        """Look ``qualname`` up attribute by attribute, through classes only."""
        parts = qualname.split(".")
        for i, part in enumerate(parts):
            if i and not isinstance(obj, type):
                raise _through(obj, recorded, ".".join(parts[i:]), self.source, where)
            if not hasattr(obj, part):
                raise ArchitectureError(f"{where}: module {module!r} has no {qualname!r} "
                                        f"(recorded as {recorded})", hint=_moved(recorded))
            obj = getattr(obj, part)
        return obj


def _under(module: str, packages: Tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _moved(recorded: str) -> str:
    module, _, qualname = recorded.partition(":")
    if module == "__main__":
        return ("it was defined in the script that saved it: move the class into an importable "
                "module, or load from a script that defines it, with trusted=['__main__']")
    return (f"if it moved, pass rename={{{recorded!r}: 'new.module:{qualname.split('.')[-1]}'}}; "
            "otherwise make its package importable (pip install it, or add it to sys.path)")


def _through(obj: Any, recorded: str, rest: str, source: str, where: str) -> UntrustedModuleError:
    """A name that reaches its object through a module or a non-class: never resolved."""
    if isinstance(obj, types.ModuleType):
        direct = f"{obj.__name__}:{rest}"
        return UntrustedModuleError(
            f"{source}: {where} names {recorded}, which reaches {rest!r} through the module "
            f"{obj.__name__!r}; ckpt looks names up only in the module they were recorded with "
            "(ckpt never writes such a name), so nothing was run",
            hint=f"only if you trust the file, pass rename={{{recorded!r}: {direct!r}}} and "
                 f"trusted=[{obj.__name__!r}]")
    return UntrustedModuleError(
        f"{source}: {where} names {recorded}, which reaches {rest!r} through a "
        f"{type(obj).__name__}, not a class; nothing was run",
        hint="the file is damaged or was not written by ckpt")


def _refused(obj: Any, recorded: str, source: str, where: str) -> UntrustedModuleError:
    """The object a trusted name led to is not itself trusted."""
    if isinstance(obj, types.ModuleType):
        return UntrustedModuleError(f"{source}: {where} names {recorded}, which is a module, not a "
                                    "class or function; nothing was run",
                                    hint="the file is damaged or was not written by ckpt")
    home = getattr(obj, "__module__", None)
    real = f"{home}.{getattr(obj, '__qualname__', '?')}" if isinstance(home, str) else repr(obj)
    return UntrustedModuleError(
        f"{source}: {where} names {recorded}, which is {real}: not trusted (by default only classes "
        "from torch.nn and a short list of tensor functions are), so nothing was run",
        hint=(f"if you trust it, pass trusted=[{home!r}] " if isinstance(home, str) else "if you trust it, ")
        + "(or trust_all=True to trust every module the file names)")


def build(spec: Mapping[str, Any], resolver: Resolver, where: str = "model",
          weights: Optional[Mapping[str, Any]] = None, strict: bool = True) -> nn.Module:
    """Construct the module a spec describes (weights are loaded by the caller).

    With ``weights``, the module is first built on the ``meta`` device (no memory) and
    its parameter names and shapes compared with ``weights``, so a spec that names
    huge sizes next to small stored weights is refused before anything is allocated.
    """
    version = spec.get("version") if isinstance(spec, Mapping) else None
    if type(version) is not int:
        raise ArchitectureError(f"{resolver.source}: the model spec is malformed",
                                hint="the file is damaged or was not written by ckpt")
    if version > SPEC_VERSION:
        raise FormatVersionError(f"{resolver.source}: model spec version {version} is newer than "
                                 f"this ckpt reads ({SPEC_VERSION})", hint="upgrade ckpt")
    try:
        resolver.check(spec)
        if weights is not None:
            with torch.device("meta"):
                _check_sizes(_module(spec, resolver, where), weights, resolver.source, where, strict)
        return _module(spec, resolver, where)
    except (KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise ArchitectureError(f"{resolver.source}: the model spec of {where!r} is malformed "
                                f"({type(e).__name__}: {e})",
                                hint="the file is damaged or was not written by ckpt") from e


def _check_sizes(model: nn.Module, weights: Mapping[str, Any], source: str, where: str, strict: bool) -> None:
    """Refuse a spec whose tensors do not match the stored weights they would receive
    (checked on the meta device: nothing is allocated). With ``strict=False`` mismatches
    are allowed, but not a model far larger than the weights stored for it."""
    _, _, shapes = state.module_mismatch(model, state.strip_wrapper_prefix(weights, model.state_dict().keys()))
    built = sum(t.nelement() * t.element_size() for t in model.state_dict().values())
    stored = sum(t.nelement() * t.element_size() for t in weights.values() if isinstance(t, torch.Tensor))
    if shapes and (strict or built > 4 * stored + (64 << 20)):
        raise StateMismatchError(
            f"the checkpoint's {where!r} does not fit the model its spec builds (shape mismatches: "
            f"{', '.join(shapes[:8])})", path=source,
            hint="the class's code changed since the file was saved, or the file is damaged; "
                 "nothing was allocated")


def _module(spec: Mapping[str, Any], r: Resolver, where: str) -> nn.Module:
    cls = r.resolve(spec["module"], spec["qualname"], where, nn.Module)
    args = [_decode(v, r, f"{where}[{i}]") for i, v in enumerate(spec.get("args", []))]
    kwargs = {k: _decode(v, r, f"{where}.{k}") for k, v in spec.get("kwargs", {}).items()}
    call = describe(dict(spec))
    try:
        inspect.signature(cls).bind(*args, **kwargs)
    except TypeError as e:
        raise ArchitectureError(
            f"{where}: the arguments recorded for {spec['module']}:{spec['qualname']} no longer fit "
            f"its signature {_signature(cls)} ({e}); recorded call: {call}",
            hint="the class's __init__ changed since the file was saved: restore the old parameters "
                 "(or give new ones defaults), or build the model yourself and load the weights "
                 "with model.load_state_dict(torch.load(path, weights_only=True)['model'])") from e
    except ValueError:
        pass  # no signature to check (some builtins): let the call decide
    try:
        built: nn.Module = cls(*args, **kwargs)
        return built
    except Exception as e:
        raise ArchitectureError(f"{where}: building {call} failed: {type(e).__name__}: {e}",
                                hint="the class no longer accepts the recorded arguments; restore "
                                     "the code it was saved with, or build the model yourself") from e


def _signature(cls: type) -> str:
    try:
        return str(inspect.signature(cls))
    except (TypeError, ValueError):
        return "(...)"


def _decode(value: Any, r: Resolver, where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, r, where) for v in value]
    if type(value) is tuple:
        return tuple(_decode(v, r, where) for v in value)
    if not isinstance(value, dict):
        return value
    kind = value.get("kind")
    if kind in sv.MAPPINGS:
        items = [(_decode(k, r, where), _decode(v, r, where)) for k, v in value["items"]]
        return collections.OrderedDict(items) if kind == sv.ODICT else dict(items)
    if kind in sv.SETS:
        return (set if kind == sv.SET else frozenset)(_decode(v, r, where) for v in value["items"])
    if kind == sv.MODULE:
        return _module(value["spec"], r, where)
    if kind == sv.ENUM:
        return r.resolve(value["module"], value["qualname"], where, enum.Enum)[value["name"]]
    if kind == sv.NAMEDTUPLE:
        cls = r.resolve(value["module"], value["qualname"], where, tuple)
        return cls(*(_decode(v, r, where) for v in value["items"]))
    if kind == sv.DATACLASS:
        cls = r.resolve(value["module"], value["qualname"], where, object)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ArchitectureError(f"{where}: {value['module']}:{value['qualname']} is not a dataclass")
        return cls(**{k: _decode(v, r, where) for k, v in value["fields"].items()})
    if kind == sv.PARTIAL:
        return functools.partial(_decode(value["func"], r, where),
                                 *[_decode(v, r, where) for v in value["args"]],
                                 **{k: _decode(v, r, where) for k, v in value["kwargs"].items()})
    if kind == sv.GLOBAL:
        return r.resolve(value["module"], value["qualname"], where)
    raise ArchitectureError(f"{where}: unknown value kind {kind!r} in the model spec",
                            hint="the file was written by a newer ckpt: upgrade ckpt")

