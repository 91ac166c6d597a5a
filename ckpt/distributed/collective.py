"""Collective primitives for ckpt under ``torch.distributed``: bounded, typed, backend-free.

With a default process group of more than one rank, ckpt's ``save``/``resume``/...
are collective. The functions here are what they are built from; each one, given an
active :class:`Group`, must be called by every rank, in the same order.

How the bounded collective works (:func:`sync`): it runs over the process group's
rendezvous store (a TCPStore, the same one ``init_process_group`` and torchrun use),
not over a backend collective. Call ``n`` of a rank sets key ``n/<rank>`` to the
operation's name, then waits for every rank's key with ``Store.wait(keys, timeout)``.
The outcome is decided once, by ``compare_set`` on ``n/verdict``: the first rank to
see every key writes ``ok``, the first to time out writes ``timeout``; every rank then
follows that verdict, so either all ranks proceed or all raise -- including a rank
that arrives after the others gave up. On a timeout every rank can list who arrived
(which keys exist). Payloads travel as separate keys, read only by the ranks that need
them, and each rank deletes its keys of call ``n - 1`` once all ranks reached call
``n`` (by then nobody reads them). Why not ``all_gather_object`` or
``monitored_barrier``: the first blocks for the group's timeout (30 min by default)
and names nobody; the second is gloo-only and only rank 0 learns who is missing. The
store works the same under NCCL, and a timed-out call leaves nothing out of step.

``torch.distributed.checkpoint`` needs real collectives (to plan who writes what);
:func:`context` gives it a dedicated gloo group (``Group.control``) created with a
timeout, so sharded saves stay bounded and run beside NCCL training. After a DCP
collective timed out that group may be out of step: stop the run, as torchrun would.
"""

from __future__ import annotations

import contextlib
import itertools
import pickle
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

import torch.distributed as dist

from ..errors import CkptError, CollectiveError, CollectiveTimeoutError, ConfigError, RankLostError, to_wire
from .failures import ORDER_HINT, first_failure, lost_error, timeout_error

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Store

RngState = dict[str, Any]
__all__ = ["CollectiveError", "CollectiveTimeoutError", "Group", "RankLostError", "agree", "broadcast_object",
           "context", "default_timeout", "gather_rng", "rng_for_rank", "scatter_rng", "sync"]
#: Seconds between a rank's heartbeats, and without one after which a missing rank counts as lost.
HEARTBEAT_S = 1.0
LOST_AFTER_S = 15.0
#: Seconds a collective waits beyond the process group's own timeout, by default.
MARGIN_S = 5.0
_SLICE_S = 5.0  # a waiting rank looks for lost ranks this often


class _Channel:
    """The mutable half of a :class:`Group`: the store, the call counter, keys to delete,
    and this rank's heartbeat (a counter in the store that a thread bumps every second,
    so that a rank waiting for another can tell "slow" from "gone")."""

    def __init__(self, store: Store, rank: int, *, beat: bool = True) -> None:
        self.store = store
        self.calls: Iterator[int | str] = itertools.count()
        self.garbage: list[str] = []  # this rank's keys of the previous call
        self.seen: dict[int, tuple[int, float]] = {}  # rank -> (its last heartbeat, when it changed)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(f"hb/{rank}",), name="ckpt-heartbeat",
                                      daemon=True) if beat else None  # beat=False: another channel beats
        if self._beat is not None:
            self._beat.start()

    def _heartbeat(self, key: str) -> None:
        while True:
            try:
                self.store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store is gone: the others will see it as lost
                return
            if self._stop.wait(HEARTBEAT_S):
                return

    def lost(self, ranks: Sequence[int]) -> list[int]:
        """Those of ``ranks`` whose heartbeat has not moved for :data:`LOST_AFTER_S` seconds."""
        now, gone = time.monotonic(), []
        for r in ranks:
            beat = self.store.add(f"hb/{r}", 0)
            last = self.seen.get(r)
            if last is None or last[0] != beat:
                self.seen[r] = (beat, now)
            elif now - last[1] > LOST_AFTER_S:
                gone.append(r)
        return gone

    def close(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=10)


@dataclass(frozen=True)
class Group:
    """Who this process is among the ranks that checkpoint together.

    ``control`` is the gloo group ckpt passes to ``torch.distributed.checkpoint``;
    ``None`` when inactive (no process group, or a single rank).
    """

    rank: int = 0
    world_size: int = 1
    control: dist.ProcessGroup | None = field(default=None, repr=False, compare=False)
    _channel: _Channel | None = field(default=None, repr=False, compare=False)

    @property
    def active(self) -> bool:
        """A default process group is initialised and has more than one rank."""
        return self._channel is not None and self.world_size > 1

    @property
    def is_leader(self) -> bool:
        """Rank 0: the rank that commits, indexes and applies retention."""
        return self.rank == 0

    @property
    def store(self) -> Store | None:
        """The rendezvous store (background uploads mark their progress in it); None when inactive."""
        return self._channel.store if self._channel is not None else None

    def background(self, name: str, after: Group | None = None) -> Group:
        """These ranks, store, heartbeats and gloo group; calls of their own, ``<name>.0``, ...
        (a background save's, named alike on every rank); ``after``: the previous one (its last keys go)."""
        if self._channel is None:
            return self
        channel = _Channel(self._channel.store, self.rank, beat=False)
        channel.calls = (f"{name}.{n}" for n in itertools.count())
        channel.garbage = after._channel.garbage if after is not None and after._channel is not None else []
        return Group(self.rank, self.world_size, self.control, channel)

    def close(self) -> None:
        """Stop the heartbeat and destroy the gloo group (local: no rank waits for another)."""
        if self._channel is not None:
            self._channel.close()
        if self.control is not None and dist.is_initialized():
            with contextlib.suppress(Exception):  # already destroyed with the default group
                dist.destroy_process_group(self.control)


def default_timeout() -> float:
    """The default process group's own timeout plus ``MARGIN_S``: how long a ckpt
    collective waits by default (the group's timeout is the store's, which
    ``init_process_group(timeout=...)`` sets)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 600.0
    try:
        own = float(dist.distributed_c10d._get_default_store().timeout.total_seconds())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a store without a timeout: torch's default for gloo
        own = float(dist.default_pg_timeout.total_seconds())
    return own + MARGIN_S


def context(*, timeout: float = 1800.0) -> Group:
    """The :class:`Group` of this process; collective when a process group has 2+ ranks.

    Creates the gloo ``control`` group (with ``timeout`` seconds for its collectives,
    which bound the coordination inside ``torch.distributed.checkpoint``), so call it
    once, on every rank, e.g. when the manager is built. Without ``torch.distributed``
    or an initialised default group it returns a single-process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return Group()
    _check_timeout(timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size == 1:
        return Group(rank=rank, world_size=1)
    if not dist.is_gloo_available():
        raise ConfigError("ckpt's distributed checkpoints need the gloo backend, which this torch build lacks",
                          hint="install a torch build with gloo (every official build has it)")
    try:
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    except dist.DistError as e:
        raise CollectiveTimeoutError(f"creating ckpt's process group failed on rank {rank}: {e}",
                                     hint=ORDER_HINT) from e
    if control is None:  # not a member: cannot happen for a group of every rank
        raise ConfigError("this rank is not part of the default process group")
    from torch._C._distributed_c10d import PrefixStore

    store = PrefixStore(f"ckpt/{control.group_name}/", dist.distributed_c10d._get_default_store())
    return Group(rank=rank, world_size=world_size, control=control, _channel=_Channel(store, rank))


def _check_timeout(timeout: float) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}",
                          hint="pass timeout=600, for example")


def _rendezvous(ctx: Group, what: str, timeout: float, posts: Mapping[str, Any],
                fetch: Sequence[str], source: int | None = None) -> list[Any]:
    """Post ``posts`` (key suffix -> object), wait for every rank, return the ``fetch`` objects.
    ``source``: the rank that posts the one ``fetch`` object (a broadcast), see :func:`_sent`."""
    _check_timeout(timeout)
    channel = ctx._channel
    assert channel is not None  # callers check ctx.active
    store, call = channel.store, next(channel.calls)
    deadline = time.monotonic() + timeout
    arrivals = [f"{call}/{r}" for r in range(ctx.world_size)]
    mine = [f"{call}/{name}" for name in posts]
    # deleted once every rank reached the next call: by then nobody reads them, the verdict included
    posted = mine + [arrivals[ctx.rank]] + ([f"{call}/verdict"] if ctx.is_leader else [])
    try:
        for key, obj in zip(mine, posts.values()):
            store.set(key, pickle.dumps(obj))  # type: ignore[arg-type]  # takes bytes too
        store.set(arrivals[ctx.rank], what)  # after the payloads: arrival means they are there
        outcome = _wait(channel, arrivals, f"{call}/verdict", deadline, timeout)
        verdict = store.compare_set(f"{call}/verdict", "", outcome).decode()
        if verdict != "ok":
            channel.garbage += posted
            arrived = [r for r, key in enumerate(arrivals) if store.check([key])]
            if verdict.startswith("lost"):
                lost = lost_error(ctx.rank, what, verdict, arrived, LOST_AFTER_S)
                if source is not None and source != ctx.rank and source not in lost.lost:
                    lost.sent = _sent(channel, arrivals[source], f"{call}/{fetch[0]}", source, deadline)
                raise lost
            if outcome == "ok":  # this rank came late: every key is there, the others gave up
                theirs = {n.decode() for r, n in enumerate(store.multi_get(arrivals)) if r != ctx.rank}
                raise CollectiveTimeoutError(
                    f"rank {ctx.rank} reached {what} after the other ranks had given up waiting for it at "
                    f"{' / '.join(sorted(theirs))} ({verdict.split()[-1]} s)", hint=ORDER_HINT)
            raise timeout_error(ctx.rank, ctx.world_size, what, timeout, arrived)
        names = [b.decode() for b in store.multi_get(arrivals)]
        values = [pickle.loads(b) for b in store.multi_get([f"{call}/{name}" for name in fetch])] if fetch else []
        for key in channel.garbage:
            store.delete_key(key)
        channel.garbage = posted
    except dist.DistError as e:
        raise CollectiveError(f"{what}: rank {ctx.rank} lost contact with the rendezvous store: {e}",
                              hint="the process hosting the store (torchrun's agent, or rank 0) exited; "
                                   "see the other ranks' logs") from e
    if len(set(names)) > 1:
        calls = ", ".join(f"rank {r}: {n}" for r, n in enumerate(names))
        raise CollectiveError(f"ranks reached different ckpt operations ({calls})", hint=ORDER_HINT)
    return values


def _wait(channel: _Channel, arrivals: list[str], verdict: str, deadline: float, timeout: float) -> str:
    """Wait for every key of ``arrivals`` until ``deadline``: ``"ok"``, ``"timeout <s>"``, or
    ``"lost <ranks>"`` when a missing rank's heartbeat stopped; stops early once another rank decided."""
    store = channel.store
    while True:
        left = deadline - time.monotonic()
        try:
            store.wait(arrivals, timedelta(seconds=max(0.001, min(_SLICE_S, left))))
            return "ok"
        except dist.DistStoreError:
            pass
        if store.check([verdict]) or left <= _SLICE_S:  # decided elsewhere (compare_set reads it), or late
            return f"timeout {timeout:g}"
        missing = [r for r, key in enumerate(arrivals) if not store.check([key])]
        lost = channel.lost(missing)
        if lost:
            return "lost " + ",".join(map(str, lost))


def _sent(channel: _Channel, arrival: str, key: str, source: int, deadline: float) -> Any:
    """What the broadcast's ``source`` posted under ``key``, for a rank that gave up on a lost
    rank while ``source`` lives; None when ``source`` does not arrive by ``deadline`` (the
    collective's own) or its heartbeat stops too.

    Why: with 3+ ranks, a survivor must learn rank 0's commit outcome although the
    broadcast failed (:func:`ckpt.engine.base.announce`). It needs nothing of the lost
    rank: ``source`` posts its payload before its arrival key, and its keys of a failed
    call are never deleted (deletion waits for a call every rank completes). The store,
    not a marker file, because every rank reaches it (an object store or node-local
    disks share no directory), and a failed wait is bounded like the collective itself."""
    store = channel.store
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                store.wait([arrival], timedelta(seconds=max(0.001, min(_SLICE_S, left))))
                return pickle.loads(store.get(key))
            except dist.DistStoreError:
                if channel.lost([source]):
                    return None
    except dist.DistError:  # the store is gone: nothing more to learn
        pass
    return None


def sync(ctx: Group, what: str, *, timeout: float, payload: Any = None) -> list[Any]:
    """Barrier and all-gather of a small picklable ``payload``: entry ``r`` is rank ``r``'s.

    Raises :class:`CollectiveTimeoutError` on every rank when a rank does not arrive
    within ``timeout`` seconds, and :class:`CollectiveError` when ranks pass different
    ``what`` (they called different operations). Inactive: returns ``[payload]``.
    """
    if not ctx.active:
        _check_timeout(timeout)
        return [payload]
    return _rendezvous(ctx, what, timeout, {f"p{ctx.rank}": payload},
                       [f"p{r}" for r in range(ctx.world_size)])


def agree(ctx: Group, what: str, error: BaseException | None, *, timeout: float) -> None:
    """Tell every rank whether this rank's part of ``what`` failed; raise on every rank if any did.

    Every rank raises the lowest failing rank's error: that rank its own ``error`` (after
    the others were told), the others the same ckpt error class with ``rank`` set
    (:mod:`.failures`), so no rank reports success, or hangs, when another could not finish.
    """
    agree_or_retry(ctx, what, error, retry=False, timeout=timeout)


def agree_or_retry(ctx: Group, what: str, error: BaseException | None, *, retry: bool, timeout: float) -> bool:
    """:func:`agree`, except that a failure every failing rank marks ``retry`` is not
    raised: True on every rank then (do ``what`` again, all together); False when every
    rank succeeded. Any other failure raises on every rank, as :func:`agree` does."""
    report = None if error is None else (retry, to_wire(error))
    try:
        reports = sync(ctx, what, timeout=timeout, payload=report)
    except RankLostError as lost:  # names the rank that is gone; this rank's own error is the cause
        raise lost from error
    except CkptError:
        if error is not None:
            raise error
        raise
    failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if failed and all(again for _, (again, _) in failed):
        return True
    first_failure(ctx.rank, what, error, [(r, wire) for r, (_, wire) in failed])
    return False


def broadcast_object(ctx: Group, obj: Any, src: int = 0, *, timeout: float, what: str = "broadcast") -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable); bounded like :func:`sync`."""
    if not 0 <= src < ctx.world_size:
        raise ConfigError(f"src must be a rank in [0, {ctx.world_size}), got {src!r}")
    if not ctx.active:
        _check_timeout(timeout)
        return obj
    return _rendezvous(ctx, what, timeout, {"b": obj} if ctx.rank == src else {}, ["b"], source=src)[0]


def gather_rng(ctx: Group, local_rng: RngState, *, timeout: float) -> list[RngState] | None:
    """Every rank's RNG state, in rank order, on rank 0 (which saves them); ``None`` elsewhere."""
    if not ctx.active:
        _check_timeout(timeout)
        return [local_rng]
    fetch = [f"p{r}" for r in range(ctx.world_size)] if ctx.is_leader else []
    rngs = _rendezvous(ctx, "gather_rng", timeout, {f"p{ctx.rank}": local_rng}, fetch)
    return rngs if ctx.is_leader else None


def rng_for_rank(ctx: Group, saved: Sequence[RngState] | RngState) -> RngState | None:
    """This rank's entry of a saved RNG list (every rank read the checkpoint itself).

    Saved at another world size, rank ``r`` still takes entry ``r`` when there is one
    and gets ``None`` (keep its own, freshly seeded state) otherwise; entries of ranks
    that no longer exist are dropped. Sharing one saved stream between two ranks would
    give them identical dropout masks and augmentations, so no entry is reused. A plain
    dict (a single-process checkpoint) counts as a list of one. Rank 0 warns once.
    """
    entries = [saved] if isinstance(saved, Mapping) else list(saved)
    if len(entries) != ctx.world_size and ctx.is_leader:
        kept = min(len(entries), ctx.world_size)
        rest = (f"ranks {kept}..{ctx.world_size - 1} keep their current RNG state" if ctx.world_size > kept
                else f"the states of saved ranks {kept}..{len(entries) - 1} are dropped")
        warnings.warn(f"the checkpoint has RNG states of {len(entries)} ranks, this run has {ctx.world_size}: "
                      f"ranks 0..{kept - 1} restore their own, {rest}", stacklevel=2)
    return dict(entries[ctx.rank]) if ctx.rank < len(entries) else None


def scatter_rng(ctx: Group, saved: Sequence[RngState] | RngState | None, *,
                timeout: float) -> RngState | None:
    """Like :func:`rng_for_rank`, but only rank 0 has ``saved`` (it read the checkpoint):
    each rank receives its own entry, not the whole list. Others pass ``None``."""
    if not ctx.active:
        _check_timeout(timeout)
        return None if saved is None else rng_for_rank(ctx, saved)
    posts: dict[str, Any] = {}
    if ctx.is_leader:
        if saved is None:
            raise ConfigError("scatter_rng() needs the saved RNG states on rank 0")
        entries = [saved] if isinstance(saved, Mapping) else list(saved)
        rng_for_rank(ctx, entries)  # the warning
        posts = {f"s{r}": dict(entries[r]) if r < len(entries) else None for r in range(ctx.world_size)}
    return cast(RngState | None, _rendezvous(ctx, "scatter_rng", timeout, posts, [f"s{ctx.rank}"])[0])
