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
    if not is_stateful_loader(loader) or not state:
        return
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
