"""A sharded save across ranks, the same on the training thread (a synchronous save)
and on the writer thread (``async_save``: :mod:`.collective_async`); see docs/howto/fsdp2.md.

Rank 0 takes the run directory's lock for the whole save (no other writer, no cleanup
of the scratch directory), checks the name is new (or sets aside the checkpoint an
overwrite replaces) and builds the plain entries; every rank agrees, writes its shards
(``ckpt.distributed.sharded.save_into``: complete on every rank, then renamed by
rank 0); rank 0 indexes it through the catalog's commit-and-retention transaction and
broadcasts the outcome: every rank returns the same records or raises.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Callable, Union

from .. import schema
from ..catalog import sharddir
from ..catalog.commit import check_new
from ..distributed import collective as cl
from ..record import CheckpointRecord
from ..storage.local import scratch_dir
from . import saving
from .base import ManagerView, Outcome, announce, failure, received

if TYPE_CHECKING:
    from ..distributed.sharded import Captured
    from .saving import SaveArgs

#: The collective steps run through this (the engine's: a failure marks it broken).
Guard = Callable[..., Any]
#: Modules and optimizers, or their state dicts captured (and staged) already.
States = Union[dict[str, Any], "Captured"]


class _Prepared:
    """Rank 0's side of a save before the shards are written."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.listed: list[CheckpointRecord] = []  # the committed records, read under the lock
        self.replacing: sharddir.Overwrite | None = None  # what it replaces stays until the commit
        self.error: BaseException | None = None

    def undo(self) -> None:
        if self.replacing is not None:
            self.replacing.undo()


def save(ctx: cl.Group, mgr: ManagerView, args: SaveArgs, states: States, meta: Callable[[], dict[str, Any]], *,
         timeout: float, guard: Guard) -> Outcome:
    """Collective: the sharded checkpoint of ``args`` from ``states``; ``meta()`` builds
    the plain entries on rank 0. Returns rank 0's broadcast outcome (or raises everywhere)."""
    from ..distributed.sharded import save_into

    store = mgr.catalog.store
    name = schema.dir_name(args.epoch, args.step)
    tmp = scratch_dir(name)  # the same on every rank: each writes its shards there
    with ExitStack() as held:
        prep = _Prepared()
        if ctx.is_leader:
            _prepare(prep, held, mgr, args, name, meta)
        replacing = prep.replacing
        aside = store.where(replacing.aside) if replacing is not None and replacing.aside else None
        try:
            guard(cl.agree, ctx, f"save() of {name} (prepare)", prep.error, timeout=timeout)
            manifest = guard(save_into, ctx, store, name, tmp, states, prep.meta, timeout=timeout, aside=aside)
        except BaseException:
            prep.undo()
            raise
        outcome: Outcome | None = None
        if ctx.is_leader:
            try:
                rec = sharddir.committed(store, name, manifest, prep.meta)
                kept = saving.retain(mgr, prep.listed, rec, None if replacing is None else replacing.done)
                outcome = ("ok", rec.to_json(), [r.to_json() for r in kept])
            except Exception as e:  # noqa: BLE001 - every failure must reach the others
                prep.undo()
                prep.error, outcome = e, failure(e)
        what = f"save() of {name} (index)"
        got = announce(what, lambda: guard(cl.broadcast_object, ctx, outcome, timeout=timeout, what=what), outcome,
                       prep.error, store.where, (args.epoch, args.step))
        return received(what, got, prep.error)


def _prepare(prep: _Prepared, held: ExitStack, mgr: ManagerView, args: SaveArgs, name: str,
             meta: Callable[[], dict[str, Any]]) -> None:
    """Rank 0: the lock, the records, the name checked, the plain entries; an error is kept in ``prep``."""
    store = mgr.catalog.store
    try:
        held.enter_context(store.lock(commit=True))
        prep.listed = mgr.catalog.scan(locked=True).records
        existing = check_new((args.epoch, args.step), args.mid_epoch, args.overwrite, prep.listed)
        prep.meta = meta()
        if existing is not None:
            prep.replacing = sharddir.Overwrite(store, existing.name, name, prep.listed)
            prep.listed = prep.replacing.begin()
    except Exception as e:  # noqa: BLE001 - every failure must reach the others
        prep.error = e


def plain_entries(mgr: ManagerView, args: SaveArgs, plain: dict[str, Any], dcp_states: dict[str, Any],
                  rngs: list[Any]) -> dict[str, Any]:
    """The plain entries of a sharded checkpoint (``ckpt-meta.pt``): the states of ``plain``
    captured now, every rank's RNG states, and what the sharded states are."""
    from .. import state

    meta = saving.build(mgr, state.capture(plain), args.epoch, args.step, args.mid_epoch, args.metrics, args.extra,
                        rngs).obj
    meta["ckpt"]["objects"] = list(mgr.trackables)
    meta["ckpt"]["sharded"] = list(dcp_states)
    return meta
