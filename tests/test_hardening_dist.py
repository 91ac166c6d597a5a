"""Adversarial round under a process group (issue 28, item 1), on real gloo ranks
(tests/dist_harness.py: a deadline on every launch, every rank reaped).

- Rank 0 SIGKILLed at each point of a replicated commit (before the checkpoint's
  rename, before and after the index's, while retention deletes): every survivor raises
  :class:`ckpt.RankLostError`, and a fresh launch resumes a complete checkpoint whose
  weights are that epoch's; nothing temporary is listed, everything listed verifies.
- Ranks that disagree (epoch, metric names, retention options): every rank raises a
  :class:`ckpt.CollectiveError` naming the ranks and the field; nothing is committed.
- A replicated checkpoint of 2 ranks resumes at 1 and at 3; a mid-epoch one whose
  sampler cannot be resharded is refused on every rank, nothing restored.
- A sharded checkpoint on a local directory with one shard file deleted or damaged:
  resume warns naming the file and falls back to the previous checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from dist_harness import kill_self, launch, run
from helpers import fsdp_mlp

from ckpt.cli import main as cli

pytestmark = pytest.mark.slow

E0, E1, E2 = (f"ckpt-e{e:06d}-s000000000.pt" for e in range(3))


def _model(epoch: float) -> torch.nn.Linear:
    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, epoch)
    return model


def _kill_at(point: str) -> None:
    """Make this process SIGKILL itself at ``point`` of the next commit (rank 0 only)."""
    replace, unlink = os.replace, os.unlink

    def fake_replace(src: Any, dst: Any) -> None:
        name = os.path.basename(os.fspath(dst))
        if point == "before the file's rename" and name == E2:
            kill_self()
        if point == "before the index's rename" and name == "ckpt-index.json":
            kill_self()
        replace(src, dst)
        if point == "after the index's rename" and name == "ckpt-index.json":
            kill_self()

    def fake_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if point == "while retention deletes" and os.path.basename(os.fspath(path)) == E0:
            kill_self()
        unlink(path, *args, **kwargs)

    os.replace, os.unlink = fake_replace, fake_unlink  # type: ignore[assignment]


def _save_then_die(rank: int, world: int, directory: str, point: str) -> str:
    from ckpt import CheckpointManager, CollectiveError, CollectiveTimeoutError

    model = _model(0.0)
    # rank 1 gives up after 4 s (test_dist_hangs.py checks the default wait names a lost rank)
    mgr = CheckpointManager(directory, model=model, keep_last=2, collective_timeout=4)
    for epoch in (0, 1):
        torch.nn.init.constant_(model.weight, float(epoch))
        mgr.save(epoch=epoch)
    torch.nn.init.constant_(model.weight, 2.0)
    if rank == 0:
        _kill_at(point)
    try:
        mgr.save(epoch=2)  # keep_last=2: evicts epoch 0
    except (CollectiveError, CollectiveTimeoutError) as e:
        return f"{type(e).__name__}: {e}"
    return "returned"


def _resume(rank: int, world: int, directory: str) -> Dict[str, Any]:
    from ckpt import CheckpointManager

    model = _model(-1.0)
    with CheckpointManager(directory, model=model, keep_last=2, collective_timeout=30) as mgr:
        start = mgr.resume()
        names = [r.name for r in mgr.checkpoints]
    return {"start": start, "weight": float(model.weight.detach()[0, 0]), "names": names}


def _listed(directory: Path, capsys: pytest.CaptureFixture[str]) -> List[str]:
    capsys.readouterr()
    assert cli(["ls", str(directory), "--json"]) == 0
    return [c["file"] for c in json.loads(capsys.readouterr().out)["checkpoints"]]


POINTS = ["before the file's rename", "before the index's rename", "after the index's rename",
          "while retention deletes"]


@pytest.mark.parametrize("point", POINTS)
def test_rank_0_killed_at_each_point_of_the_commit(tmp_path: Path, point: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "run"
    outs = launch(_save_then_die, 2, str(directory), point, timeout=60)
    assert outs[0].killed, (outs[0].exitcode, outs[0].traceback)
    assert outs[1].error is None, outs[1].traceback
    assert outs[1].value.startswith("CollectiveTimeoutError: save() of epoch 2, step 0 (commit) timed out after 4 s"), \
        outs[1].value
    assert "ranks [0] did not arrive" in outs[1].value
    resumed = run(_resume, 2, str(directory), timeout=60)
    assert resumed[0] == resumed[1]
    start = resumed[0]["start"]
    # the checkpoint file complete on disk is taken (adopted if the index missed it); never half of one
    assert start == (2 if point == "before the file's rename" else 3), resumed
    assert resumed[0]["weight"] == start - 1  # that epoch's weights, exactly
    listed = _listed(directory, capsys)
    assert listed == resumed[0]["names"] and not [n for n in listed if n.startswith(".")]
    assert cli(["verify", str(directory)]) == 0
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".ckpt-tmp")]  # cleaned on open


def _die_at_random(rank: int, world: int, directory: str, seed: int) -> int:
    import threading
    import time

    from ckpt import CheckpointManager, CkptError

    if rank == 0:  # anywhere: opening, resuming, any step of any save
        delay = random.Random(seed).uniform(0.0, 1.5)
        threading.Thread(target=lambda: (time.sleep(delay), kill_self()), daemon=True).start()
    model = _model(0.0)
    try:
        mgr = CheckpointManager(directory, model=model, keep_last=2, collective_timeout=4)
        start = mgr.resume()
        for epoch in range(start, start + 500):
            torch.nn.init.constant_(model.weight, float(epoch))
            mgr.save(epoch=epoch)
    except CkptError:
        return -1
    return start


@pytest.mark.stress
@pytest.mark.parametrize("seed", range(10))
def test_rank_0_killed_at_a_random_moment_of_a_save_loop(tmp_path: Path, seed: int,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "run"
    for round_ in range(5):
        outs = launch(_die_at_random, 2, str(directory), seed * 100 + round_, timeout=90)
        assert outs[0].killed and outs[1].error is None, outs[1].traceback
        resumed = run(_resume, 2, str(directory), timeout=60)
        assert resumed[0] == resumed[1]
        if resumed[0]["start"]:
            assert resumed[0]["weight"] == resumed[0]["start"] - 1
        assert _listed(directory, capsys) == resumed[0]["names"]
        assert cli(["verify", str(directory)]) == 0


# -- ranks that disagree -------------------------------------------------------------

DISAGREE = {
    "epoch": ({"epoch": 0}, {"epoch": 1}),
    "metric names": ({"epoch": 0, "metrics": {"loss": 1.0}}, {"epoch": 0, "metrics": {"val_loss": 1.0}}),
    "retention": ({"epoch": 0, "keep_last": 3}, {"epoch": 0, "keep_last": 1}),
    "monitor": ({"epoch": 0, "keep_best": 1, "monitor": "loss", "metrics": {"loss": 1.0, "acc": 0.1}},
                {"epoch": 0, "keep_best": 1, "monitor": "acc", "mode": "max",
                 "metrics": {"loss": 1.0, "acc": 0.1}}),
}


def _disagree(rank: int, world: int, directory: str, case: str) -> str:
    from ckpt import CheckpointManager, CollectiveError

    args = dict(DISAGREE[case][min(rank, 1)])
    save = {k: args.pop(k) for k in ("epoch", "metrics") if k in args}
    mgr = CheckpointManager(directory, model=torch.nn.Linear(2, 2), collective_timeout=30, **args)
    try:
        mgr.save(**save)
    except CollectiveError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        mgr.close()
    return "returned"


@pytest.mark.parametrize("case", list(DISAGREE))
def test_ranks_that_disagree_all_raise_naming_the_field_and_commit_nothing(tmp_path: Path, case: str) -> None:
    outs = run(_disagree, 3, str(tmp_path), case, timeout=60)
    expected = {"epoch": "rank 0: epoch=0 step=0, rank 1: epoch=1 step=0, rank 2: epoch=1 step=0",
                "metric names": "metric names (rank 0: ['loss'], rank 1: ['val_loss'], rank 2: ['val_loss'])",
                "retention": "retention options (rank 0: keep_last=3, rank 1: keep_last=1, rank 2: keep_last=1)",
                "monitor": "retention options (rank 0: keep_best=1 monitor='loss' mode='min', "
                           "rank 1: keep_best=1 monitor='acc' mode='max', rank 2: keep_best=1 monitor='acc' "
                           "mode='max')"}[case]
    for out in outs:
        assert out.startswith("CollectiveError: ranks called save() with different"), out
        assert expected in out, out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ckpt-e")]


def _metrics_only_on_rank_0(rank: int, world: int, directory: str) -> List[Dict[str, float]]:
    from ckpt import CheckpointManager

    with CheckpointManager(directory, model=torch.nn.Linear(2, 2), keep_best=1, monitor="loss",
                           collective_timeout=30) as mgr:
        for epoch in range(3):  # rank 0 validates; the others pass nothing, or their own values
            metrics = {"loss": float(3 - epoch)} if rank == 0 else ({"loss": 99.0} if rank == 1 else None)
            mgr.save(epoch=epoch, metrics=metrics)
        return [r.metrics for r in mgr.checkpoints]


def test_metrics_given_on_rank_0_only_or_with_other_values_elsewhere_are_rank_0s(tmp_path: Path) -> None:
    # retention decides on rank 0's metrics (docs/howto/ddp.md): not a disagreement
    for out in run(_metrics_only_on_rank_0, 3, str(tmp_path), timeout=60):
        assert out == [{"loss": 1.0}]


# -- another world size ----------------------------------------------------------------


def _replicated_save(rank: int, world: int, directory: str) -> None:
    from ckpt import CheckpointManager, ResumableSampler

    model = _model(0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sampler = ResumableSampler(12, seed=1)
    with CheckpointManager(directory, model=model, optimizer=opt, sampler=sampler, collective_timeout=30) as mgr:
        for epoch in range(2):
            sampler.set_epoch(epoch)
            list(sampler)
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            torch.nn.init.constant_(model.weight, float(epoch))
            mgr.save(epoch=epoch)
        if "mid" in directory:
            sampler.set_epoch(2)
            next(iter(sampler))
            mgr.save(epoch=2, step=1, mid_epoch=True)


def _replicated_resume(rank: int, world: int, directory: str) -> Dict[str, Any]:
    from ckpt import CheckpointManager, ResumableSampler

    model = _model(-1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sampler = ResumableSampler(12, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(directory, model=model, optimizer=opt, sampler=sampler,
                               collective_timeout=30) as mgr:
            try:
                start: Any = mgr.resume()
            except Exception as e:  # noqa: BLE001 - the test checks what each rank raised
                start = f"{type(e).__name__}: {e}"
    return {"start": start, "weight": float(model.weight.detach()[0, 0]), "momentum": bool(opt.state),
            "warnings": [str(w.message) for w in caught], "len": len(sampler)}


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    runs = {}
    for kind in ("end", "mid"):
        runs[kind] = tmp_path_factory.mktemp("replicated") / kind
        run(_replicated_save, 2, str(runs[kind]), timeout=60)
    return runs


@pytest.mark.parametrize("world", [1, 3])
def test_a_replicated_checkpoint_of_2_ranks_resumes_at_another_world_size(replicated: Dict[str, Path],
                                                                          tmp_path: Path, world: int) -> None:
    directory = tmp_path / "run"
    shutil.copytree(replicated["end"], directory)
    outs = run(_replicated_resume, world, str(directory), timeout=60)
    for out in outs:
        assert (out["start"], out["weight"], out["momentum"]) == (2, 1.0, True), out
        assert out["len"] == -(-12 // world)  # the sampler shards over the new world size
    assert "RNG states of 2 ranks, this run has " f"{world}" in outs[0]["warnings"][0]


@pytest.mark.parametrize("world", [1, 3])
def test_a_mid_epoch_sampler_position_at_another_world_size_is_refused_on_every_rank(
        replicated: Dict[str, Path], tmp_path: Path, world: int) -> None:
    directory = tmp_path / "run"
    shutil.copytree(replicated["mid"], directory)
    before = sorted(p.name for p in directory.iterdir())
    outs = run(_replicated_resume, world, str(directory), timeout=60)
    for out in outs:
        assert out["start"].startswith("StateMismatchError") and f"num_replicas={world}" in out["start"], out
        assert "hint: resume mid-epoch at the same world size, or from an end-of-epoch checkpoint" in out["start"]
        assert out["weight"] == -1.0 and not out["momentum"]  # nothing restored
    assert sorted(p.name for p in directory.iterdir()) == before  # nothing moved aside: it is not damage


# -- a sharded checkpoint with a shard file lost or damaged ---------------------------------


def _sharded_save(rank: int, world: int, directory: str) -> None:
    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, 0)
    with CheckpointManager(directory, model=model, optimizer=opt, collective_timeout=30) as mgr:
        for epoch in range(2):
            mgr.save(epoch=epoch)


def _sharded_resume(rank: int, world: int, directory: str) -> Dict[str, Any]:
    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(directory, model=model, optimizer=opt, collective_timeout=30) as mgr:
            start = mgr.resume()
            names = [r.name for r in mgr.checkpoints]
    return {"start": start, "names": names, "warnings": [str(w.message) for w in caught]}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sharded") / "run"
    run(_sharded_save, 2, str(directory), timeout=90)
    return directory


@pytest.mark.parametrize("damage", ["delete rank 1's shard", "flip a byte of rank 0's shard", "delete .metadata"])
def test_a_lost_or_damaged_shard_file_is_named_and_resume_falls_back(sharded: Path, tmp_path: Path,
                                                                     damage: str) -> None:
    directory = tmp_path / "run"
    shutil.copytree(sharded, directory)
    newest = directory / "ckpt-e000001-s000000000.dcp"
    victim = newest / {"delete rank 1's shard": "__1_0.distcp", "flip a byte of rank 0's shard": "__0_0.distcp",
                       "delete .metadata": ".metadata"}[damage]
    if damage.startswith("delete"):
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 3] ^= 0x01
        victim.write_bytes(bytes(data))
    outs = run(_sharded_resume, 2, str(directory), timeout=90)
    assert [o["start"] for o in outs] == [1, 1]
    assert [o["names"] for o in outs] == [["ckpt-e000000-s000000000.dcp"]] * 2
    named = [w for w in outs[0]["warnings"] if "skipping damaged checkpoint" in w]
    assert len(named) == 1 and str(victim) in named[0], outs[0]["warnings"]
    assert (directory / "ckpt-e000001-s000000000.dcp.corrupt").is_dir()  # kept, not deleted
