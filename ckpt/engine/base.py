"""The seam between the manager and the engine that does its work.

:class:`~ckpt.CheckpointManager` holds the options, the tracked objects and the
counters; each ``save``, ``resume``, ``restore``, ``wait`` and ``close`` goes to an
:class:`Engine`: :class:`~ckpt.engine.local.LocalEngine` in one process,
:class:`~ckpt.engine.collective.CollectiveEngine` under a process group. The two are
peers: neither reaches into the manager, both see it through :class:`ManagerView`,
which holds exactly what they read and update of it.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Protocol, Tuple

from ..cadence import Cadence
from ..distributed.failures import committed_anyway
from ..errors import CollectiveTimeoutError, RankLostError, from_wire, to_wire
from ..options import Options
from ..policy import RetentionPolicy
from ..record import CheckpointRecord
from ..storage.base import capabilities

if TYPE_CHECKING:
    from ..catalog import Catalog
    from ..spec import SpecCache

Key = Tuple[int, int]
#: Rank 0's broadcast outcome of a collective step: ("ok", ..., ...) or :func:`failure`'s.
Outcome = Tuple[str, Any, Any]


class ManagerView(Protocol):
    """What an engine reads and updates of its manager (the manager implements it).

    The public attributes are the manager's own (see :class:`~ckpt.CheckpointManager`);
    ``catalog``, ``specs``, ``records`` and ``protected`` are for the engines only; the
    records are the catalog's (read-only here: the catalog changes them as it commits,
    scans, or is told what rank 0 committed).
    """

    epoch: int  #: the counters a save without numbers uses; a save or restore sets them
    step: int
    resumed: Optional[CheckpointRecord]  #: the checkpoint restored last
    cadence: Cadence  #: the save cadence; a restore loads its saved state
    protected: Optional[Key]  #: the checkpoint resumed from: retention keeps it until a newer one

    @property
    def trackables(self) -> Mapping[str, Any]: ...

    @property
    def options(self) -> Options: ...

    @property
    def policy(self) -> RetentionPolicy: ...

    @property
    def directory(self) -> PurePath: ...

    @property
    def url(self) -> str: ...

    @property
    def records(self) -> List[CheckpointRecord]:
        """The committed checkpoints, oldest first (:attr:`ckpt.catalog.Catalog.records`)."""

    @property
    def catalog(self) -> Catalog: ...

    @property
    def specs(self) -> SpecCache: ...

    def refresh(self) -> List[CheckpointRecord]: ...


class Engine(Protocol):
    """What the manager hands its work to; every method but :meth:`settle` is collective
    under a process group (every rank calls it, in the same order)."""

    def open(self, catalog: Catalog) -> None:
        """The catalog opened at construction (leftovers of crashed writers cleaned), its
        records the committed ones (every rank's rank 0's)."""

    def save(self, mgr: ManagerView, epoch: Optional[int], step: Optional[int], *,
             metrics: Optional[Mapping[str, Any]], extra: Optional[Mapping[str, Any]],
             mid_epoch: bool, overwrite: bool) -> CheckpointRecord:
        """One checkpoint of every tracked object (see :meth:`ckpt.CheckpointManager.save`)."""

    def resume(self, mgr: ManagerView) -> int:
        """Restore the newest checkpoint that verifies; the epoch to run next (0: none)."""

    def restore(self, mgr: ManagerView, which: Any, step: Optional[int]) -> CheckpointRecord:
        """Restore the checkpoint ``which`` names."""

    def settle(self) -> None:
        """This process's save in flight committed (or failed: its error waits for save()/wait())."""

    def wait(self, mgr: ManagerView) -> None:
        """Background work committed; the error of a background save that failed raised."""

    def agree_signal(self, received: Optional[int]) -> Optional[int]:
        """The preemption signal every rank acts on (None: none arrived)."""

    def close(self, mgr: ManagerView) -> None:
        """Pending work flushed, the engine's resources freed (also when that raised)."""



def flush(store: Any) -> None:
    """A tiered store's uploads committed (other stores have nothing pending)."""
    flush = capabilities(store).flush
    if flush is not None:
        flush()


def release(store: Any) -> None:
    """A remote run directory's writer claim given up: the next writer may take it now."""
    release = capabilities(store).release
    if release is not None:
        release()


def announce(what: str, broadcast: Callable[[], Outcome], outcome: Optional[Outcome],
             error: Optional[BaseException], where: Callable[[str], Any], key: Key) -> Outcome:
    """``broadcast()`` of rank 0's commit ``outcome`` (``error``: rank 0's, when it failed).
    If a rank is lost or late, every rank that knows the outcome says so: rank 0, and a
    surviving rank that got it anyway (:attr:`ckpt.errors.RankLostError.sent`). Committed: the error
    says the save of ``key`` was committed at ``where(file)``
    (:func:`ckpt.distributed.failures.committed_anyway`); failed: rank 0's error is its cause."""
    try:
        return broadcast()
    except (RankLostError, CollectiveTimeoutError) as e:
        sent = outcome if outcome is not None else getattr(e, "sent", None)
        if sent is not None and sent[0] == "ok":
            raise committed_anyway(e, str(where(sent[1]["file"])), *key) from e
        if sent is not None and sent[0] == "err":
            raise e from (error if error is not None else from_wire(sent[2], 0, what))
        raise


def failure(e: BaseException) -> Outcome:
    """Rank 0's outcome when its part failed with ``e``: ("err", its text, its fields)."""
    return ("err", f"{type(e).__name__}: {e}", to_wire(e))


def received(what: str, got: Outcome, error: Optional[BaseException]) -> Outcome:
    """Rank 0's broadcast ``got``, unless it failed: rank 0 re-raises its own ``error``,
    the others the same ckpt error, rebuilt from its fields and saying it happened on
    rank 0 (any other exception: a :class:`CollectiveError` naming its type)."""
    if error is not None:
        raise error
    if got[0] == "err":
        raise from_wire(got[2], 0, what)
    return got
