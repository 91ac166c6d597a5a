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

A synchronous ``save()`` returns on every rank once rank 0 committed, so every rank
sees the commit. With ``async_save=True`` it returns once this rank's part is staged in
host buffers; the write and the commit, the same as above, run on a background thread
(:mod:`.collective_async`); ``wait()`` and ``close()`` return on every rank once the
save in flight is committed everywhere, or raise its error on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import record, state
from ..distributed import agreement, dtensors, nodecache
from ..distributed import collective as cl
from ..distributed.failures import first_failure
from ..errors import to_wire
from ..record import CheckpointRecord
from ..storage.base import capabilities
from . import saving, shardsave
from .base import ManagerView, Outcome, announce, failure, flush, received, release
from .collective_async import Saves
from .collective_restore import Restoring, records_of, split

if TYPE_CHECKING:
    from ..catalog import Catalog



class CollectiveEngine(Restoring):
    """One rank's side of the collective protocol (see the module docstring); an
    :class:`~ckpt.engine.base.Engine`."""

    def __init__(self, ctx: cl.Group, timeout: float, async_in: str | None = None) -> None:
        self.ctx = ctx
        self.timeout = timeout
        #: async_save: the saves in flight (``async_in``: the run directory, for the writer's messages)
        self.saves = None if async_in is None else Saves(ctx, timeout, async_in, self._adopt)
        self.broken = False  # a collective step raised (so on every rank): close() skips its barrier
        self._read_by_leader: tuple[str, dict[str, Any]] | None = None  # rank 0: the dict it just read to check it
        self._foreign: tuple[CheckpointRecord, dict[str, Any]] | None = None  # rank 0: the same, by path
        self._held = None  # rank 0: a sharded checkpoint's small files, read to choose it
        self._damaged = {}  # rank 0, in resume(): sharded checkpoints that failed to load

    @classmethod
    def create(cls, timeout: float | None, async_in: str | None = None) -> CollectiveEngine:
        """Collective: builds ckpt's gloo group (every rank, at manager construction).
        ``timeout=None``: the process group's own timeout plus a margin; ``async_in``:
        saves are asynchronous, in that run directory."""
        seconds = cl.default_timeout() if timeout is None else timeout
        return cls(cl.context(timeout=max(seconds, 1.0)), seconds, async_in)

    @classmethod
    def single(cls, timeout: float | None) -> CollectiveEngine:
        """The engine of one process without a process group, to read a sharded checkpoint."""
        return cls(cl.Group(), timeout or 600.0)

    # -- the collectives, failing every rank together --------------------------------

    def _broadcast(self, what: str, outcome: Outcome | None, error: BaseException | None) -> Outcome:
        """Rank 0's outcome on every rank; rank 0 re-raises its own error, the others the
        same ckpt error class (:func:`~ckpt.engine.base.received`)."""
        return received(what, self._collective(cl.broadcast_object, self.ctx, outcome, timeout=self.timeout,
                                               what=what), error)

    def _collective(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn``, a collective step; if it raises, it raises on every rank, whatever each
        raises: a failure is agreed (every rank raises the lowest failing rank's error:
        :mod:`ckpt.distributed.failures`) and a timeout is one verdict for all. So every rank
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
        """This rank's save in flight finished (its error waits for save()/wait())."""
        if self.saves is not None:
            self.saves.join()

    def wait(self, mgr: ManagerView) -> None:
        """Collective: the save in flight committed on every rank (or its error raised on
        every rank), this rank's uploads (a tiered store) flushed, then every rank's."""
        if self.saves is not None:
            self._collective(self.saves.wait)
        flush(mgr.catalog.store)
        self.barrier("wait()")

    def close(self, mgr: ManagerView) -> None:
        """Collective (unless broken): :meth:`wait`'s work; then frees the gloo group and
        heartbeat, even if that raised, and releases the directory."""
        try:
            if self.saves is not None:
                self._collective(self.saves.close)
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
        cached = capabilities(catalog.store).cache is not None
        if self.ctx.is_leader:
            try:
                records = catalog.open()
                unsent = nodecache.backlog(catalog.store, records) if cached else []
                outcome = ("ok", [r.to_json() for r in records], unsent)
            except Exception as e:  # noqa: BLE001 - every failure must reach the others
                error, outcome = e, failure(e)
        got = self._broadcast("CheckpointManager()", outcome, error)
        if not self.ctx.is_leader:
            catalog.adopt(records_of(catalog, got[1]))
        if cached:  # each node's own cache: what a killed job left there
            self._collective(nodecache.reopen, self.ctx, catalog.store, catalog.records, got[2], self.timeout)

    # -- saving ----------------------------------------------------------------------

    def save(self, mgr: ManagerView, epoch: int | None, step: int | None, *,
             metrics: Mapping[str, Any] | None, extra: Mapping[str, Any] | None,
             mid_epoch: bool, overwrite: bool) -> CheckpointRecord:
        """Collective; returns once rank 0 committed, or with ``async_save`` once this save
        is staged, agreed and started in the background (:mod:`.collective_async`)."""
        if self.saves is not None:
            self._collective(self.saves.ready)
        error: BaseException | None = None
        payload: Any = None
        job = None
        try:
            args = saving.checked(mgr, epoch, step, metrics, extra, mid_epoch, overwrite)
            sharded = dtensors.has_dtensor(list(mgr.trackables.values()))
            rng = state.capture_rng() if self.saves is None else None  # async: gathered in the background
            payload = (agreement.call(args[0], args[1], args[2], sharded, mgr.policy, args[4], _settings(mgr)), rng)
            if self.saves is not None:
                job = self.saves.stage(mgr, args, sharded)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error = e
        rngs = self._agree_save(error, payload)
        if job is not None and self.saves is not None:
            rec = self.saves.start(mgr, job)
        else:
            save = self._save_sharded if payload[0].sharded else self._save_replicated
            rec = save(mgr, args, rngs)
        mgr.epoch, mgr.step = args[0], args[1]
        return rec

    def _agree_save(self, error: BaseException | None, payload: Any) -> list[Any]:
        """Every rank's save() arguments (and RNG states) agreed, or every rank raises."""
        report = None if error is None else to_wire(error)
        posts = self._collective(cl.sync, self.ctx, "save()", timeout=self.timeout, payload=(report, payload))
        failed = [(r, wire) for r, (wire, _) in enumerate(posts) if wire is not None]
        first_failure(self.ctx.rank, "save()", error, failed)
        differ = agreement.disagreement([p[0] for _, p in posts])
        if differ is not None:
            self.broken = True
            raise differ
        return [p[1] for _, p in posts if p[1] is not None]

    def _save_replicated(self, mgr: ManagerView, args: saving.SaveArgs, rngs: list[Any]) -> CheckpointRecord:
        epoch, step = args.epoch, args.step
        outcome: Outcome | None = None
        error: BaseException | None = None
        if self.ctx.is_leader:
            try:
                checkpoint = saving.build(mgr, state.capture(mgr.trackables), epoch, step, args.mid_epoch,
                                          args.metrics, args.extra, rngs)
                rec = saving.commit(mgr, checkpoint, args.overwrite)
                outcome = ("ok", rec.to_json(), [r.to_json() for r in mgr.records])
            except Exception as e:  # noqa: BLE001 - every failure must reach the others
                error, outcome = e, failure(e)
        what = f"save() of epoch {epoch}, step {step} (commit)"
        got = announce(what, lambda: self._broadcast(what, outcome, error), outcome, error, mgr.catalog.store.where,
                       (epoch, step))
        return self._adopt(mgr, got)

    def _save_sharded(self, mgr: ManagerView, args: saving.SaveArgs, rngs: list[Any]) -> CheckpointRecord:
        dcp_states, plain = split(mgr.trackables)
        got = shardsave.save(self.ctx, mgr, args, dcp_states,
                             lambda: shardsave.plain_entries(mgr, args, plain, dcp_states, rngs),
                             timeout=self.timeout, guard=self._collective)
        return self._adopt(mgr, got)

    def resume(self, mgr: ManagerView) -> int:
        self.settle()  # a save in flight uses the gloo group, and rank 0's catalog
        return super().resume(mgr)

    def restore(self, mgr: ManagerView, which: Any, step: int | None) -> CheckpointRecord:
        self.settle()
        return super().restore(mgr, which, step)

    def _adopt(self, mgr: ManagerView, got: Outcome) -> CheckpointRecord:
        """Every rank's catalog holds rank 0's records; the committed record is returned."""
        catalog = mgr.catalog
        if self.ctx.is_leader:
            found: CheckpointRecord = next(r for r in mgr.records if r.name == got[1]["file"])
            return found
        catalog.adopt(records_of(catalog, got[2]))
        return record.from_json(got[1], catalog.store.where(got[1]["file"]), catalog.extra_loader(got[1]["file"]))



def _settings(mgr: ManagerView) -> agreement.Settings:
    """The options every rank must share (see :mod:`ckpt.distributed.agreement`)."""
    return agreement.settings(async_save=mgr.options.async_save, differential=mgr.options.differential,
                              every_steps=mgr.cadence.every_steps, every_seconds=mgr.cadence.every_seconds,
                              max_overhead=mgr.cadence.max_overhead, directory=mgr.directory.name)
