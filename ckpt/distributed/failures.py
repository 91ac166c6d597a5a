"""What the ranks of a ckpt collective raise when one of them failed, or did not arrive
(see docs/explanation/distributed.md).

Every such error names the rank(s) at fault and what the survivors were doing. When
ranks failed, every rank raises the error of the lowest failing rank (the same on every
rank, whichever failed): that rank its own, every other the same ckpt error class,
rebuilt by name from its fields (:func:`ckpt.errors.from_wire`; never an unpickled
class), with ``rank`` set and its text saying where it happened (another failing rank
chains its own error as the cause). An exception that is not a ckpt error becomes a
:class:`~ckpt.errors.CollectiveError` naming its type.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import CkptError, CollectiveTimeoutError, RankLostError, Wire, from_wire

ORDER_HINT = ("every rank must call save()/resume()/restore()/wait()/close() in the same order; a rank "
              "that crashed, or is stuck elsewhere (data loading, a collective of its own), shows up here")


def first_failure(rank: int, what: str, error: BaseException | None, failed: Sequence[tuple[int, Wire]]) -> None:
    """Raise what rank ``rank`` (its own ``error``, or None) raises when the ranks ``failed``
    did (rank, its error; none: return): the lowest failing rank's error (module docstring)."""
    if not failed:
        return
    first, wire = min(failed, key=lambda f: f[0])
    if first == rank and error is not None:
        raise error
    raise from_wire(wire, first, what) from error


def lost_error(rank: int, what: str, verdict: str, arrived: list[int], lost_after: float) -> RankLostError:
    """The error of a rank that gave up on ranks whose heartbeat stopped (``verdict``: ``lost <ranks>``)."""
    lost = [int(r) for r in verdict.split()[1].split(",")]
    msg = (f"{what}: rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} stopped answering "
           f"(no heartbeat for {lost_after:g} s: the process died or its machine is gone); "
           f"rank {rank} gives up" + (f" (ranks {arrived} had arrived)" if arrived else ""))
    err = RankLostError(msg, hint="see the lost rank's log and the launcher's (torchrun) output; resume "
                                  "restarts from the newest complete checkpoint")
    err.lost = tuple(lost)
    return err


def timeout_error(rank: int, world_size: int, what: str, timeout: float, arrived: list[int]) -> CollectiveTimeoutError:
    missing = [r for r in range(world_size) if r not in arrived]
    msg = f"{what} timed out after {timeout:g} s on rank {rank}: ranks {missing} did not arrive"
    return CollectiveTimeoutError(msg + (f" (ranks {arrived} did)" if arrived else ""), hint=ORDER_HINT)


def committed_anyway(e: CkptError, where: str, epoch: int, step: int) -> CkptError:
    """Rank 0's error when a rank was lost (or late) only after rank 0 committed the save
    of (``epoch``, ``step``) at ``where``: every rank's part had arrived, so the checkpoint
    is complete and stays committed; the error says so, for the restart resumes from it."""
    note = (f"; the save of epoch {epoch}, step {step} WAS committed before that ({where}): every rank's part "
            f"had arrived, so it is complete and a resume restarts from it")
    hint = f"see the lost rank's log; restart the run: resume() restarts from {where}"
    if isinstance(e, RankLostError):
        lost = RankLostError(e.message + note, hint=hint)
        lost.lost, lost.committed = e.lost, where
        return lost
    if isinstance(e, CollectiveTimeoutError):
        return CollectiveTimeoutError(e.message + note, hint=hint)
    return e
