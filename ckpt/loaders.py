"""torchdata's ``StatefulDataLoader`` tracked like any object, resumed exactly.

Creating a ``DataLoader`` iterator draws the workers' base seed from the global torch
RNG (unless the loader has ``generator=``). After a mid-epoch resume, ckpt has put the
global RNG back to where it was at the save, inside the epoch, when that epoch's
iterator already existed: the resumed iterator's draw would be one the uninterrupted
run never made, shifting every later random number (dropout masks, augmentations).
The loader restores the saved base seed anyway, so after a restore the next iterator
draws its (discarded) seed from a throwaway generator; every later iterator draws from
the global RNG again, as in the uninterrupted run.

A ``StatefulDataLoader`` resumes only with the ``num_workers`` it was saved with:
:func:`check` says so, naming both numbers, before anything is restored.

An Accelerate-prepared loader (``DataLoaderShard``/``DataLoaderDispatcher``) counts its
epochs in ``iteration`` and seeds its sampler from it (``use_seedable_sampler``), but its
``state_dict()`` is only the inner loader's: a fresh one resumed in epoch 3 would shuffle
as in epoch 0. :func:`with_position` saves the count next to that state and
:func:`load_into` puts it back (``set_epoch``).
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import torch

from .errors import StateMismatchError


def is_stateful_loader(obj: Any) -> bool:
    module = sys.modules.get("torchdata.stateful_dataloader")
    return module is not None and isinstance(obj, module.StatefulDataLoader)


def saved_workers(state: Mapping[str, Any]) -> int:
    """The ``num_workers`` a StatefulDataLoader state was saved with (0: in-process)."""
    snapshot = state.get("_snapshot")
    if isinstance(snapshot, Mapping):
        main = snapshot.get("_main_snapshot")
        if isinstance(main, Mapping) and isinstance(main.get("_num_workers"), int):
            return int(main["_num_workers"])
    return 0


def check(name: str, loader: Any, state: Any, path: str) -> None:
    """Raise :class:`StateMismatchError` if ``state`` cannot resume ``loader``."""
    if not is_stateful_loader(loader) or not isinstance(state, Mapping) or not state:
        return
    saved, now = saved_workers(state), int(loader.num_workers)
    if saved != now:
        raise StateMismatchError(
            f"the checkpoint's {name!r} was saved by a StatefulDataLoader with num_workers={saved}, "
            f"this one has num_workers={now}; nothing was restored", path=path,
            hint=f"build the loader with num_workers={saved} to resume mid-epoch "
                 "(StatefulDataLoader cannot change it in the middle of an epoch)")


def after_load(loader: Any, state: Any) -> None:
    """Make the next iterator's seed draw leave the global RNG alone (see the module doc)."""
    if not is_stateful_loader(loader) or not state or (isinstance(state, Mapping) and state.get(EPOCH_DONE_KEY)):
        return  # at an epoch's end nothing was restored: the next iterator draws as in the uninterrupted run
    loader = getattr(loader, "base_dataloader", loader)  # Accelerate's DataLoaderShard wraps one
    if loader.generator is not None:
        return
    loader.generator = torch.Generator()

    def get_iterator_once() -> Any:
        try:
            return type(loader)._get_iterator(loader)
        finally:
            loader.generator = None
            loader.__dict__.pop("_get_iterator", None)

    loader.__dict__["_get_iterator"] = get_iterator_once


#: The epoch count of an Accelerate-prepared loader, saved next to its inner loader's state,
#: and whether it was saved at the last batch of an epoch (suspended before it counts it).
ITERATION_KEY = "ckpt_accelerate_iteration"
EPOCH_DONE_KEY = "ckpt_accelerate_epoch_done"


def is_accelerate_loader(obj: Any) -> bool:
    return "base_dataloader" in getattr(obj, "__dict__", {}) and isinstance(getattr(obj, "iteration", None), int) \
        and callable(getattr(obj, "set_epoch", None))


def _at_last_batch(obj: Any) -> bool:
    """An Accelerate loader suspended at its epoch's last batch (still iterating: once the
    loop takes the next batch, the epoch ends and ``iteration`` counts it)."""
    active = getattr(getattr(obj, "gradient_state", None), "dataloader_references", None) or []
    return bool(getattr(obj, "end_of_dataloader", False)) and any(r is obj for r in active)


def with_position(obj: Any, state: Any) -> Any:
    """``state`` (``obj.state_dict()``), with an Accelerate loader's epoch count."""
    if is_accelerate_loader(obj) and isinstance(state, Mapping):
        done = _at_last_batch(obj)
        return {**state, ITERATION_KEY: int(obj.iteration) + done, EPOCH_DONE_KEY: done}
    return state


def load_into(obj: Any, state: Any) -> None:
    """``obj.load_state_dict(state)``, and an Accelerate loader's epoch count put back.

    Saved at an epoch's last batch, the inner loader's state is that of a finished epoch,
    from which it would start a whole new one: instead the loader starts afresh at the
    next epoch, and the iteration that finishes the interrupted epoch yields nothing."""
    if not (isinstance(state, Mapping) and ITERATION_KEY in state):
        obj.load_state_dict(state)
        return
    done = bool(state.get(EPOCH_DONE_KEY))
    obj.load_state_dict({} if done else {k: v for k, v in state.items() if k not in (ITERATION_KEY, EPOCH_DONE_KEY)})
    if is_accelerate_loader(obj):
        obj.set_epoch(int(state[ITERATION_KEY]))
        if done:
            _empty_once(obj.base_dataloader)


def _empty_once(loader: Any) -> None:
    def empty() -> Any:
        loader.__dict__.pop("__iter__", None)
        return iter(())
    loader.__dict__["__iter__"] = empty  # Accelerate calls base_dataloader.__iter__() by name
