"""The vocabulary of a model spec's argument values, and the walks over it.

A spec (:mod:`ckpt.spec`) stores an argument as itself when it is plain data
(:data:`NATIVE`, lists, tuples, tensors); anything else is a dict tagged by
``"kind"``, one of :data:`KINDS`, with the fields listed there:

``module`` (``spec``: a nested spec); ``enum`` (``module``, ``qualname``, ``name``);
``global`` (``module``, ``qualname``: a class or function); ``namedtuple``
(``module``, ``qualname``, ``items``); ``dataclass`` (``module``, ``qualname``,
``fields``); ``partial`` (``func``, ``args``, ``kwargs``); ``dict``/``odict``
(``items``: [key, value] pairs); ``set``/``frozenset`` (``items``).

:func:`ckpt.spec.encode` writes exactly these and :mod:`ckpt.models.build` decodes
exactly these; :func:`refs` (every import a spec names, for the trust check),
:func:`describe` (a spec as a call, for messages) and :func:`global_ref` (the import
path under which an object is recorded) are here. Pure functions over plain data.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import torch

from .errors import ArchitectureError

#: Values stored as themselves.
NATIVE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)

MODULE, ENUM, GLOBAL, NAMEDTUPLE, DATACLASS, PARTIAL = "module", "enum", "global", "namedtuple", "dataclass", "partial"
DICT, ODICT, SET, FROZENSET = "dict", "odict", "set", "frozenset"
#: Every tagged kind and the fields it carries besides ``"kind"``.
KINDS: Dict[str, Tuple[str, ...]] = {
    MODULE: ("spec",), ENUM: ("module", "qualname", "name"), GLOBAL: ("module", "qualname"),
    NAMEDTUPLE: ("module", "qualname", "items"), DATACLASS: ("module", "qualname", "fields"),
    PARTIAL: ("func", "args", "kwargs"), DICT: ("items",), ODICT: ("items",), SET: ("items",),
    FROZENSET: ("items",),
}
#: Kinds that name an importable object (``module``, ``qualname``).
NAMED = (ENUM, GLOBAL, NAMEDTUPLE, DATACLASS)
MAPPINGS = (DICT, ODICT)
SETS = (SET, FROZENSET)


def kind_of(value: Any) -> Any:
    """The ``"kind"`` of a tagged value (None for plain data)."""
    return value.get("kind") if isinstance(value, dict) else None


def nested(value: Mapping[str, Any]) -> List[Any]:
    """The encoded values inside the tagged ``value`` (not a nested module's spec)."""
    kind = value.get("kind")
    if kind == PARTIAL:
        return [value["func"], *value["args"], *value["kwargs"].values()]
    return [*value.get("items", []), *value.get("fields", {}).values()]


def refs(spec: Mapping[str, Any]) -> Iterator[Tuple[str, str]]:
    """Every (module, qualname) a spec names, nested ones included, in the order built.

    ``Resolver.resolve`` (:mod:`ckpt.models.build`) checks trust again at each import,
    so a malformed spec that hides a name from this walk still imports nothing untrusted.
    """
    yield spec["module"], spec["qualname"]
    stack = list(spec.get("args", [])) + list(spec.get("kwargs", {}).values())
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
            continue
        kind = kind_of(item)
        if kind == MODULE:
            yield from refs(item["spec"])
        elif kind in NAMED:
            yield item["module"], item["qualname"]
            stack.extend(nested(item))  # namedtuple items, dataclass fields
        elif kind == PARTIAL or kind in MAPPINGS or kind in SETS:
            stack.extend(nested(item))


def ref(obj: Any, where: str) -> Dict[str, str]:
    """``{"module": ..., "qualname": ...}`` of ``obj``, for a tagged value that names it."""
    module, qualname = global_ref(obj, where)
    return {"module": module, "qualname": qualname}


def global_ref(obj: Any, where: str) -> Tuple[str, str]:
    """(module, qualname) under which ``obj`` can be imported again."""
    qualname = str(getattr(obj, "__qualname__", None) or getattr(obj, "__name__", ""))
    module = str(getattr(obj, "__module__", None) or "")
    if "<locals>" in qualname or "<lambda>" in qualname or not module:
        raise ArchitectureError(
            f"argument {where} is {obj!r}, defined inside a function or a lambda: it has no "
            "import path to record", hint="define it at module level (top of a .py file)")
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        return (spec.name if spec is not None else "__main__"), qualname
    for candidate, name in _candidates(obj, module, qualname):
        if _lookup(candidate, name) is obj:
            return candidate, name
    raise ArchitectureError(
        f"argument {where} is {obj!r}, which is not importable as {module}.{qualname}",
        hint="pass classes and functions defined at module level under their own name")


def _candidates(obj: Any, module: str, qualname: str) -> Iterator[Tuple[str, str]]:
    """Where to look for an object; torch defines many functions in private modules
    (``F.logsigmoid`` is ``torch._C._nn.log_sigmoid``), so its public names come first."""
    if module.split(".")[0] == "torch" and not isinstance(obj, type):
        name = getattr(obj, "__name__", qualname)
        yield from ((m, name) for m in _TORCH_PUBLIC)
        for m in _TORCH_PUBLIC:
            yield from ((m, n) for n, v in getattr(sys.modules.get(m), "__dict__", {}).items()
                        if v is obj and not n.startswith("_"))
    yield module, qualname


_TORCH_PUBLIC = ("torch.nn.functional", "torch.nn.init", "torch")


def _lookup(module: str, qualname: str) -> Any:
    found: Any = sys.modules.get(module)
    if found is None:
        try:
            found = importlib.import_module(module)
        except ImportError:
            return None
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found


def qualified_name(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"


def describe(spec: Dict[str, Any], limit: int = 300) -> str:
    """``pkg.mod:Net(4, hidden=8)``: a spec as a call, for error messages."""
    parts = [_show(a) for a in spec.get("args", [])]
    parts += [f"{k}={_show(v)}" for k, v in spec.get("kwargs", {}).items()]
    text = f"{spec.get('module')}:{spec.get('qualname')}({', '.join(parts)})"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _show(value: Any) -> str:
    if isinstance(value, dict):
        kind = value.get("kind")
        if kind == MODULE:
            return describe(value["spec"], limit=10_000)
        if kind in MAPPINGS:
            return "{" + ", ".join(f"{_show(k)}: {_show(v)}" for k, v in value["items"]) + "}"
        if kind == ENUM:
            return f"{value['qualname']}.{value['name']}"
        if kind in NAMED or kind == PARTIAL:
            return f"<{kind} {value.get('module', '')}:{value.get('qualname', '')}>"
        return f"<{kind}>"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    return repr(value)
