"""ckpt.distributed and ckpt.sharded on real gloo process groups (tests/dist_harness.py).

Rank functions are module-level so the rank processes can unpickle them; each returns
small plain values for the test to assert on in the parent.
"""

from __future__ import annotations

import random
import time
import warnings
from pathlib import Path

import pytest
import torch
from dist_harness import kill_self, launch, run
from helpers import equal, fsdp_mlp, full_state

from ckpt.distributed import collective as cd
from ckpt.distributed.dtensors import has_dtensor

# ---------------------------------------------------------------- bounded collectives


def _overrun(rank: int, world: int) -> None:
    import threading

    if rank == 1:
        threading.Event().wait()  # never returns


def test_the_harness_kills_and_reaps_ranks_that_overrun() -> None:
    import os

    from dist_harness import RankFailed

    with pytest.raises(RankFailed, match=r"ranks \[1\] did not finish within 3 s") as info:
        launch(_overrun, 2, timeout=3, init=False)
    assert [out.exitcode for out in info.value.outcomes] == [0, -9]
    for out in info.value.outcomes:
        assert out.pid is not None
        with pytest.raises(ProcessLookupError):  # gone, not even a zombie
            os.kill(out.pid, 0)



def _sync_ranks(rank: int, world: int) -> list:
    ctx = cd.context(timeout=30)
    assert ctx.active and ctx.rank == rank and ctx.world_size == world and ctx.is_leader == (rank == 0)
    first = cd.sync(ctx, "first", timeout=10, payload=rank * 10)
    second = cd.sync(ctx, "second", timeout=10, payload={"rank": rank})
    store = ctx._channel.store  # type: ignore[union-attr]
    keys = store.num_keys()
    for _ in range(10):
        cd.sync(ctx, "again", timeout=10, payload=list(range(100)))
    assert store.num_keys() <= keys + 4 * world  # not 10 calls of keys: each call deletes the one before
    return [first, second, cd.broadcast_object(ctx, f"from {rank}", src=1, timeout=10)]


def test_sync_gathers_every_payload_in_rank_order() -> None:
    got = run(_sync_ranks, 3, timeout=60)
    for out in got:
        assert out == [[0, 10, 20], [{"rank": 0}, {"rank": 1}, {"rank": 2}], "from 1"]


def _skip_once(rank: int, world: int, skipper: int) -> dict:
    import torch.distributed as dist

    ctx = cd.context(timeout=30)
    cd.sync(ctx, "warm-up", timeout=10)
    start = time.monotonic()
    error = late = None
    if rank != skipper:
        try:
            cd.sync(ctx, "save()", timeout=2)
        except cd.CollectiveTimeoutError as e:
            error = str(e)
        waited = time.monotonic() - start
        dist.barrier()  # on the training group: lets the skipper go on only now
    else:
        dist.barrier()
        waited = 0.0
        try:  # its first call meets the save() the others gave up on
            cd.sync(ctx, "resume()", timeout=10)
        except cd.CollectiveTimeoutError as e:
            late = str(e)
    # nothing is left out of step: the next call works on every rank
    after = cd.sync(ctx, "resume()", timeout=10, payload=rank)
    return {"error": error, "late": late, "waited": waited, "after": after}


@pytest.mark.slow
def test_a_rank_that_skips_a_collective_makes_the_others_fail_in_bounded_time() -> None:
    outs = run(_skip_once, 3, 2, timeout=60)
    for rank in (0, 1):
        err = outs[rank]["error"]
        assert err is not None and "save() timed out after 2 s" in err
        assert "ranks [2] did not arrive (ranks [0, 1] did)" in err and "same order" in err
        assert 2 <= outs[rank]["waited"] < 8
    assert "rank 2 reached resume() after the other ranks had given up waiting for it at save() (2 s)" \
        in outs[2]["late"]
    assert all(out["after"] == [0, 1, 2] for out in outs)


def _mismatch(rank: int, world: int) -> str:
    ctx = cd.context(timeout=30)
    try:
        cd.sync(ctx, "save()" if rank == 0 else "resume()", timeout=10)
    except cd.CollectiveError as e:
        return str(e)
    return "no error"


def test_ranks_calling_different_operations_all_raise() -> None:
    for msg in run(_mismatch, 2, timeout=60):
        assert "different ckpt operations (rank 0: save(), rank 1: resume())" in msg


def _commit_fails_on_leader(rank: int, world: int) -> str:
    ctx = cd.context(timeout=30)
    error = OSError(28, "No space left on device") if ctx.is_leader else None
    try:
        cd.agree(ctx, "commit of epoch 3", error, timeout=10)
    except Exception as e:  # noqa: BLE001 - the test reports what each rank raised
        return f"{type(e).__name__}: {e}"
    return "ok"


def test_a_failure_on_rank_0_raises_on_every_rank() -> None:
    leader, other = run(_commit_fails_on_leader, 2, timeout=60)
    assert leader == "OSError: [Errno 28] No space left on device"  # its own error, unchanged
    assert other.startswith("CollectiveError: commit of epoch 3 failed on rank 0: OSError:")
    assert "No space left on device" in other


def test_single_process_context_needs_no_process_group() -> None:
    ctx = cd.context()
    assert not ctx.active and ctx.rank == 0 and ctx.world_size == 1 and ctx.is_leader
    assert cd.sync(ctx, "save()", timeout=1, payload=5) == [5]
    assert cd.broadcast_object(ctx, "x", timeout=1) == "x"
    cd.agree(ctx, "save()", None, timeout=1)
    with pytest.raises(ValueError, match="boom"):
        cd.agree(ctx, "save()", ValueError("boom"), timeout=1)
    with pytest.raises(cd.ConfigError, match="timeout"):
        cd.sync(ctx, "save()", timeout=0)


# ---------------------------------------------------------------------- per-rank RNG


def _rng_round_trip(rank: int, world: int) -> bool:
    from ckpt.state import capture_rng, restore_rng

    ctx = cd.context(timeout=30)
    torch.manual_seed(100 + rank)
    random.seed(100 + rank)
    saved = cd.gather_rng(ctx, capture_rng(), timeout=10)
    assert (saved is not None) == ctx.is_leader
    expected = (torch.rand(4), random.random())
    torch.manual_seed(0)  # every rank now has the same state
    random.seed(0)
    mine = cd.scatter_rng(ctx, saved, timeout=10)
    assert mine is not None
    restore_rng(mine)
    got = (torch.rand(4), random.random())
    return torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_rng_states_gathered_on_rank_0_and_scattered_back() -> None:
    assert run(_rng_round_trip, 2, timeout=60) == [True, True]


def test_rng_for_rank_at_another_world_size_keeps_own_streams() -> None:
    saved = [{"torch": torch.tensor([r])} for r in range(2)]
    with pytest.warns(UserWarning, match="RNG states of 2 ranks, this run has 3"):
        assert cd.rng_for_rank(cd.Group(rank=0, world_size=3), saved) == saved[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only rank 0 warns
        assert cd.rng_for_rank(cd.Group(rank=2, world_size=3), saved) is None
        assert cd.rng_for_rank(cd.Group(rank=1, world_size=2), saved) == saved[1]
    with pytest.warns(UserWarning, match="saved ranks 1..1 are dropped"):
        assert cd.rng_for_rank(cd.Group(), saved) == saved[0]


def test_has_dtensor_finds_nothing_in_plain_state() -> None:
    model = torch.nn.Linear(2, 2)
    assert not has_dtensor({"model": model.state_dict(), "list": [torch.zeros(1)], "n": 3})
    assert not has_dtensor(model)


# ------------------------------------------------------------- sharded checkpoints (DCP)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(3, 4, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _save_rank(rank: int, world: int, root: Path) -> tuple:
    from ckpt.distributed.sharded import save_sharded

    ctx = cd.context(timeout=30)
    model, opt = fsdp_mlp(world, seed=0)
    _train(model, opt)
    assert has_dtensor(model) and has_dtensor(opt.state_dict())
    rngs = cd.gather_rng(ctx, {"torch": torch.get_rng_state()}, timeout=10)
    manifest = save_sharded(ctx, root / ".tmp-e3", root / "e3", {"model": model, "optimizer": opt},
                            {"epoch": 3, "rng": rngs}, timeout=10)
    full = full_state(model, opt)  # collective
    return (full if ctx.is_leader else None), manifest


def _load_rank(rank: int, world: int, root: Path, shard: bool = True) -> tuple:
    from ckpt.distributed.sharded import load_sharded

    ctx = cd.context(timeout=30)
    model, opt = fsdp_mlp(world, seed=1, shard=shard)
    meta = load_sharded(ctx, root / "e3", {"model": model, "optimizer": opt}, timeout=10)
    full = full_state(model, opt)  # collective
    _train(model, opt, steps=1)  # the loaded optimizer state is usable
    return (full if ctx.is_leader else None), meta["epoch"], len(meta["rng"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A checkpoint saved by 2 FSDP2 ranks, and the full state it holds."""
    root = tmp_path_factory.mktemp("sharded")
    (full, manifest), (_, other) = run(_save_rank, 2, root, timeout=90)
    assert manifest == other and manifest["world_size"] == 2
    return root, full


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_checkpoint_saved_by_2_ranks_loads_on_1_2_and_3(saved: tuple, world: int) -> None:
    root, full = saved
    loaded, epoch, ranks = run(_load_rank, world, root, timeout=90)[0]
    assert (epoch, ranks) == (3, 2)
    assert equal(loaded, full)


def test_sharded_checkpoint_loads_without_a_process_group(saved: tuple) -> None:
    from ckpt.distributed.sharded import load_sharded

    root, full = saved
    model, opt = fsdp_mlp(1, seed=1, shard=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meta = load_sharded(cd.context(), root / "e3", {"model": model, "optimizer": opt}, timeout=10)
    assert meta["epoch"] == 3 and equal(full_state(model, opt), full)


def _save_with_fault(rank: int, world: int, root: Path, fault: str) -> tuple:
    """Save at world 2 with a fault injected on one rank; returns what the rank raised."""
    import os

    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from ckpt.distributed.sharded import save_sharded

    ctx = cd.context(timeout=5)  # bounds DCP's own collectives too
    model, opt = fsdp_mlp(world, seed=0)
    _train(model, opt, steps=1)
    if fault == "kill writer" and rank == 1:
        FileSystemWriter.write_data = lambda self, plan, planner: kill_self()  # type: ignore[method-assign]
    if fault == "kill leader at rename" and rank == 0:
        os.replace = lambda src, dst: kill_self()
    if fault == "disk full at rename" and rank == 0:
        def replace(src: object, dst: object) -> None:
            raise OSError(28, "No space left on device")
        os.replace = replace
    start = time.monotonic()
    try:
        save_sharded(ctx, root / ".tmp-e1", root / "e1", {"model": model, "optimizer": opt}, {}, timeout=3)
    except BaseException as e:  # noqa: BLE001 - the test checks the type
        return f"{type(e).__name__}: {e}", time.monotonic() - start
    return "saved", time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill writer", "kill leader at rename", "disk full at rename"])
def test_a_rank_failing_or_killed_mid_save_commits_nothing_and_the_others_raise(tmp_path: Path, fault: str) -> None:
    outcomes = launch(_save_with_fault, 2, tmp_path, fault, timeout=60)
    victim = 1 if fault == "kill writer" else 0
    if fault.startswith("kill"):
        assert outcomes[victim].killed
    survivor = outcomes[1 - victim].value
    assert survivor is not None, outcomes[1 - victim].traceback
    error, waited = survivor
    assert waited < 15  # bounded: the 3 s sync timeout, or DCP noticing the dead peer at once
    assert error.startswith(("CollectiveTimeoutError", "CollectiveError", "StorageError")), error
    if fault == "disk full at rename":
        assert outcomes[0].value[0].startswith("StorageError") and "No space left" in outcomes[0].value[0]
        assert error.startswith("StorageError") and "failed on rank 0: " in error and "No space left" in error
    assert not (tmp_path / "e1").exists()
    if fault != "kill leader at rename":  # a killed leader leaves its scratch directory to resume's cleanup
        assert not (tmp_path / ".tmp-e1").exists()


def test_a_flipped_byte_fails_the_checksum(saved: tuple, tmp_path: Path) -> None:
    import shutil

    from ckpt.distributed.sharded import load_sharded

    root, _ = saved
    damaged = tmp_path / "e3"
    shutil.copytree(root / "e3", damaged)
    shard = damaged / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    model, opt = fsdp_mlp(1, seed=1, shard=False)
    with pytest.raises(cd.CkptError, match="checksum mismatch") as info:
        load_sharded(cd.context(), damaged, {"model": model, "optimizer": opt}, timeout=10)
    assert isinstance(info.value, ValueError) and info.value.path == str(shard)


def test_dcp_metadata_naming_other_globals_is_refused(saved: tuple, tmp_path: Path) -> None:
    import pickle
    import shutil

    from ckpt.distributed.sharded import export_single

    root, _ = saved
    bad = tmp_path / "e3"
    shutil.copytree(root / "e3", bad)
    (bad / ".metadata").write_bytes(pickle.dumps(print))  # a global outside DCP's metadata types
    with pytest.raises(cd.CkptError, match="builtins.print is not a DCP metadata type"):
        export_single(bad, tmp_path / "out.pt", verify=False)


def test_export_single_is_one_plain_file_of_the_full_state(saved: tuple, tmp_path: Path) -> None:
    from ckpt.distributed.sharded import export_single

    root, full = saved
    out = export_single(root / "e3", tmp_path / "e3.pt")
    plain = torch.load(out, weights_only=True)
    assert plain["epoch"] == 3 and len(plain["rng"]) == 2
    assert equal(plain["model"], full["model"])
    model, opt = fsdp_mlp(1, seed=1, shard=False)
    model.load_state_dict(plain["model"])
    opt.load_state_dict(plain["optimizer"])  # numbered like Optimizer.state_dict()
    assert equal(full_state(model, opt), full)


def test_loading_into_a_different_architecture_is_a_state_mismatch(saved: tuple) -> None:
    from ckpt.distributed.sharded import load_sharded

    root, _ = saved
    wider = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with pytest.raises(cd.CkptError, match="does not fit") as info:
        load_sharded(cd.context(), root / "e3", {"model": wider}, timeout=10)
    assert isinstance(info.value, RuntimeError) and "0.weight" in str(info.value)
    with pytest.raises(cd.CkptError, match=r"no state for \['sampler_model'\]"):
        load_sharded(cd.context(), root / "e3", {"sampler_model": wider}, timeout=10)
