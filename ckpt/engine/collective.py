"""The collective engine: a manager's work under ``torch.distributed``
(see docs/howto/ddp.md and docs/howto/fsdp2.md).

With a default process group, :class:`~ckpt.CheckpointManager` hands ``save``,
``resume``, ``restore``, ``wait`` and ``close`` to a :class:`CollectiveEngine`, the peer
of :class:`~ckpt.engine.local.LocalEngine`. Every rank calls them in the same order;
each is a few bounded collectives over :mod:`ckpt.distributed.collective`, so a rank
that never arrives makes the others raise
:class:`~ckpt.errors.CollectiveTimeoutError` after ``collective_timeout`` seconds.

What rank 0 does: it alone opens the run directory (cleans leftovers, rewrites a stale
index), holds the lock, writes the index and applies retention; it broadcasts the
outcome (the committed records, or its error), so no rank returns from ``save()``
before the commit and every rank's ``checkpoints`` match. On resume it picks the
checkpoint (skipping damaged ones) and every rank loads that one; if a concurrent writer
replaced or deleted it before a rank read it, all choose again (:mod:`.collective_restore`).

Two kinds of checkpoint, chosen per save:

- replicated (no ``DTensor`` in any tracked object: DDP, or plain modules): one file,
  written by rank 0 in the single-process format. ``rng`` is rank 0's RNG dict (so
  the file restores in a single process, or with plain ``torch.load``), and
  ``ckpt["rng_per_rank"]`` is the list of every rank's, each rank restoring its own.
- sharded (a ``DTensor`` anywhere: FSDP2, tensor parallel): the directory
  ``ckpt-e<epoch>-s<step>.dcp/`` written by :mod:`ckpt.distributed.sharded`: modules and optimizers
  through DCP, every other tracked object and the plain entries in ``ckpt-meta.pt``
  (same layout as a single file, ``rng_per_rank`` included).

``async_save=True`` has no effect with a process group: saves are synchronous (a
warning says so once). Both kinds need every rank's part before the commit, and
replying to ``save()`` only after rank 0's commit is what lets every rank see it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from .. import record, schema, state
from ..catalog import sharddir
from ..catalog.commit import check_new
from ..distributed import agreement
from ..distributed import collective as cl
from ..errors import CollectiveError
from ..record import CheckpointRecord
from ..storage.local import TMP_PREFIX
from . import saving
from .base import ManagerView, flush, release
from .collective_restore import Outcome, Restoring, records_of, split

if TYPE_CHECKING:
    from ..catalog import Catalog



class CollectiveEngine(Restoring):
    """One rank's side of the collective protocol (see the module docstring); an
    :class:`~ckpt.engine.base.Engine`."""

    def __init__(self, ctx: cl.Group, timeout: float) -> None:
        self.ctx = ctx
        self.timeout = timeout
        self.broken = False  # a collective step raised (so on every rank): close() skips its barrier
        self._read_by_leader: tuple[str, dict[str, Any]] | None = None  # rank 0: the dict it just read to check it
        self._foreign: tuple[CheckpointRecord, dict[str, Any]] | None = None  # rank 0: the same, by path

    @classmethod
    def create(cls, timeout: float | None) -> CollectiveEngine:
        """Collective: builds ckpt's gloo group (every rank, at manager construction).
        ``timeout=None``: the process group's own timeout plus a margin."""
        seconds = cl.default_timeout() if timeout is None else timeout
        return cls(cl.context(timeout=max(seconds, 1.0)), seconds)

    @classmethod
    def single(cls, timeout: float | None) -> CollectiveEngine:
        """The engine of one process without a process group, to read a sharded checkpoint."""
        return cls(cl.Group(), timeout or 600.0)

    # -- the collectives, failing every rank together --------------------------------

    def _broadcast(self, what: str, outcome: Outcome | None, error: BaseException | None) -> Outcome:
        """Rank 0's outcome on every rank; rank 0 re-raises its own error, the others a
        :class:`CollectiveError` quoting it."""
        got = self._collective(cl.broadcast_object, self.ctx, outcome, timeout=self.timeout, what=what)
        if error is not None:
            raise error
        if got[0] == "err":
            raise CollectiveError(f"{what} failed on rank 0: {got[1]}",
                                  hint="rank 0's own error (and traceback) is in its log")
        return got  # type: ignore[no-any-return]

    def _collective(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn``, a collective step; if it raises, it raises on every rank, whatever each
        raises: a failure is agreed (the failing rank re-raises its own error, the others
        a :class:`CollectiveError`) and a timeout is one verdict for all. So every rank
        marks itself broken alike, and every rank skips close()'s barrier: none waits there
        for a rank that does not come."""
        try:
            return fn(*args, **kwargs)
        except BaseException:
            self.broken = True
            raise

    def agree_signal(self, received: int | None) -> int | None:
        """Collective: the preemption signal of the lowest rank that received one (None:
        no rank did), so should_save()/save_if_preempted() answer alike on every rank."""
        got = self._collective(cl.sync, self.ctx, "should_save()/save_if_preempted() (preemption check)",
                               timeout=self.timeout, payload=received)
        return next((s for s in got if s is not None), None)

    def barrier(self, what: str) -> None:
        self._collective(cl.sync, self.ctx, what, timeout=self.timeout)

    def settle(self) -> None:
        """Nothing in flight: a collective save returns once committed."""

    def wait(self, mgr: ManagerView) -> None:
        """Collective: this rank's uploads (a tiered store) flushed, then every rank's."""
        flush(mgr.catalog.store)
        self.barrier("wait()")

    def close(self, mgr: ManagerView) -> None:
        """Collective (unless broken): uploads flushed, every rank arrived; then frees the
        gloo group and heartbeat, even if the barrier raised, and releases the directory."""
        try:
            flush(mgr.catalog.store)
            if not self.broken:
                self.barrier("close()")
        finally:
            self.ctx.close()
            release(mgr.catalog.store)  # even when a flush or the barrier failed

    # -- opening ---------------------------------------------------------------------

    def open(self, catalog: Catalog) -> None:
        """Rank 0 opens the directory (cleaning leftovers); every rank's catalog gets its records."""
        outcome: Outcome | None = None
        error: BaseException | None = None
        if self.ctx.is_leader:
            try:
                outcome = ("ok", [r.to_json() for r in catalog.open()], None)
            except Exception as e:  # noqa: BLE001 - every failure must reach the others
                error, outcome = e, ("err", f"{type(e).__name__}: {e}", None)
        got = self._broadcast("CheckpointManager()", outcome, error)
        if not self.ctx.is_leader:
            catalog.adopt(records_of(catalog, got[1]))

    # -- saving ----------------------------------------------------------------------

    def save(self, mgr: ManagerView, epoch: int | None, step: int | None, *,
             metrics: Mapping[str, Any] | None, extra: Mapping[str, Any] | None,
             mid_epoch: bool, overwrite: bool) -> CheckpointRecord:
        ctx = self.ctx
        error: BaseException | None = None
        payload: Any = None
        try:
            args = saving.checked(mgr, epoch, step, metrics, extra, mid_epoch, overwrite)
            sharded = cl.has_dtensor(list(mgr.trackables.values()))
            payload = (agreement.call(args[0], args[1], args[2], sharded, mgr.policy, args[4]), state.capture_rng())
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error = e
        report = None if error is None else f"{type(error).__name__}: {error}"
        posts = self._collective(cl.sync, ctx, "save()", timeout=self.timeout, payload=(report, payload))
        failed = [f"rank {r}: {msg}" for r, (msg, _) in enumerate(posts) if msg is not None]
        if error is not None:
            raise error
        if failed:
            raise CollectiveError(f"save() failed on {'; '.join(failed)}", hint="see that rank's log")
        differ = agreement.disagreement([p[0] for _, p in posts])
        if differ is not None:
            self.broken = True
            raise differ
        epoch_, step_, mid = args[0], args[1], args[2]
        metric_values, extra_ = args[4], args[5]
        rngs = [p[1] for _, p in posts]
        save = self._save_sharded if payload[0].sharded else self._save_replicated
        rec = save(mgr, epoch_, step_, mid, metric_values, extra_, rngs, overwrite)
        mgr.epoch, mgr.step = epoch_, step_
        return rec

    def _save_replicated(self, mgr: ManagerView, epoch: int, step: int, mid_epoch: bool,
                         metrics: dict[str, float], extra: dict[str, Any], rngs: list[Any],
                         overwrite: bool) -> CheckpointRecord:
        outcome: Outcome | None = None
        error: BaseException | None = None
        if self.ctx.is_leader:
            try:
                checkpoint = saving.build(mgr, state.capture(mgr.trackables), epoch, step, mid_epoch, metrics, extra,
                                          rngs)
                rec = saving.commit(mgr, checkpoint, overwrite)
                outcome = ("ok", rec.to_json(), [r.to_json() for r in mgr.records])
            except Exception as e:  # noqa: BLE001 - every failure must reach the others
                error, outcome = e, ("err", f"{type(e).__name__}: {e}", None)
        got = self._broadcast(f"save() of epoch {epoch}, step {step} (commit)", outcome, error)
        return self._adopt(mgr, got)

    def _save_sharded(self, mgr: ManagerView, epoch: int, step: int, mid_epoch: bool,
                      metrics: dict[str, float], extra: dict[str, Any], rngs: list[Any],
                      overwrite: bool) -> CheckpointRecord:
        from ..distributed.sharded import save_into

        ctx, store = self.ctx, mgr.catalog.store
        name = schema.dir_name(epoch, step)
        tmp = f"{TMP_PREFIX}shard-{name}"  # the same on every rank: each writes its shards there
        dcp_states, plain = split(mgr.trackables)
        with ExitStack() as held:
            error: BaseException | None = None
            meta: dict[str, Any] = {}
            records: list[CheckpointRecord] = []
            replacing: sharddir.Overwrite | None = None  # rank 0: what it replaces stays until the commit
            if ctx.is_leader:  # the lock, for the whole save: no other writer, no cleanup of our tmp
                try:
                    held.enter_context(store.lock())
                    records = mgr.catalog.scan(locked=True).records
                    existing = check_new((epoch, step), mid_epoch, overwrite, records)
                    checkpoint = saving.build(mgr, state.capture(plain), epoch, step, mid_epoch, metrics, extra, rngs)
                    meta = checkpoint.obj
                    meta["ckpt"]["objects"] = list(mgr.trackables)
                    meta["ckpt"]["sharded"] = list(dcp_states)
                    if existing is not None:
                        replacing = sharddir.Overwrite(store, existing.name, name, records)
                        records = replacing.begin()
                except Exception as e:  # noqa: BLE001 - every failure must reach the others
                    error = e
            aside = store.where(replacing.aside) if replacing is not None and replacing.aside else None
            try:
                self._collective(cl.agree, ctx, f"save() of {name} (prepare)", error, timeout=self.timeout)
                manifest = self._collective(save_into, ctx, store, name, tmp, dcp_states, meta,
                                            timeout=self.timeout, aside=aside)
            except BaseException:
                if replacing is not None:
                    replacing.undo()
                raise
            outcome: Outcome | None = None
            if ctx.is_leader:
                try:
                    rec = sharddir.committed(store, name, manifest, meta)
                    kept = saving.retain(mgr, records, rec, None if replacing is None else replacing.done)
                    outcome = ("ok", rec.to_json(), [r.to_json() for r in kept])
                except Exception as e:  # noqa: BLE001
                    if replacing is not None:
                        replacing.undo()
                    error, outcome = e, ("err", f"{type(e).__name__}: {e}", None)
            got = self._broadcast(f"save() of {name} (index)", outcome, error)
        return self._adopt(mgr, got)

    def _adopt(self, mgr: ManagerView, got: Outcome) -> CheckpointRecord:
        """Every rank's catalog holds rank 0's records; the committed record is returned."""
        catalog = mgr.catalog
        if self.ctx.is_leader:
            found: CheckpointRecord = next(r for r in mgr.records if r.name == got[1]["file"])
            return found
        catalog.adopt(records_of(catalog, got[2]))
        return record.from_json(got[1], catalog.store.where(got[1]["file"]), catalog.extra_loader(got[1]["file"]))


def warn_async() -> None:
    warnings.warn("async_save=True has no effect with a process group: every rank's save() returns once "
                  "rank 0 committed the checkpoint", stacklevel=3)
