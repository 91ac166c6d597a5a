"""Nothing under a process group hangs, and nothing leaks (real gloo ranks, tests/dist_harness.py).

- A rank that never arrives: the others give up after the process group's own timeout
  plus a small margin (not ckpt's own 600 s), naming it.
- A rank SIGKILLed during a sharded save: every survivor raises :class:`ckpt.RankLostError`
  naming it within seconds (its heartbeat stops), not after the timeout.
- Managers opened and closed under a process group free their gloo group and threads.

Each launch has a deadline far below the old waits, so a regression fails, never hangs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from dist_harness import kill_self, launch, run
from helpers import fsdp_mlp

pytestmark = pytest.mark.slow


def _absent(rank: int, world: int, directory: str) -> str:
    from ckpt import CheckpointManager, CollectiveTimeoutError

    mgr = CheckpointManager(directory, model=torch.nn.Linear(2, 2))  # default collective_timeout
    flag = Path(directory) / "rank0-gave-up"
    if rank == 1:  # alive, but elsewhere: arrives only after rank 0 gave up
        deadline = time.monotonic() + 50
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    try:
        mgr.save(epoch=0)
    except CollectiveTimeoutError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        if rank == 0:
            flag.touch()
        mgr.close()
    return "returned"


def test_a_rank_that_never_arrives_is_given_up_on_after_the_process_groups_timeout(tmp_path: Path) -> None:
    # the process group's timeout is 4 s: ckpt waits 4 + 5 s, not its old 600 s default
    leader, late = [o.value for o in launch(_absent, 2, str(tmp_path), timeout=45, pg_timeout=4)]
    assert leader.startswith("CollectiveTimeoutError: save() timed out after 9 s on rank 0"), leader
    assert "ranks [1] did not arrive" in leader
    assert late.startswith("CollectiveTimeoutError: rank 1 reached save() after the other ranks"), late


def _killed_sharded(rank: int, world: int, directory: str, victim: int) -> str:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from ckpt import CheckpointManager, RankLostError

    model, opt = fsdp_mlp(world, 0)
    mgr = CheckpointManager(directory, model=model, optimizer=opt)  # default: 120 + 5 s here
    mgr.save(epoch=0)
    if rank == victim:
        FileSystemWriter.write_data = lambda self, plan, planner: kill_self()  # type: ignore[method-assign]
    try:
        mgr.save(epoch=1)
    except RankLostError as e:
        return f"{type(e).__name__}: {e}"
    return "returned"


def test_a_rank_killed_during_a_sharded_save_is_named_by_every_survivor(tmp_path: Path) -> None:
    outs = launch(_killed_sharded, 3, str(tmp_path), 1, timeout=90, pg_timeout=120)
    assert outs[1].killed
    for out in (outs[0], outs[2]):
        assert out.error is None, out.traceback
        assert out.value.startswith("RankLostError: save of ckpt-e000001-s000000000.dcp (write)"), out.value
        assert "rank 1 stopped answering" in out.value
    listed = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-e"))
    assert listed == ["ckpt-e000000-s000000000.dcp"]


def _counts() -> tuple[int, int]:
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))


def _open_close(rank: int, world: int, directory: str, n: int) -> list[tuple[int, int]]:
    from ckpt import CheckpointManager

    seen = []
    for i in range(n):
        with CheckpointManager(directory, model=torch.nn.Linear(2, 2), collective_timeout=30) as mgr:
            if i % 5 == 0:
                mgr.save(epoch=i)
        seen.append(_counts())
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd and /proc/self/task")
def test_managers_under_a_process_group_free_their_group_and_threads(tmp_path: Path) -> None:
    for seen in run(_open_close, 2, str(tmp_path), 40, timeout=120):
        (fds0, threads0), (fds, threads) = seen[4], seen[-1]
        assert fds <= fds0 + 2 and threads <= threads0 + 2, seen  # was +5 fds, +3 threads a manager


# -- adversarial round: rank 0 killed during the commit; ranks that disagree -------------


def _rank0_killed_in_commit(rank: int, world: int, directory: str) -> str:
    from ckpt import CheckpointManager, RankLostError

    mgr = CheckpointManager(directory, model=torch.nn.Linear(2, 2))  # default timeout: 120 + 5 s here
    mgr.save(epoch=0)
    if rank == 0:
        from ckpt.engine import saving

        real = saving.commit

        def commit_then_die(*args: object, **kwargs: object) -> object:
            real(*args, **kwargs)  # the file is committed and indexed, then rank 0 dies before telling anyone
            kill_self()

        saving.commit = commit_then_die  # type: ignore[assignment]
    try:
        mgr.save(epoch=1)
    except RankLostError as e:
        return f"{type(e).__name__}: {e}"
    return "returned"


def _resume(rank: int, world: int, directory: str) -> int:
    from ckpt import CheckpointManager

    with CheckpointManager(directory, model=torch.nn.Linear(2, 2), collective_timeout=30) as mgr:
        return mgr.resume()


def test_rank_0_killed_during_the_commit_is_named_and_resume_takes_a_complete_checkpoint(tmp_path: Path) -> None:
    outs = launch(_rank0_killed_in_commit, 2, str(tmp_path), timeout=90, pg_timeout=120)
    assert outs[0].killed and outs[1].error is None, outs[1].traceback
    assert outs[1].value.startswith("RankLostError: save() of epoch 1, step 0 (commit): rank 0 stopped"), outs[1].value
    assert run(_resume, 2, str(tmp_path), timeout=60) in ([1, 1], [2, 2])  # whichever commit was complete


def _disagree(rank: int, world: int, directory: str) -> str:
    from ckpt import CheckpointManager, CollectiveError

    mgr = CheckpointManager(directory, model=torch.nn.Linear(2, 2), collective_timeout=30)
    try:
        mgr.save(epoch=rank)  # a bug in the user's loop: each rank counts its own epochs
    except CollectiveError as e:
        return str(e)
    finally:
        mgr.close()
    return "returned"


def test_ranks_that_save_different_epochs_all_raise_and_commit_nothing(tmp_path: Path) -> None:
    for out in run(_disagree, 2, str(tmp_path), timeout=60):
        assert out.startswith("ranks called save() with different arguments (rank 0: epoch=0"), out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ckpt-e")]
