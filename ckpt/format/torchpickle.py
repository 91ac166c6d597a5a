"""The pickle of ``torch.save``'s ``data.pkl``, byte for byte, without torch's per-tensor
detour (a ``TypedStorage`` built and inspected for every tensor): plain CPU tensors are
reduced directly to the same opcodes. :mod:`~ckpt.format.torchzip` writes the file."""

from __future__ import annotations

import collections
import io
import pickle
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch


class Unsupported(Exception):
    """The object holds something only ``torch.save`` itself writes correctly."""


class _Hooks:
    """Stands for the empty ``OrderedDict`` of backward hooks torch pickles with every
    tensor: reduced to the same opcodes without ``OrderedDict.__reduce__``'s slow
    look-up of slot names (a fresh one per tensor, so the memo does not merge them)."""

    __slots__ = ()


class _StorageRef:
    """Stands for one storage in the pickle: pickled as torch's persistent id."""

    __slots__ = ("pid",)

    def __init__(self, pid: Tuple[Any, ...]) -> None:
        self.pid = pid


_STORAGE_TYPES: Dict[torch.dtype, Any] = {}
try:  # torch's own serialisation internals (stable since 2.x); without them, torch.save writes
    _NEW_DTYPES = frozenset(torch.storage._new_dtypes())  # written with _rebuild_tensor_v3
    _STORAGE_NAMES = torch.storage._dtype_to_storage_type_map()
    _METADATA = torch._C._get_tensor_metadata  # type: ignore[attr-defined]  # conj / neg bits
    _REBUILD = torch._utils._rebuild_tensor_v2
    _ALIGNMENT = getattr(torch.serialization, "_get_storage_alignment", lambda: 64)
    AVAILABLE = True
except AttributeError:  # pragma: no cover - another torch
    AVAILABLE = False


def _storage_type(dtype: torch.dtype) -> Any:
    """``torch.FloatStorage`` for float32 and so on: the class torch names in the pickle."""
    found = _STORAGE_TYPES.get(dtype)
    if found is None:
        name = _STORAGE_NAMES.get(dtype)
        if name is None or dtype in _NEW_DTYPES:
            raise Unsupported(f"dtype {dtype}")
        found = _STORAGE_TYPES[dtype] = getattr(torch, name)
    return found


class _Pickler(pickle.Pickler):
    """torch.save's pickler, with plain CPU tensors reduced without a detour."""

    def __init__(self, buffer: io.BytesIO) -> None:
        super().__init__(buffer, protocol=torch.serialization.DEFAULT_PROTOCOL)
        self.storages: List[torch.UntypedStorage] = []
        self._keys: Dict[int, Tuple[Tuple[Any, ...], torch.dtype]] = {}  # storage -> (persistent id, dtype)
        self._tag: Optional[str] = None

    def _expect_ref(self) -> None:
        """A storage reference is about to be pickled (see :class:`_TogglingPickler`)."""

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)  # per-tensor costs below are what a state of small tensors pays
        if kind is _Hooks:
            return _EMPTY_ORDERED_DICT
        if kind is not torch.Tensor:
            if isinstance(obj, (torch.Tensor, torch.storage.TypedStorage, torch.UntypedStorage)):
                raise Unsupported(kind.__qualname__)
            return NotImplemented
        if (not obj.is_cpu or obj.layout is not _STRIDED or obj.is_quantized
                or obj.__dict__ or obj._backward_hooks or any(getattr(obj, "names", ())) or _METADATA(obj)):
            raise Unsupported("a tensor torch serialises specially")
        storage = obj.untyped_storage()
        dtype = obj.dtype
        known = self._keys.get(storage._cdata)
        if known is None:
            if self._tag is None:  # torch's location tag: every storage here is on the CPU
                self._tag = torch.serialization.location_tag(storage)
            pid = ("storage", _STORAGE_TYPES.get(dtype) or _storage_type(dtype), str(len(self.storages)), self._tag,
                   storage.nbytes() // obj.element_size())
            self._keys[storage._cdata] = (pid, dtype)
            self.storages.append(storage)
        elif known[1] is not dtype:  # torch refuses this: let it say so
            raise Unsupported("one storage viewed with two dtypes")
        else:
            pid = (*known[0],)  # a fresh tuple, pickled afresh as torch does (not a memo reference)
        self._expect_ref()
        return (_REBUILD,
                (_StorageRef(pid), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.requires_grad, _Hooks()))


#: How :class:`_Hooks` pickles (one constant: the pickler needs no fresh tuple).
_EMPTY_ORDERED_DICT = (collections.OrderedDict, ())
_STRIDED = torch.strided


class _MethodPickler(_Pickler):
    """Asks its ``persistent_id`` method about every object pickled (as torch.save does)."""

    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if type(obj) is _StorageRef else None


#: A C callable that returns None for any object: "not persistent", at C speed.
_NOT_PERSISTENT: Callable[[Any], None] = collections.deque(maxlen=0).append


class _TogglingPickler(_Pickler):
    """The pickler calls ``persistent_id`` for every object it saves (tens of thousands
    for a state of 1,600 tensors); here it is a C no-op except between a tensor's
    reduction and its storage reference, the only place a persistent id can occur.
    Used only where a self-test shows the bytes are identical (:func:`_pickler_class`)."""

    def __init__(self, buffer: io.BytesIO) -> None:
        super().__init__(buffer)
        self._ask = self._pid
        self.persistent_id = _NOT_PERSISTENT  # type: ignore[method-assign]

    def _expect_ref(self) -> None:
        self.persistent_id = self._ask  # type: ignore[method-assign]

    def _pid(self, obj: Any) -> Any:
        if type(obj) is _StorageRef:
            self.persistent_id = _NOT_PERSISTENT  # type: ignore[method-assign]
            return obj.pid
        return None


_PICKLER: List[type] = []


def _pickler_class() -> type:
    """:class:`_TogglingPickler` where this interpreter honours the switch (CPython
    3.10-3.12 do; on 3.13 the switch has no effect), else :class:`_MethodPickler`."""
    if not _PICKLER:
        sample = {"a": [torch.zeros(2), torch.ones(3, dtype=torch.float64)], "b": ({"c": torch.arange(4)}, 1.5)}
        out = []
        for cls in (_MethodPickler, _TogglingPickler):
            buffer = io.BytesIO()
            cls(buffer).dump(sample)
            out.append(buffer.getvalue())
        _PICKLER.append(_TogglingPickler if out[0] == out[1] else _MethodPickler)
    return _PICKLER[0]
