"""Building a model again from its architecture spec, under the trust rule.

Importing a module runs its code, so a spec read from a file is code execution by
proxy. Every module a spec names is checked against the caller's trust *before*
anything is imported: ``torch`` (top-level functions) and ``torch.nn`` are trusted by
default, anything else only when the caller lists its package (``trusted=["mypkg"]``
trusts ``mypkg`` and ``mypkg.*``) or passes ``trust_all=True``. Even then a spec can
only construct ``nn.Module`` subclasses, enums, dataclasses and named tuples; other
names are passed as values, never called by ckpt.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import importlib
import inspect
from typing import Any, Iterable, Iterator, Mapping, Optional, Tuple

from torch import nn

from .architecture import SPEC_VERSION, describe
from .errors import ArchitectureError, ConfigError, FormatVersionError, UntrustedModuleError

DEFAULT_TRUSTED = ("torch.nn",)
_DEFAULT_EXACT = ("torch",)


class Resolver:
    """Finds the classes a spec names: renames applied, trust checked, imports done."""

    def __init__(self, trusted: Iterable[str] = (), *, trust_all: bool = False,
                 rename: Optional[Mapping[str, str]] = None, source: str = "the spec") -> None:
        if isinstance(trusted, bool):
            raise ConfigError(f"trusted= takes package names, got {trusted!r}",
                              hint="pass trusted=['mypkg'], or trust_all=True to trust every module")
        if isinstance(trusted, str):
            trusted = [trusted]
        self.trusted = tuple(DEFAULT_TRUSTED) + tuple(p.rstrip(".") for p in trusted)
        self.trust_all = trust_all
        self.rename = dict(rename or {})
        self.source = source

    def name(self, module: str, qualname: str) -> Tuple[str, str]:
        """(module, qualname) after ``rename``: ``"old.mod:Net"`` or a whole ``"old.mod"``."""
        full = self.rename.get(f"{module}:{qualname}")
        if full is not None:
            new_module, _, new_qualname = full.partition(":")
            return new_module, new_qualname or qualname
        return self.rename.get(module, module), qualname

    def is_trusted(self, module: str) -> bool:
        return (self.trust_all or module in _DEFAULT_EXACT
                or any(module == p or module.startswith(p + ".") for p in self.trusted))

    def check(self, spec: Mapping[str, Any]) -> None:
        """Raise :class:`UntrustedModuleError` naming every untrusted module; imports nothing."""
        untrusted = sorted({m for m, _ in (self.name(*ref) for ref in refs(spec))
                            if not self.is_trusted(m)})
        if untrusted:
            packages = sorted({m.split(".")[0] for m in untrusted})
            raise UntrustedModuleError(
                f"{self.source} names code in {', '.join(repr(m) for m in untrusted)}, which is not "
                "trusted; importing it would run its code, so nothing was imported",
                hint=f"if you trust it, pass trusted={packages!r} "
                     "(or trust_all=True to trust every module the file names)")

    def resolve(self, module: str, qualname: str, where: str, expect: type) -> Any:
        """Import ``module`` and return ``qualname`` from it, which must subclass ``expect``."""
        new_module, new_qualname = self.name(module, qualname)
        if not self.is_trusted(new_module):  # check() ran first; this guards direct callers
            raise UntrustedModuleError(f"{self.source}: {new_module!r} is not trusted",
                                       hint=f"pass trusted=[{new_module.split('.')[0]!r}]")
        recorded = f"{module}:{qualname}"
        fix = (f"if it moved, pass rename={{{recorded!r}: 'new.module:{qualname.split('.')[-1]}'}}; "
               "otherwise make its package importable (pip install it, or add it to sys.path)")
        if module == "__main__":
            fix = ("it was defined in the script that saved it: move the class into an importable "
                   "module, or load from a script that defines it, with trusted=['__main__']")
        try:
            obj: Any = importlib.import_module(new_module)
        except ModuleNotFoundError as e:
            if e.name and not new_module.startswith(e.name):  # the module's own import failed
                raise ArchitectureError(f"{where}: importing {new_module!r} for {recorded} failed: {e}",
                                        hint=f"install what {new_module!r} needs") from e
            raise ArchitectureError(f"{where}: the recorded class {recorded} cannot be imported "
                                    f"(no module named {e.name!r})", hint=fix) from e
        for part in new_qualname.split("."):
            if not hasattr(obj, part):
                raise ArchitectureError(f"{where}: module {new_module!r} has no {new_qualname!r} "
                                        f"(recorded as {recorded})", hint=fix)
            obj = getattr(obj, part)
        if not (isinstance(obj, type) and issubclass(obj, expect)):
            raise ArchitectureError(f"{where}: {new_module}:{new_qualname} is not a "
                                    f"{expect.__module__}.{expect.__qualname__} subclass",
                                    hint="the file is damaged or was not written by ckpt")
        return obj


def refs(spec: Mapping[str, Any]) -> Iterator[Tuple[str, str]]:
    """Every (module, qualname) a spec names, nested ones included, in the order built.

    ``Resolver.resolve`` checks trust again at each import, so a malformed spec that
    hides a name from this walk still imports nothing untrusted.
    """
    yield spec["module"], spec["qualname"]
    stack = list(spec.get("args", [])) + list(spec.get("kwargs", {}).values())
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
            continue
        kind = item.get("kind") if isinstance(item, dict) else None
        if kind == "module":
            yield from refs(item["spec"])
        elif kind in ("enum", "global", "namedtuple", "dataclass"):
            yield item["module"], item["qualname"]
            stack.extend(item.get("items", []))  # namedtuple fields
            stack.extend(item.get("fields", {}).values())  # dataclass fields
        elif kind == "partial":
            stack += [item["func"], *item["args"], *item["kwargs"].values()]
        elif kind in ("dict", "odict", "set", "frozenset"):
            stack.extend(item["items"])


def build(spec: Mapping[str, Any], resolver: Resolver, where: str = "model") -> nn.Module:
    """Construct the module a spec describes (weights are loaded by the caller)."""
    version = spec.get("version") if isinstance(spec, Mapping) else None
    if not isinstance(version, int):
        raise ArchitectureError(f"{resolver.source}: the model spec is malformed",
                                hint="the file is damaged or was not written by ckpt")
    if version > SPEC_VERSION:
        raise FormatVersionError(f"{resolver.source}: model spec version {version} is newer than "
                                 f"this ckpt reads ({SPEC_VERSION})", hint="upgrade ckpt")
    resolver.check(spec)
    return _module(spec, resolver, where)


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
        return cls(*args, **kwargs)
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
    if kind in ("dict", "odict"):
        items = [(_decode(k, r, where), _decode(v, r, where)) for k, v in value["items"]]
        return collections.OrderedDict(items) if kind == "odict" else dict(items)
    if kind in ("set", "frozenset"):
        return (set if kind == "set" else frozenset)(_decode(v, r, where) for v in value["items"])
    if kind == "module":
        return _module(value["spec"], r, where)
    if kind == "enum":
        return r.resolve(value["module"], value["qualname"], where, enum.Enum)[value["name"]]
    if kind == "namedtuple":
        cls = r.resolve(value["module"], value["qualname"], where, tuple)
        return cls(*(_decode(v, r, where) for v in value["items"]))
    if kind == "dataclass":
        cls = r.resolve(value["module"], value["qualname"], where, object)
        if not dataclasses.is_dataclass(cls):
            raise ArchitectureError(f"{where}: {value['module']}:{value['qualname']} is not a dataclass")
        return cls(**{k: _decode(v, r, where) for k, v in value["fields"].items()})
    if kind == "partial":
        return functools.partial(_decode(value["func"], r, where),
                                 *[_decode(v, r, where) for v in value["args"]],
                                 **{k: _decode(v, r, where) for k, v in value["kwargs"].items()})
    if kind == "global":
        return _global(value, r, where)
    raise ArchitectureError(f"{where}: unknown value kind {kind!r} in the model spec",
                            hint="the file was written by a newer ckpt: upgrade ckpt")


def _global(value: Mapping[str, Any], r: Resolver, where: str) -> Any:
    """A class or function passed as an argument: looked up by name, never called here."""
    module, qualname = r.name(value["module"], value["qualname"])
    if not r.is_trusted(module):
        raise UntrustedModuleError(f"{r.source}: {module!r} is not trusted",
                                   hint=f"pass trusted=[{module.split('.')[0]!r}]")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ArchitectureError(f"{where}: the recorded {module}:{qualname} cannot be imported ({e})",
                                hint=f"if it moved, pass rename={{'{module}:{qualname}': "
                                     "'new.module:name'}") from e
    return obj
