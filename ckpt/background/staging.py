"""Staging buffers for asynchronous saves.

An asynchronous save must not write tensors that training keeps changing, so
:meth:`Stager.stage` snapshots the checkpoint dict: containers are rebuilt and every
tensor is copied into a host buffer that ckpt owns. Buffers are paired with tensors
by their order in the dict (the n-th tensor staged takes the n-th buffer of the last
save) and reused when shape and dtype match, so steady-state saves allocate nothing
and stall the loop for one memory copy of the state; pairing by order rather than by
key path spares building and hashing a path per tensor, which is most of the cost on
thousands of small tensors. Host-to-host copies go out in one batched call. In the
steady state of a CPU run (the same tensors as last time, by shape and dtype, each at
its own address) one lean walk rebuilds the containers and collects the tensors, and
the checks are made once for all of them afterwards, in C-level passes over the list
(``_same_layout``); anything else takes the general walk. Tensors
on CUDA are copied into pinned host memory with non-blocking copies and one
synchronisation per device. The buffers are the only extra memory an async save
needs (one copy of the state); :meth:`Stager.release` frees them.
"""

from __future__ import annotations

import collections
import operator
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch

_Alias = Tuple[int, torch.Size, Tuple[int, ...], torch.dtype, torch.device]


class Stager:
    """Copies checkpoint dicts into reusable host buffers."""

    def __init__(self) -> None:
        self._buffers: Dict[int, torch.Tensor] = {}  # by order of staging
        self._layout: Optional[_Layout] = None  # the buffers' shapes and dtypes, in order

    @property
    def nbytes(self) -> int:
        """Bytes held in staging buffers."""
        return sum(b.nelement() * b.element_size() for b in self._buffers.values())

    def stage(self, obj: Any) -> Any:
        """A snapshot of ``obj`` whose tensors live in this stager's buffers.

        The snapshot stays valid until the next :meth:`stage` or :meth:`release`.
        """
        with torch.no_grad():
            staged = self._steady(obj)
            if staged is not None:
                return staged
        return self._general(obj)

    def stage_checked(self, obj: Any, check: Callable[[], int]) -> Tuple[Any, int]:
        """:meth:`stage`, and the bytes of ``obj``'s tensors, for a dict that must load
        with ``torch.load(weights_only=True)``.

        In the steady state the lean walk accepts only the values such a load reads back
        (a subset of what ``check`` accepts: plain containers, numbers, strings, tensors),
        so it is the check and no second walk is made. Anything else runs ``check()``
        first (it raises for a value that does not load, before anything is copied; it
        returns the bytes of the tensors), then the general walk.
        """
        layout = self._layout
        with torch.no_grad():
            staged = self._steady(obj, strict=True)
        if staged is not None and layout is not None:  # no aliases: the buffers' bytes are the tensors'
            return staged, layout.nbytes
        nbytes = check()
        return self._general(obj), nbytes

    def _general(self, obj: Any) -> Any:
        """The general walk: pairs, allocates or reuses buffers, copies."""
        with torch.no_grad():
            run = _Run(self._buffers)
            staged = run.walk(obj)
            run.copy()
        for device in run.devices:
            torch.cuda.current_stream(device).synchronize()
        self._buffers = run.fresh  # buffers of entries that disappeared are freed here
        self._layout = _layout(self._buffers) if run.fast else None
        return staged

    def _steady(self, obj: Any, strict: bool = False) -> Optional[Any]:
        """The snapshot when ``obj``'s tensors are those of the last save (by order,
        shape and dtype; plain, strided, on the CPU, each at its own address): one lean
        walk, the checks in batch, one batched copy. None (nothing copied) otherwise, and
        when ``strict`` also for any value a weights-only load would not read back."""
        layout = self._layout
        if layout is None:
            return None
        walk = _Collect(layout.buffers, strict)
        try:
            staged = walk.walk(obj)
        except (_Unusual, IndexError):  # IndexError: more tensors than buffers
            return None
        if not _same_layout(walk.src, layout):
            return None
        _copy_all(layout.buffers, walk.src)
        return staged

    def release(self) -> None:
        """Free every buffer (the next :meth:`stage` allocates again)."""
        self._buffers, self._layout = {}, None


class _Run:
    """One staging pass: reuses the previous buffers, records the ones in use now."""

    def __init__(self, previous: Dict[int, torch.Tensor]) -> None:
        self.previous = previous
        self.fresh: Dict[int, torch.Tensor] = {}
        self.seen: Dict[_Alias, torch.Tensor] = {}  # full keys, only where addresses repeat
        self.ptrs: Dict[int, Tuple[Optional[torch.Tensor], torch.Tensor]] = {}  # address -> first (tensor, buffer)
        self.devices: Set[torch.device] = set()
        self.cuda = torch.cuda.is_available()  # once per save, not per tensor
        self.fast = not self.cuda and _FOREACH_COPY is not None
        self.dst: List[torch.Tensor] = []  # host-to-host copies, made in one batch by copy()
        self.src: List[torch.Tensor] = []

    def walk(self, value: Any) -> Any:
        kind = type(value)
        if kind is torch.Tensor or kind is torch.nn.Parameter or isinstance(value, torch.Tensor):
            return self.tensor(value)
        if kind is dict or kind is collections.OrderedDict:  # per-entry cost matters with thousands of tensors
            out = {} if kind is dict else kind()
            tensor, walk = self.tensor, self.walk
            for k, v in value.items():
                kind = type(v)
                if kind is torch.Tensor or kind is torch.nn.Parameter:
                    out[k] = tensor(v)
                elif kind in _IMMUTABLE:
                    out[k] = v
                else:
                    out[k] = walk(v)
            return out
        return _rebuild(value, kind, self.walk)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout is not torch.strided or t.is_meta:  # rare kinds (no data pointer): not pooled
            return t.detach() if t.is_meta else t.detach().to("cpu", copy=True)  # meta: no data to copy
        ptr = t.data_ptr()
        slot = len(self.fresh)
        buffer = self.previous.get(slot)
        if buffer is not None and self.fast and ptr not in self.ptrs and t.is_cpu \
                and buffer.dtype is t.dtype and buffer.shape == t.shape:
            # the steady state of a CPU-only run: a tensor like the one staged here last time
            self.dst.append(buffer)
            self.src.append(t)
            self.fresh[slot] = buffer
            self.ptrs[ptr] = (t, buffer)
            return buffer
        return self._tensor(t, ptr, slot)

    def _tensor(self, t: torch.Tensor, ptr: int, slot: int) -> torch.Tensor:
        first = self.ptrs.get(ptr)
        if first is not None and t.nelement():  # another tensor at this address: the same one twice?
            if first[0] is not None:  # the full key of the first one, built only now
                self.seen[_alias(first[0])] = first[1]
                self.ptrs[ptr] = (None, first[1])
            same = self.seen.get(_alias(t))
            if same is not None:  # tied weights
                return same
        pinned = t.is_cuda
        buffer = self.previous.pop(slot, None)
        if buffer is None or buffer.shape != t.shape or buffer.dtype != t.dtype \
                or (self.cuda and buffer.is_pinned() != pinned):
            del buffer  # free the old buffer before allocating its replacement
            buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
        if t.is_cpu and _FOREACH_COPY is not None:
            self.dst.append(buffer)
            self.src.append(t)
        else:
            buffer.copy_(t, non_blocking=pinned)  # under no_grad: no autograd record
        if pinned:
            self.devices.add(t.device)
        self.fresh[slot] = buffer
        if first is None:
            self.ptrs[ptr] = (t, buffer)
        else:
            self.seen[_alias(t)] = buffer
        return buffer

    def copy(self) -> None:
        """The host-to-host copies in one batched call (for small tensors a ``copy_``
        each costs more in dispatch than in bytes); copies from devices were made in walk()."""
        if self.dst and _FOREACH_COPY is not None:
            _FOREACH_COPY(self.dst, self.src)


class _Layout:
    """The buffers of the last save in slot order, with their shapes and dtypes."""

    __slots__ = ("buffers", "shapes", "dtypes", "nbytes")

    def __init__(self, buffers: List[torch.Tensor]) -> None:
        self.buffers = buffers
        self.shapes = list(map(_SHAPE, buffers))
        self.dtypes = list(map(_DTYPE, buffers))
        self.nbytes = sum(b.nelement() * b.element_size() for b in buffers)


def _layout(buffers: Dict[int, torch.Tensor]) -> Optional[_Layout]:
    """The layout of ``buffers`` when their slots are 0..n-1 (always, after a pass)."""
    if not buffers or list(buffers) != list(range(len(buffers))):
        return None
    return _Layout(list(buffers.values()))


class _Unusual(Exception):
    """Something :class:`_Collect` leaves to the general walk (a tensor subclass)."""


class _Collect:
    """The lean walk of the steady state: containers rebuilt as :meth:`_Run.walk`
    rebuilds them, the n-th tensor replaced by the n-th buffer and collected in ``src``
    (checked afterwards by ``_same_layout``, copied by ``_copy_all``). ``strict``: only
    what ``torch.load(weights_only=True)`` reads back passes (keys and leaves of the
    exact types :func:`ckpt.schema.check_loadable` accepts, no empty bytes);
    anything else raises :class:`_Unusual`, for the general walk and its check."""

    __slots__ = ("buffers", "src", "strict")

    def __init__(self, buffers: List[torch.Tensor], strict: bool = False) -> None:
        self.buffers = buffers
        self.src: List[torch.Tensor] = []
        self.strict = strict

    def walk(self, value: Any) -> Any:
        kind = type(value)
        if kind is dict or kind is collections.OrderedDict:
            if self.strict and not _LEAVES.issuperset(map(type, value)):
                raise _Unusual("a key")
            out = {} if kind is dict else kind()
            buffers, src, walk = self.buffers, self.src, self.walk
            for k, v in value.items():
                kind = type(v)
                if kind is torch.Tensor or kind is torch.nn.Parameter:
                    out[k] = buffers[len(src)]
                    src.append(v)
                elif kind in _LEAVES:
                    out[k] = v
                else:
                    out[k] = walk(v)
            return out
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            buffer = self.buffers[len(self.src)]
            self.src.append(value)
            return buffer
        if isinstance(value, torch.Tensor):
            raise _Unusual(kind.__qualname__)
        if self.strict and kind not in _STRICT:
            raise _Unusual(kind.__qualname__)
        if kind is bytes and self.strict and not value:  # b"" pickles as a call to bytes()
            raise _Unusual("b''")
        return _rebuild(value, kind, self.walk)


def _rebuild(value: Any, kind: type, walk: Callable[[Any], Any]) -> Any:
    """A container other than a dict rebuilt around ``walk`` of its items, as both walks
    rebuild it; anything else is immutable (numbers, strings, bytes, torch.Size, dtypes)."""
    if kind is list:  # a list of plain values (an optimizer's parameter ids): one C-level pass
        return list(value) if _LEAVES.issuperset(map(type, value)) else [walk(v) for v in value]
    if kind is tuple:
        return value if _LEAVES.issuperset(map(type, value)) else tuple([walk(v) for v in value])
    if kind is bytearray or kind is set:
        return kind(value)
    return value


def _same_layout(src: List[torch.Tensor], layout: _Layout) -> bool:
    """Would the general walk pair each of ``src`` with its buffer of ``layout``? The
    same count, shapes and dtypes, every tensor strided on the CPU, no two at one address
    (an alias is staged once, by the general walk)."""
    n = len(src)
    return (n == len(layout.buffers) and list(map(_SHAPE, src)) == layout.shapes
            and list(map(_DTYPE, src)) == layout.dtypes and all(map(_IS_CPU, src))
            and list(map(_LAYOUT, src)).count(torch.strided) == n and len(set(map(_PTR, src))) == n)


def _copy_all(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    if _FOREACH_COPY is not None:
        _FOREACH_COPY(dst, src)
    else:  # pragma: no cover - a torch without _foreach_copy_
        for d, s in zip(dst, src):
            d.copy_(s)


_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")
_LAYOUT = operator.attrgetter("layout")
_PTR = torch.Tensor.data_ptr
_FOREACH_COPY = getattr(torch, "_foreach_copy_", None)
#: Values staged as they are (no copy): what a state dict holds besides tensors.
_IMMUTABLE = frozenset((type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device))
#: Of those, the ones a weights-only load reads back whatever their value (not bytes: b"" is refused).
_LEAVES = _IMMUTABLE - {bytes}
#: What a strict lean walk accepts besides dicts and tensors (sets' items are not walked: not here).
_STRICT = _LEAVES | {list, tuple, bytes, bytearray}


def _alias(t: torch.Tensor) -> _Alias:
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)
