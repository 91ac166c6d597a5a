"""What every rank raises when one rank's part of a save fails, under a real gloo process
group (tests/dist_harness.py), synchronous and with ``async_save=True``.

* The lowest failing rank's error (rank 0's, when it commits) is raised on every rank as
  the same ckpt error class with the same fields and its ``rank``, rebuilt by name; any
  other exception stays a ``CollectiveError`` naming its type.
* Options every rank must share (``async_save``, the run directory's name, ...) are
  checked by the first save's agreement: ``ConfigError`` on every rank, nothing saved.
* A rank SIGKILLed after its part reached rank 0 (its RNG state): rank 0 commits the
  complete save, then raises ``RankLostError`` saying that it was committed; so does a
  third rank that survives (``committed=None`` on both when rank 0's commit failed).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_harness import kill_self, launch, run
from helpers import fsdp_mlp

pytestmark = pytest.mark.slow

E0, E1 = "ckpt-e000000-s000000000.pt", "ckpt-e000001-s000000000.pt"
FIELDS = ("path", "lead", "what", "hint", "errno")


def _fields(e: BaseException) -> dict[str, Any]:
    return {"type": type(e).__name__, "text": str(e), "rank": getattr(e, "rank", None),
            **{k: getattr(e, k, None) for k in FIELDS}}


def _commit_fails_on_rank_0(rank: int, world: int, directory: str, async_save: bool, fault: str) -> dict:
    from ckpt import CheckpointManager
    from ckpt.engine import saving

    mgr = CheckpointManager(directory, model=torch.nn.Linear(4, 4), async_save=async_save, collective_timeout=60)
    mgr.save(epoch=0)
    mgr.wait()
    replace, commit = os.replace, saving.commit
    if rank == 0 and fault == "disk full":  # a real ckpt error: os.replace fails with ENOSPC in the commit
        def full(src: object, dst: object) -> None:
            raise OSError(28, "No space left on device")
        os.replace = full
    if rank == 0 and fault == "not a ckpt error":
        def bug(*args: Any, **kwargs: Any) -> Any:
            raise KeyError("a bug in rank 0's commit")
        saving.commit = bug
    try:
        mgr.save(epoch=1)
        mgr.wait()
        got: dict[str, Any] = {"type": "returned"}
    except Exception as e:  # noqa: BLE001 - the test compares what each rank raised
        got = _fields(e)
    os.replace, saving.commit = replace, commit
    mgr.close()
    return {**got, "names": [r.name for r in mgr.checkpoints]}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_rank_0s_failed_commit_raises_the_same_error_type_and_fields_on_every_rank(tmp_path: Path,
                                                                                   async_save: bool) -> None:
    leader, other = run(_commit_fails_on_rank_0, 2, str(tmp_path), async_save, "disk full", timeout=120)
    assert leader["type"] == other["type"] == "StorageError", (leader, other)
    assert {k: other[k] for k in FIELDS} == {k: leader[k] for k in FIELDS}
    assert leader["errno"] == 28 and "No space left" in leader["what"] and leader["hint"]
    assert leader["rank"] is None and other["rank"] == 0  # where it happened
    assert "(commit) failed on rank 0: " in other["text"] and "epoch 1" in other["text"]
    assert other["text"].endswith(f"hint: {leader['hint']}")
    assert leader["names"] == other["names"] == [E0]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_rank_0s_non_ckpt_error_is_a_collective_error_naming_its_type(tmp_path: Path, async_save: bool) -> None:
    leader, other = run(_commit_fails_on_rank_0, 2, str(tmp_path), async_save, "not a ckpt error", timeout=120)
    assert leader["type"] == "KeyError", leader  # rank 0's own, unchanged
    assert other["type"] == "CollectiveError", other  # no class of another rank is rebuilt but ckpt's own
    assert "failed on rank 0: KeyError: \"a bug in rank 0's commit\"" in other["text"], other["text"]
    assert leader["names"] == other["names"] == [E0]


def _staging_fails_on_rank_0(rank: int, world: int, directory: str) -> dict:
    from ckpt import CheckpointManager

    mgr = CheckpointManager(directory, model=torch.nn.Linear(2, 2), async_save=True, collective_timeout=60)
    try:  # only rank 0 builds (stages) the file: a value weights_only=True cannot load fails there
        mgr.save(epoch=0, extra={"x": object()} if rank == 0 else {"x": 1})
        got: dict[str, Any] = {"type": "returned"}
    except Exception as e:  # noqa: BLE001 - the test compares what each rank raised
        got = _fields(e)
    mgr.close()
    return got


def test_rank_0s_error_in_an_async_save_call_is_raised_by_save_on_every_rank(tmp_path: Path) -> None:
    leader, other = run(_staging_fails_on_rank_0, 2, str(tmp_path), timeout=120)
    assert leader["type"] == other["type"] == "ConfigError", (leader, other)
    assert {k: other[k] for k in FIELDS} == {k: leader[k] for k in FIELDS}
    assert other["text"].startswith("save() failed on rank 0: ") and other["rank"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ckpt-e")]


def _options_differ(rank: int, world: int, root: str, option: str) -> dict:
    from ckpt import CheckpointManager

    kwargs: dict[str, Any] = {"async_save": rank == 0} if option == "async_save" else {}
    directory = Path(root) / (f"run-{rank}" if option == "directory" else "run")
    mgr = CheckpointManager(directory, model=torch.nn.Linear(2, 2), collective_timeout=300, **kwargs)
    try:  # a collective timeout (300 s) would outlast the harness's deadline: the test fails then
        mgr.save(epoch=0)
        mgr.wait()
        got: dict[str, Any] = {"type": "returned"}
    except Exception as e:  # noqa: BLE001 - the test compares what each rank raised
        got = _fields(e)
    mgr.close()
    return got


@pytest.mark.parametrize("option", ["async_save", "directory"])
def test_options_that_differ_across_ranks_raise_a_config_error_on_every_rank_at_the_first_save(
        tmp_path: Path, option: str) -> None:
    outs = run(_options_differ, 2, str(tmp_path), option, timeout=120)
    shown = {"async_save": "async_save: rank 0: True, rank 1: False",
             "directory": "directory: rank 0: 'run-0', rank 1: 'run-1'"}[option]
    for out in outs:
        assert out["type"] == "ConfigError", out
        assert "ranks created their CheckpointManager with different options" in out["text"], out["text"]
        assert shown in out["text"] and f"pass the same {option} to CheckpointManager on every rank" in out["hint"]
    assert outs[0]["text"] == outs[1]["text"]
    assert not [p for p in tmp_path.rglob("ckpt-e*")]


def _die_at_the_commit_broadcast() -> None:
    """This rank SIGKILLs itself when the commit's outcome is broadcast."""
    from ckpt.distributed import collective as cd

    real = cd.broadcast_object

    def broadcast(*args: Any, **kwargs: Any) -> Any:
        if "(commit)" in kwargs.get("what", ""):
            kill_self()
        return real(*args, **kwargs)
    cd.broadcast_object = broadcast


def _lost_after_its_part(rank: int, world: int, directory: str, async_save: bool) -> dict:
    from ckpt import CheckpointManager

    mgr = CheckpointManager(directory, model=torch.nn.Linear(4, 4), async_save=async_save, collective_timeout=60)
    mgr.save(epoch=0)
    mgr.wait()
    if rank == 1:  # killed once its part (its RNG state) reached rank 0, before the commit's outcome
        _die_at_the_commit_broadcast()
    try:
        mgr.save(epoch=1)
        mgr.wait()
        got: dict[str, Any] = {"type": "returned"}
    except Exception as e:  # noqa: BLE001 - the test checks what rank 0 raised
        got = {**_fields(e), "lost": getattr(e, "lost", None), "committed": getattr(e, "committed", None)}
    mgr.close()  # after the failure: no barrier waits for the dead rank
    return {**got, "names": [r.name for r in mgr.checkpoints]}


def _resume(rank: int, world: int, directory: str) -> tuple[int, list[str]]:
    from ckpt import CheckpointManager

    with CheckpointManager(directory, model=torch.nn.Linear(4, 4), collective_timeout=60) as mgr:
        return mgr.resume(), [r.name for r in mgr.checkpoints]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_rank_killed_after_its_part_arrived_leaves_the_save_committed_and_rank_0_says_so(
        tmp_path: Path, async_save: bool) -> None:
    outs = launch(_lost_after_its_part, 2, str(tmp_path), async_save, timeout=150)
    assert outs[1].killed and outs[0].ok, outs[0].traceback
    got = outs[0].value
    assert got["type"] == "RankLostError", got
    assert got["lost"] == (1,) and got["committed"] == str(tmp_path / E1), got
    assert "rank 1 stopped answering" in got["text"], got["text"]
    assert f"the save of epoch 1, step 0 WAS committed before that ({tmp_path / E1})" in got["text"]
    assert f"resume() restarts from {tmp_path / E1}" in got["hint"]
    assert got["names"] == [E0, E1]
    obj = torch.load(tmp_path / E1, weights_only=True)  # complete: every rank's RNG state in it
    assert len(obj["ckpt"]["rng_per_rank"]) == 2
    assert run(_resume, 2, str(tmp_path), timeout=120) == [(2, [E0, E1])] * 2


# ------------------------------------------------------------------ 3 ranks


def _gave_up_flag() -> Any:
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def _lost_with_a_survivor(rank: int, world: int, directory: str, async_save: bool, case: str) -> dict:
    from ckpt import CheckpointManager
    from ckpt.distributed import collective as cd
    from ckpt.engine import saving

    mgr = CheckpointManager(directory, model=torch.nn.Linear(4, 4), async_save=async_save, collective_timeout=90)
    mgr.save(epoch=0)
    mgr.wait()
    if rank == 1:  # killed once its part (its RNG state) reached rank 0, before the commit's outcome
        _die_at_the_commit_broadcast()
    if rank == 2 and case == "committed late":  # tells rank 0 that it gave up on rank 1
        real_lost = cd.lost_error

        def lost_error(*args: Any) -> Any:
            _gave_up_flag().set("test/rank 2 gave up", "1")
            return real_lost(*args)
        cd.lost_error = lost_error
    replace, commit = os.replace, saving.commit
    if rank == 0 and case == "committed late":  # commits only after rank 2 gave up waiting for rank 1
        def late(*args: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + 80  # polled: a blocking wait on the store would stall the heartbeat
            while not _gave_up_flag().check(["test/rank 2 gave up"]) and time.monotonic() < deadline:
                time.sleep(0.2)
            return commit(*args, **kwargs)
        saving.commit = late
    if rank == 0 and case == "commit fails":
        def full(src: object, dst: object) -> None:
            raise OSError(28, "No space left on device")
        os.replace = full
    try:
        mgr.save(epoch=1)
        mgr.wait()
        got: dict[str, Any] = {"type": "returned"}
    except Exception as e:  # noqa: BLE001 - the test checks what each rank raised
        cause = e.__cause__
        got = {**_fields(e), "lost": getattr(e, "lost", None), "committed": getattr(e, "committed", None),
               "cause": None if cause is None else {**_fields(cause), "type": type(cause).__name__}}
    os.replace, saving.commit = replace, commit
    mgr.close()  # after the failure: no barrier waits for the dead rank
    return {**got, "names": [r.name for r in mgr.checkpoints]}


@pytest.mark.parametrize(("async_save", "case"), [(False, "committed"), (True, "committed late"),
                                                  (False, "commit fails")])
def test_a_surviving_third_rank_learns_whether_rank_0_committed_after_a_rank_was_lost(
        tmp_path: Path, async_save: bool, case: str) -> None:
    """Rank 2 gives up on rank 1 (no heartbeat) at the commit's broadcast; it learns rank
    0's outcome without rank 1, also when rank 0 commits only after rank 2 gave up."""
    outs = launch(_lost_with_a_survivor, 3, str(tmp_path), async_save, case, timeout=200)
    assert outs[1].killed, outs[1]
    assert outs[0].ok and outs[2].ok, (outs[0].traceback, outs[2].traceback)
    leader, survivor = outs[0].value, outs[2].value
    for got in (leader, survivor):
        assert got["type"] == "RankLostError" and got["lost"] == (1,), got
        assert "rank 1 stopped answering" in got["text"], got["text"]
    if case == "commit fails":  # nothing committed; rank 0's error is the cause on both
        assert leader["committed"] is survivor["committed"] is None
        assert leader["cause"]["type"] == survivor["cause"]["type"] == "StorageError", (leader, survivor)
        assert {k: survivor["cause"][k] for k in FIELDS} == {k: leader["cause"][k] for k in FIELDS}
        assert leader["cause"]["errno"] == 28 and (leader["cause"]["rank"], survivor["cause"]["rank"]) == (None, 0)
        assert leader["names"] == survivor["names"] == [E0]
        return
    where = str(tmp_path / E1)
    assert leader["committed"] == survivor["committed"] == where, (leader, survivor)
    for got in (leader, survivor):
        assert f"the save of epoch 1, step 0 WAS committed before that ({where})" in got["text"], got["text"]
        assert f"resume() restarts from {where}" in got["hint"]
    assert leader["names"] == [E0, E1]
    assert len(torch.load(tmp_path / E1, weights_only=True)["ckpt"]["rng_per_rank"]) == 3


def _checks_fail(rank: int, world: int, directory: str, failing: tuple[int, ...]) -> dict:
    from ckpt import CheckpointManager

    bad: dict[str, Any] = {1: {"extra": ["not", "a", "dict"]}, 2: {"metrics": {"loss": "high"}}}.get(rank, {})
    mgr = CheckpointManager(directory, model=torch.nn.Linear(2, 2), collective_timeout=60)
    try:
        mgr.save(epoch=0, **(bad if rank in failing else {}))
        got: dict[str, Any] = {"type": "returned"}
    except Exception as e:  # noqa: BLE001 - the test compares what each rank raised
        got = {**_fields(e), "cause": None if e.__cause__ is None else str(e.__cause__)}
    mgr.close()
    return got


@pytest.mark.parametrize("failing", [(2,), (1, 2)], ids=["rank 2", "ranks 1 and 2"])
def test_the_lowest_failing_ranks_ckpt_error_is_raised_on_every_rank(tmp_path: Path,
                                                                     failing: tuple[int, ...]) -> None:
    outs = run(_checks_fail, 3, str(tmp_path), failing, timeout=120)
    first = failing[0]
    own = outs[first]
    what = {1: "extra must be a dict, got list", 2: "metric 'loss' must be a number, got 'high'"}[first]
    assert own["type"] == "ConfigError" and own["rank"] is None and own["what"].startswith(what), own
    for rank, out in enumerate(outs):
        if rank == first:
            continue
        assert out["type"] == "ConfigError" and out["rank"] == first, (rank, out)
        assert {k: out[k] for k in FIELDS} == {k: own[k] for k in FIELDS}
        assert out["text"].startswith(f"save() failed on rank {first}: {what}"), out["text"]
    if failing == (1, 2):  # rank 2 raises rank 1's error, its own as the cause
        assert "metric 'loss' must be a number" in outs[2]["cause"], outs[2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ckpt-e")]


def _shard_write_fails_on_rank_2(rank: int, world: int, directory: str) -> dict:
    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, 0)
    mgr = CheckpointManager(directory, model=model, optimizer=opt, collective_timeout=60)
    mgr.save(epoch=0)
    fsync, sync = os.fsync, os.sync
    if rank == 2:  # its disk is full: DCP's fsync of its shard file fails (ENOSPC)
        def full(*args: Any) -> None:
            raise OSError(28, "No space left on device")
        os.fsync, os.sync = full, full  # type: ignore[assignment]
    try:
        mgr.save(epoch=1)
        got: dict[str, Any] = {"type": "returned"}
    except Exception as e:  # noqa: BLE001 - the test compares what each rank raised
        got = _fields(e)
    os.fsync, os.sync = fsync, sync  # type: ignore[assignment]
    mgr.close()
    return {**got, "names": [r.name for r in mgr.checkpoints]}


def test_a_shard_write_that_fails_on_rank_2_raises_its_storage_error_on_every_rank(tmp_path: Path) -> None:
    outs = run(_shard_write_fails_on_rank_2, 3, str(tmp_path), timeout=150)
    own = outs[2]
    assert own["type"] == "StorageError" and own["rank"] is None and own["errno"] == 28, own
    assert "No space left on device" in own["what"] and "disk is full" in own["hint"], own
    for out in outs[:2]:
        assert out["type"] == "StorageError" and out["rank"] == 2, out
        assert {k: out[k] for k in FIELDS} == {k: own[k] for k in FIELDS}
        assert "(write) failed on rank 2: " in out["text"], out["text"]
    assert [o["names"] for o in outs] == [["ckpt-e000000-s000000000.dcp"]] * 3
