"""Asynchronous saves under a process group: one save in flight per rank (see
docs/howto/ddp.md and docs/howto/fsdp2.md).

On the training thread, ``save()`` copies what this rank writes into host buffers
(:mod:`ckpt.background.staging`: rank 0's whole state for a replicated checkpoint,
every rank's shards for a sharded one) and captures its RNG state; the engine agrees
on the arguments with every rank (one small collective), starts the rest on this
rank's ``ckpt-writer`` thread (:mod:`ckpt.background.writer`) and returns. On that
thread, over :meth:`~ckpt.distributed.collective.Group.background` (calls named after
the save's sequence number, so they never meet the training thread's collectives: a
preemption check, a resume), every rank posts its RNG state -- which also says it is
there -- then writes its part; rank 0 commits through the catalog's one
commit-and-retention transaction only after every rank's part is durable, and
broadcasts the outcome. So every rank's thread ends alike: the same committed records,
or an error on every rank (a rank that died: :class:`~ckpt.errors.RankLostError` or
:class:`~ckpt.errors.CollectiveTimeoutError`, bounded by ``collective_timeout``).
The next ``save()``, ``wait()`` or ``close()`` raises it, on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch

from .. import record, schema, state
from .._version import __version__
from ..background.writer import AsyncWriter
from ..distributed import collective as cl
from ..record import CheckpointRecord
from . import saving, shardsave
from .base import ManagerView, Outcome, announce, failure, received
from .collective_restore import split

if TYPE_CHECKING:
    from ..distributed.sharded import Captured
    from .saving import SaveArgs

Adopt = Callable[[ManagerView, Outcome], CheckpointRecord]


class Job(NamedTuple):
    """One staged save, ready for the writer thread."""

    what: str  #: the same on every rank: names the background collectives
    args: SaveArgs
    rng: dict[str, Any]  #: this rank's RNG state at save()
    pending: CheckpointRecord  #: what save() returns (no size or checksum yet)
    checkpoint: schema.Checkpoint | None = None  #: replicated, rank 0: the staged checkpoint
    shards: Captured | None = None  #: sharded: this rank's staged DCP state dicts
    meta: dict[str, Any] | None = None  #: sharded, rank 0: the staged plain entries


class Saves:
    """This rank's background saves under a process group: at most one in flight."""

    def __init__(self, ctx: cl.Group, timeout: float, where: str, adopt: Adopt) -> None:
        self.group = ctx
        self.ctx = ctx.background("async")  # each save's: its own calls (see _rngs)
        self.timeout = timeout
        self.writer = AsyncWriter(where)
        self.adopt = adopt  # every rank's records become rank 0's; the committed record
        self.seq = 0  # saves started, the same count on every rank

    def ready(self) -> None:
        """The save in flight committed (on every rank), or its error raised."""
        self.writer.ready()

    def join(self) -> None:
        self.writer.join()  # its error waits for ready()/wait()

    def wait(self) -> None:
        self.writer.wait()

    def close(self) -> None:
        self.writer.close()  # the save in flight finished (its error raised), the buffers freed

    # -- the training thread ---------------------------------------------------------

    def stage(self, mgr: ManagerView, args: SaveArgs, sharded: bool) -> Job:
        """This save's job: what this rank writes copied into host buffers (replicated:
        rank 0's checkpoint; sharded: every rank's shards), and its RNG state."""
        rng = state.capture_rng()
        what = f"the background save() of epoch {args.epoch}, step {args.step}"
        if sharded:
            return self._stage_sharded(mgr, args, rng, what)
        if self.ctx.is_leader:
            checkpoint = saving.build(mgr, state.capture(mgr.trackables), args.epoch, args.step, args.mid_epoch,
                                      args.metrics, args.extra, [rng])
            staged, pending = self.writer.stage(checkpoint, mgr.catalog.store.where(checkpoint.name))
            return Job(what, args, rng, pending, checkpoint=staged)
        return Job(what, args, rng, _pending(mgr, args, schema.file_name(args.epoch, args.step)))

    def _stage_sharded(self, mgr: ManagerView, args: SaveArgs, rng: dict[str, Any], what: str) -> Job:
        from ..distributed.sharded import Captured, capture

        dcp_states, plain = split(mgr.trackables)
        captured = capture(dcp_states)
        meta = shardsave.plain_entries(mgr, args, plain, dcp_states, [rng]) if self.ctx.is_leader else None
        staged = self.writer.stager.stage({"state": _local(captured.state), "meta": meta})
        shards = Captured(captured.kinds, _resharded(staged["state"], captured.state))
        return Job(what, args, rng, _pending(mgr, args, schema.dir_name(args.epoch, args.step)), shards=shards,
                   meta=staged["meta"])

    def start(self, mgr: ManagerView, job: Job) -> CheckpointRecord:
        """Every rank: the rest of ``job`` on the writer thread; its pending record."""
        seq, self.seq = self.seq, self.seq + 1
        work = self._replicated if job.shards is None else self._sharded
        self.writer.start(job.what, lambda: work(mgr, job, seq))
        return job.pending

    # -- the writer thread -----------------------------------------------------------

    def _rngs(self, job: Job, seq: int) -> list[Any]:
        """Every rank's RNG state: the first collective of save ``seq``, so every rank is there."""
        self.ctx = self.group.background(f"async{seq}", after=self.ctx)
        return cl.sync(self.ctx, f"{job.what} (RNG states)", timeout=self.timeout, payload=job.rng)

    def _replicated(self, mgr: ManagerView, job: Job, seq: int) -> None:
        rngs = self._rngs(job, seq)
        ctx = self.ctx
        outcome: Outcome | None = None
        error: BaseException | None = None
        if ctx.is_leader:  # every rank is here: its part (its RNG state) is in rank 0's hands
            assert job.checkpoint is not None
            try:
                job.checkpoint.obj["ckpt"]["rng_per_rank"] = rngs
                rec = saving.commit(mgr, job.checkpoint, job.args.overwrite)
                outcome = ("ok", rec.to_json(), [r.to_json() for r in mgr.records])
            except Exception as e:  # noqa: BLE001 - every failure must reach the others
                error, outcome = e, failure(e)
        what = f"{job.what} (commit)"
        got = announce(what, lambda: cl.broadcast_object(ctx, outcome, timeout=self.timeout, what=what), outcome,
                       error, mgr.catalog.store.where, (job.args.epoch, job.args.step))
        self.adopt(mgr, received(what, got, error))

    def _sharded(self, mgr: ManagerView, job: Job, seq: int) -> None:
        rngs = self._rngs(job, seq)
        assert job.shards is not None

        def meta() -> dict[str, Any]:
            assert job.meta is not None  # rank 0
            job.meta["ckpt"]["rng_per_rank"] = rngs
            return job.meta

        self.adopt(mgr, shardsave.save(self.ctx, mgr, job.args, job.shards, meta, timeout=self.timeout,
                                       guard=_call))


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def _pending(mgr: ManagerView, args: SaveArgs, name: str) -> CheckpointRecord:
    """The record save() returns for ``name`` before it is committed (size 0, no checksum)."""
    header = schema.build({}, epoch=args.epoch, step=args.step, mid_epoch=args.mid_epoch, metrics=args.metrics,
                          rng={}, extra={}, library_version=__version__).header
    return record.make(header, mgr.catalog.store.where(name), size=0, checksum=None, extra=dict(args.extra))


def _local(obj: Any) -> Any:
    """``obj`` with every ``DTensor`` replaced by its local tensor (this rank's shard), to stage."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        with torch.no_grad():
            return obj.to_local()
    if isinstance(obj, Mapping):
        return {k: _local(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_local(v) for v in obj]
    return obj


def _resharded(staged: Any, like: Any) -> Any:
    """The staged copy of :func:`_local`'s result, with ``like``'s DTensors put back
    around their staged local tensors (same mesh, placements, global shape and stride)."""
    from torch.distributed.tensor import DTensor

    if isinstance(like, DTensor):
        return DTensor.from_local(staged, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                  stride=like.stride())
    if isinstance(like, Mapping):
        return {k: _resharded(staged[k], v) for k, v in like.items()}
    if isinstance(like, list):
        return [_resharded(s, v) for s, v in zip(staged, like)]
    return staged
