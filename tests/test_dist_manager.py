"""CheckpointManager under a real gloo process group (tests/dist_harness.py): DDP and FSDP2.

Rank functions are module-level so the rank processes can unpickle them; each returns
small plain values for the parent to assert on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_harness import kill_self, launch, run
from helpers import equal, fsdp_mlp, full_state
from test_real_failures import PAGE, fill, tmpfs  # noqa: F401 - tmpfs is a fixture

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------- DDP


def _ddp_run(rank: int, world: int, directory: str, epochs: int, kill_at: tuple | None,
             mid: bool, async_save: bool = False) -> dict:
    """Train a tiny DDP model with dropout (so each rank's RNG matters) over a
    ResumableSampler; SIGKILL every rank right after the save at ``kill_at``
    (``async_save``: that save may be committed or not, resume is exact either way)."""
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, TensorDataset

    from ckpt import CheckpointManager, ResumableSampler

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(22, 4, generator=gen), torch.randn(22, 1, generator=gen))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    model = DDP(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(100 + rank)  # every rank its own dropout masks
    sampler = ResumableSampler(data, seed=1)
    loader = DataLoader(data, batch_size=3, sampler=sampler)
    mgr = CheckpointManager(directory, model=model, optimizer=opt, sampler=sampler, keep_last=2,
                            collective_timeout=30, async_save=async_save)
    start = mgr.resume()
    step = mgr.step
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = F.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if mid and kill_at == (epoch, step):
                mgr.save(epoch=epoch, step=step, mid_epoch=True)
                kill_self()
        mgr.save(epoch=epoch, step=step)
        if not mid and kill_at == (epoch, step):
            kill_self()
    mgr.wait()  # async_save: the last save committed on every rank
    names = [r.name for r in mgr.checkpoints]
    mgr.close()
    return {"params": [p.detach().clone() for p in net.parameters()], "rng": torch.rand(3),
            "len": len(sampler), "checkpoints": names}


@pytest.mark.parametrize("mid", [False, True], ids=["end-of-epoch", "mid-epoch"])
def test_ddp_run_killed_and_resumed_ends_bit_identical(tmp_path: Path, mid: bool) -> None:
    epochs = 3
    straight = run(_ddp_run, 2, str(tmp_path / "straight"), epochs, None, mid, timeout=120)
    assert straight[0]["len"] == 11  # 22 samples over 2 ranks
    kill_at = (1, 4 + 2) if mid else (1, 8)  # 4 batches per rank per epoch
    outs = launch(_ddp_run, 2, str(tmp_path / "killed"), epochs, kill_at, mid, timeout=120)
    assert all(o.killed for o in outs), [(o.exitcode, o.error) for o in outs]
    resumed = run(_ddp_run, 2, str(tmp_path / "killed"), epochs, kill_at, False, timeout=120)
    for a, b in zip(straight, resumed):
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))
        assert torch.equal(a["rng"], b["rng"])
    assert not torch.equal(straight[0]["rng"], straight[1]["rng"])  # each rank kept its own stream
    assert resumed[0]["checkpoints"] == resumed[1]["checkpoints"] == straight[0]["checkpoints"]
    assert straight[0]["checkpoints"] == ["ckpt-e000001-s000000008.pt", "ckpt-e000002-s000000012.pt"]
    # rank 0's file, today's format: plain torch.load, every rank's RNG inside
    obj = torch.load(tmp_path / "straight" / straight[0]["checkpoints"][-1], weights_only=True)
    assert len(obj["ckpt"]["rng_per_rank"]) == 2 and obj["rng"]["torch"].equal(obj["ckpt"]["rng_per_rank"][0]["torch"])


def _skipper(rank: int, world: int, directory: str) -> str:
    import torch.distributed as dist

    from ckpt import CheckpointManager, CollectiveTimeoutError

    mgr = CheckpointManager(directory, model=torch.nn.Linear(2, 2), collective_timeout=3)
    result = "returned"
    if rank != 1:
        try:
            mgr.save(epoch=0)
        except CollectiveTimeoutError as e:
            result = f"timeout: {e}"
    dist.barrier()  # the training group: rank 1 "forgot" save() and went on training
    return result


def test_a_rank_that_skips_save_makes_the_others_fail_in_bounded_time(tmp_path: Path) -> None:
    outs = run(_skipper, 3, str(tmp_path), timeout=60)
    for out in (outs[0], outs[2]):
        assert out.startswith("timeout: save() timed out after 3 s") and "ranks [1] did not arrive" in out
    assert not any(p.name.startswith("ckpt-e") for p in tmp_path.iterdir())


def _rank0_fails(rank: int, world: int, directory: str) -> str:
    from ckpt import CheckpointManager

    mgr = CheckpointManager(directory, model=torch.nn.Linear(2, 2), collective_timeout=20)
    try:  # a value torch.load(weights_only=True) cannot read: only rank 0 builds the file
        mgr.save(epoch=0, extra={"x": object()} if rank == 0 else {"x": 1})
    except Exception as e:  # noqa: BLE001 - the test reports what each rank raised
        return f"{type(e).__name__}: {e}"
    return "returned"


def test_a_failed_commit_on_rank_0_raises_on_every_rank(tmp_path: Path) -> None:
    leader, other = run(_rank0_fails, 2, str(tmp_path), timeout=60)
    assert leader.startswith("ConfigError")
    # every rank raises rank 0's own error type (tests/test_dist_rank_errors.py checks its fields)
    assert other.startswith("ConfigError: save() of epoch 0, step 0 (commit) failed on rank 0: ")
    assert other.split("failed on rank 0: ", 1)[1] == leader.split(": ", 1)[1]


def _ddp_restore(rank: int, world: int, directory: str) -> list:
    import torch.distributed as dist

    from ckpt import CheckpointManager

    model = torch.nn.Linear(2, 2)
    mgr = CheckpointManager(directory, model=model, collective_timeout=20)
    weights = []
    for epoch in range(2):
        torch.nn.init.constant_(model.weight, float(epoch))
        weights.append(model.weight.detach().clone())
        mgr.save(epoch=epoch)
    plain = Path(directory).parent / "plain.pt"
    if rank == 0:
        torch.save({"model": {"weight": torch.full((2, 2), 7.0), "bias": torch.zeros(2)}}, plain)
    dist.barrier()
    got = [mgr.restore(0).epoch, torch.equal(model.weight, weights[0])]
    got += [mgr.restore("latest").epoch, torch.equal(model.weight, weights[1])]
    mgr.restore(plain)
    got += [float(model.weight[0, 0]), [r.name for r in mgr.checkpoints]]
    mgr.close()
    return got


def test_restore_is_collective_by_epoch_latest_and_path(tmp_path: Path) -> None:
    outs = run(_ddp_restore, 2, str(tmp_path / "run"), timeout=60)
    names = ["ckpt-e000000-s000000000.pt", "ckpt-e000001-s000000000.pt"]
    assert outs[0] == outs[1] == [0, True, 1, True, 7.0, names]


def test_sampler_shards_like_distributed_sampler() -> None:
    from torch.utils.data import DistributedSampler

    from ckpt import ResumableSampler

    for n, world, drop in [(10, 3, False), (10, 3, True), (7, 2, False), (4, 4, False)]:
        for rank in range(world):
            mine = ResumableSampler(n, seed=5, num_replicas=world, rank=rank, drop_last=drop)
            theirs = DistributedSampler(range(n), num_replicas=world, rank=rank, seed=5, drop_last=drop)
            assert list(mine) == list(theirs) and len(mine) == len(theirs)
    parts = [list(ResumableSampler(9, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(9))


def test_sampler_resumes_a_replica_mid_epoch() -> None:
    from ckpt import ResumableSampler

    a = ResumableSampler(10, seed=2, num_replicas=2, rank=1)
    it = iter(a)
    first = [next(it) for _ in range(2)]
    b = ResumableSampler(10, seed=2, num_replicas=2, rank=1)
    b.load_state_dict(a.state_dict())
    b.set_epoch(0)
    assert first + list(b) == a.order() and b.remaining == 0
    with pytest.raises(ValueError, match="num_replicas=3"):
        ResumableSampler(10, seed=2, num_replicas=3, rank=1).load_state_dict(a.state_dict())


# --------------------------------------------------------------------- FSDP2 (sharded)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model(torch.randn(3, 4, generator=gen)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _fsdp_save(rank: int, world: int, directory: str, epochs: int) -> dict:
    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, 0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mgr = CheckpointManager(directory, model=model, optimizer=opt, scheduler=sched, keep_last=2,
                            collective_timeout=30)
    for epoch in range(epochs):
        _step(model, opt, epoch)
        sched.step()
        rec = mgr.save(epoch=epoch, metrics={"loss": float(epoch)})
    names = [r.name for r in mgr.checkpoints]
    mgr.close()
    full = full_state(model, opt)  # collective: every rank gathers
    return {"full": full if rank == 0 else None, "names": names, "size": rec.size,
            "lr": sched.get_last_lr()}


def _fsdp_resume(rank: int, world: int, directory: str) -> dict:
    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, 1)  # other weights: all must come from the checkpoint
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mgr = CheckpointManager(directory, model=model, optimizer=opt, scheduler=sched, collective_timeout=30)
    start = mgr.resume()
    out = {"start": start, "full": full_state(model, opt), "lr": sched.get_last_lr(),
           "verify": mgr.verify() if rank == 0 else None}
    mgr.close()
    return out


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    directory = tmp_path_factory.mktemp("fsdp")
    outs = run(_fsdp_save, 2, str(directory), 3, timeout=120)
    return directory, outs


def test_sharded_save_through_the_manager_is_a_retained_directory(sharded_run: tuple) -> None:
    directory, outs = sharded_run
    names = ["ckpt-e000001-s000000000.dcp", "ckpt-e000002-s000000000.dcp"]
    assert outs[0]["names"] == outs[1]["names"] == names  # keep_last=2: epoch 0's directory deleted whole
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith("ckpt-e")) == names
    assert not [p for p in directory.iterdir() if p.name.startswith(".ckpt-tmp")]
    assert outs[0]["size"] == sum(p.stat().st_size for p in (directory / names[-1]).rglob("*") if p.is_file())


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_checkpoint_resumes_through_the_manager_at_any_world_size(sharded_run: tuple, tmp_path: Path,
                                                                          world: int) -> None:
    import shutil

    directory, saved = sharded_run
    copy_dir = tmp_path / "run"
    shutil.copytree(directory, copy_dir)
    outs = run(_fsdp_resume, world, str(copy_dir), timeout=120)
    for out in outs:
        assert out["start"] == 3 and out["lr"] == saved[0]["lr"]
    assert equal(outs[0]["full"], saved[0]["full"])  # the full state is gathered on rank 0
    assert outs[0]["verify"] == {"ckpt-e000001-s000000000.dcp": "ok", "ckpt-e000002-s000000000.dcp": "ok"}


def test_sharded_checkpoint_resumes_in_a_plain_process_without_a_process_group(sharded_run: tuple,
                                                                              tmp_path: Path) -> None:
    import shutil

    from ckpt import CheckpointManager

    directory, saved = sharded_run
    shutil.copytree(directory, tmp_path / "run")
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mgr = CheckpointManager(tmp_path / "run", model=model, optimizer=opt, scheduler=sched)
    with pytest.warns(UserWarning, match="RNG states of 2 ranks, this run has 1"):
        assert mgr.resume() == 3
    assert sched.get_last_lr() == saved[0]["lr"]
    assert equal(model.state_dict(), dict(saved[0]["full"]["model"]))
    assert mgr.resumed is not None and mgr.resumed.metrics == {"loss": 2.0}
    mgr.close()


def test_a_damaged_sharded_checkpoint_is_skipped_and_moved_aside(sharded_run: tuple, tmp_path: Path) -> None:
    import shutil

    directory, _ = sharded_run
    shutil.copytree(directory, tmp_path / "run")
    shard = next((tmp_path / "run" / "ckpt-e000002-s000000000.dcp").glob("__1_*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    outs = run(_fsdp_resume, 2, str(tmp_path / "run"), timeout=120)  # rank 0 warns, in its stderr
    assert [o["start"] for o in outs] == [2, 2]  # epoch 1's, the newest that verifies
    assert outs[0]["verify"] == {"ckpt-e000001-s000000000.dcp": "ok"}
    assert (tmp_path / "run" / "ckpt-e000002-s000000000.dcp.corrupt").is_dir()


_RESUME_PAST_BAD_MANIFESTS = """
import json, os, shutil, sys, warnings, torch
from pathlib import Path
from ckpt import CheckpointManager
from ckpt.catalog import index

source, scratch = Path(sys.argv[1]), Path(sys.argv[2])
good = json.loads((source / "ckpt-e000002-s000000000.dcp" / "ckpt-manifest.json").read_text())
variants = {"version-string": json.dumps({**good, "version": "1"}).encode(),
            "files-list": json.dumps({**good, "files": list(good["files"])}).encode(),
            "deep": b"[" * 100000 + b"]" * 100000, "fifo": None}
for kind, content in variants.items():
    for indexed in (True, False):
        run = scratch / f"{kind}-{indexed}"
        shutil.copytree(source, run)
        manifest = run / "ckpt-e000002-s000000000.dcp" / "ckpt-manifest.json"
        manifest.unlink()
        os.mkfifo(manifest) if content is None else manifest.write_bytes(content)
        if not indexed:  # the index lost: the directory is read to be adopted, and must not be
            for name in (index.INDEX_NAME, index.JOURNAL_NAME):
                (run / name).unlink(missing_ok=True)
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mgr = CheckpointManager(run, model=model, optimizer=opt, scheduler=sched)
            start = mgr.resume()
        names = sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt-e"))
        damaged = any("damaged" in str(w.message) and "ckpt-manifest.json" in str(w.message) for w in caught)
        print(kind, "indexed" if indexed else "unindexed", start, *names, damaged)
"""


def test_a_malformed_or_fifo_manifest_is_damage_that_resume_skips(sharded_run: tuple, tmp_path: Path) -> None:
    """Indexed (resume verifies it) or not (opening adopts unindexed directories): a bad
    manifest is moved aside as damage and resume takes the previous checkpoint. In a child
    with a deadline, so that a FIFO that blocks hangs one process, not the suite."""
    directory, _ = sharded_run
    proc = subprocess.run([sys.executable, "-c", _RESUME_PAST_BAD_MANIFESTS, str(directory), str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rest = "2 ckpt-e000001-s000000000.dcp ckpt-e000002-s000000000.dcp.corrupt True"
    assert proc.stdout.splitlines() == [f"{kind} {how} {rest}" for kind in ("version-string", "files-list", "deep",
                                                                            "fifo") for how in ("indexed", "unindexed")]


def test_export_sharded_is_one_plain_file(sharded_run: tuple, tmp_path: Path) -> None:
    import ckpt

    directory, saved = sharded_run
    out = ckpt.export_sharded(directory / "ckpt-e000002-s000000000.dcp", tmp_path / "full.pt")
    obj = torch.load(out, weights_only=True)
    assert obj["epoch"] == 2 and equal(obj["model"], saved[0]["full"]["model"])
    assert "scheduler" in obj
    from ckpt.cli import main

    assert main(["export", str(directory / "ckpt-e000001-s000000000.dcp"), "--to", str(tmp_path / "e1.pt")]) == 0
    weights = torch.load(tmp_path / "e1.pt", weights_only=True)  # the model's plain state dict
    assert set(weights) == set(obj["model"]) and all(isinstance(v, torch.Tensor) for v in weights.values())
    assert main(["list", str(directory)]) == 0 and main(["verify", str(directory)]) == 0


def _fsdp_killed(rank: int, world: int, directory: str, victim: int) -> str:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, 0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mgr = CheckpointManager(directory, model=model, optimizer=opt, scheduler=sched, collective_timeout=5)
    _step(model, opt, 0)
    mgr.save(epoch=0)
    if rank == victim:
        FileSystemWriter.write_data = lambda self, plan, planner: kill_self()  # type: ignore[method-assign]
    try:
        mgr.save(epoch=1)
    except BaseException as e:  # noqa: BLE001 - the survivors' errors are what the test checks
        return f"{type(e).__name__}: {e}"
    return "returned"


def test_a_rank_killed_mid_save_commits_nothing_and_resume_takes_the_last_complete(tmp_path: Path) -> None:
    outs = launch(_fsdp_killed, 2, str(tmp_path), 1, timeout=120)
    assert outs[1].killed and outs[0].error is None
    assert outs[0].value.startswith(("StorageError", "CollectiveError", "CollectiveTimeoutError")), outs[0].value
    listed = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-e"))
    assert listed == ["ckpt-e000000-s000000000.dcp"]
    outs = run(_fsdp_resume, 2, str(tmp_path), timeout=120)
    assert [o["start"] for o in outs] == [1, 1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt-tmp")]  # leftovers cleaned


# Overwriting a sharded checkpoint: the old directory survives until the new one is committed.
WIDE = 4096  # about 200 KB of shards per rank: a nearly full disk fails in the middle of DCP's writes
DCP_E0 = "ckpt-e000000-s000000000.dcp"


def _fsdp_save_e0(rank: int, world: int, directory: str, seed: int, overwrite: bool, fault: str = "") -> dict:
    """Save epoch 0 of a wide FSDP2 model trained one step from ``seed``; what it raised, if anything."""
    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, seed, hidden=WIDE)
    mgr = CheckpointManager(directory, model=model, optimizer=opt, collective_timeout=30)
    _step(model, opt, seed)

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("this rank cannot capture its state")

    hooks = [model.register_state_dict_pre_hook(refuse)] if fault == "state_dict raises" and rank == 1 else []
    try:
        mgr.save(epoch=0, overwrite=overwrite)
        result = "saved"
    except Exception as e:  # noqa: BLE001 - the test checks what each rank raised
        result = f"{type(e).__name__}: {e}"
    for hook in hooks:
        hook.remove()
    names = [r.name for r in mgr.checkpoints]
    mgr.close()  # after a failed collective every rank skips close()'s barrier alike
    full = full_state(model, opt)  # collective: every rank gathers
    return {"result": result, "names": names, "full": full if rank == 0 else None}


def _resumed_wide(directory: Path) -> dict:
    """Resume ``directory`` in this process (no process group) into a freshly built wide model."""
    import warnings

    from ckpt import CheckpointManager

    torch.manual_seed(99)
    model = torch.nn.Sequential(torch.nn.Linear(4, WIDE), torch.nn.ReLU(), torch.nn.Linear(WIDE, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    mgr = CheckpointManager(directory, model=model, optimizer=opt)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RNG states of 2 ranks")
        assert mgr.resume() == 1
    assert mgr.verify() == {DCP_E0: "ok"}
    mgr.close()
    return model.state_dict()


def _tree(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fault", ["disk full", "state_dict raises"])
def test_a_sharded_overwrite_that_fails_keeps_the_old_directory_indexed_and_loadable(
        request: pytest.FixtureRequest, tmp_path: Path, fault: str) -> None:
    """The overwrite fails while the new directory is written: for real on a full disk (a
    small tmpfs; DCP's writes come up short), or as rank 1's state_dict() raises. The old
    directory must still be there, byte for byte, indexed, and load; then, with the fault
    gone, the overwrite commits and leaves nothing else behind."""
    import json

    directory = (request.getfixturevalue("tmpfs")("16m") if fault == "disk full" else tmp_path) / "run"
    first = run(_fsdp_save_e0, 2, str(directory), 0, False, timeout=120)
    assert [o["result"] for o in first] == ["saved", "saved"]
    before, index_before = _tree(directory / DCP_E0), json.loads((directory / "ckpt-index.json").read_text())
    filler = None
    if fault == "disk full":  # room for the index and the plain entries, not for the shards
        filler = fill(directory.parent, leave=(-(-(directory / DCP_E0 / "ckpt-meta.pt").stat().st_size // PAGE) + 4)
                      * PAGE)

    failed = launch(_fsdp_save_e0, 2, str(directory), 1, True, fault, timeout=120)
    errors = [o.value["result"] for o in failed]
    assert all(e.startswith(("StorageError", "CollectiveError")) for e in errors), errors
    # the full disk as the OS says it, or as torch's zip writer does (its write came up short)
    expected = ("No space left on device", "unexpected pos") if filler else ("cannot capture its state",)
    assert any(m in e for e in errors for m in expected), errors
    assert [o.value["names"] for o in failed] == [[DCP_E0], [DCP_E0]]
    assert _tree(directory / DCP_E0) == before
    assert json.loads((directory / "ckpt-index.json").read_text())["checkpoints"] == index_before["checkpoints"]
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith((".ckpt-tmp", "ckpt-e"))) == [DCP_E0]
    if filler is not None:
        filler.unlink()
    assert equal(_resumed_wide(directory), dict(first[0]["full"]["model"]))

    second = run(_fsdp_save_e0, 2, str(directory), 1, True, timeout=120)
    assert [o["result"] for o in second] == ["saved", "saved"]
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith((".ckpt-tmp", "ckpt-e"))) == [DCP_E0]
    assert equal(_resumed_wide(directory), dict(second[0]["full"]["model"]))
    assert not equal(dict(second[0]["full"]["model"]), dict(first[0]["full"]["model"]))


# ------------------------------------------------------- closing after a failed collective
CLOSE_TIMEOUT = 30  # a close() that waited for a rank that never comes would take this long


def _fail_then_close(rank: int, world: int, directory: str, fault: str, closing: str) -> dict:
    """Save epoch 0, then make one rank fail a collective (``fault``) and close the manager
    as users do: leaving a ``with`` block as the error propagates, or ``close()`` after
    catching it. What each rank raised, how long closing took, and epoch 0's state."""
    import time

    from ckpt import CheckpointManager

    sharded = fault.startswith("sharded")
    if sharded:
        model, opt = fsdp_mlp(world, 0)
    else:
        torch.manual_seed(0)  # only rank 0's state is saved: rank 1's model may differ until it loads
        model = torch.nn.Linear(2, 3 if fault.endswith("other shapes") and rank == 1 else 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"rank {rank} cannot do this")

    def fail(mgr: CheckpointManager) -> None:
        if fault == "sharded save, rank 1's state_dict raises":
            if rank == 1:
                model.register_state_dict_pre_hook(refuse)
            mgr.save(epoch=1)
        elif fault == "replicated save, rank 0's commit fails":  # torch.load(weights_only=True) refuses it
            mgr.save(epoch=1, extra={"x": object()} if rank == 0 else {"x": 1})
        elif fault == "replicated resume, rank 1's model has other shapes":
            mgr.resume()
        else:
            raise AssertionError(fault)

    result, closed = "returned", "closed"
    mgr = CheckpointManager(directory, model=model, optimizer=opt, collective_timeout=CLOSE_TIMEOUT)
    if sharded:
        _step(model, opt, 0)
    mgr.save(epoch=0)
    saved = full_state(model, opt) if sharded else {k: v.clone() for k, v in model.state_dict().items()}
    if closing == "with":
        try:
            with mgr:
                try:
                    fail(mgr)
                finally:
                    started = time.monotonic()  # __exit__ closes from here
        except Exception as e:  # noqa: BLE001 - the save's error, unless close() raised its own
            result = f"{type(e).__name__}: {e}"
    else:
        try:
            fail(mgr)
        except Exception as e:  # noqa: BLE001 - the test checks what each rank raised
            result = f"{type(e).__name__}: {e}"
        started = time.monotonic()
        try:
            mgr.close()
        except Exception as e:  # noqa: BLE001
            closed = f"{type(e).__name__}: {e}"
    took = time.monotonic() - started
    try:
        mgr.save(epoch=2)
        after = "saved"
    except Exception as e:  # noqa: BLE001
        after = f"{type(e).__name__}: {e}"
    return {"result": result, "closed": closed, "took": took, "after": after,
            "names": [r.name for r in mgr.checkpoints], "saved": saved if rank == 0 else None}


def _resume_fresh(rank: int, world: int, directory: str, sharded: bool) -> dict:
    from ckpt import CheckpointManager

    if sharded:
        model, opt = fsdp_mlp(world, 1)  # other weights: all must come from the checkpoint
    else:
        torch.manual_seed(1)
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with CheckpointManager(directory, model=model, optimizer=opt, collective_timeout=CLOSE_TIMEOUT) as mgr:
        start = mgr.resume()
        names = [r.name for r in mgr.checkpoints]
    state = full_state(model, opt) if sharded else {k: v.clone() for k, v in model.state_dict().items()}
    return {"start": start, "names": names, "state": state if rank == 0 else None}


SHARDED_CAPTURE = (("StorageError: save of ckpt-e000001-s000000000.dcp (capture) failed on rank 1: ",
                    "rank 1 cannot do this"), ("StorageError", "RuntimeError: rank 1 cannot do this"))


@pytest.mark.parametrize(("fault", "closing", "errors"), [  # errors: each rank's (prefix, text in it)
    ("sharded save, rank 1's state_dict raises", "with", SHARDED_CAPTURE),
    ("sharded save, rank 1's state_dict raises", "close()", SHARDED_CAPTURE),
    ("replicated save, rank 0's commit fails", "with",
     (("ConfigError", "object"), ("ConfigError: save() of epoch 1, step 0 (commit) failed on rank 0: ",
                                  "object"))),
    ("replicated resume, rank 1's model has other shapes", "with",
     (("StateMismatchError: load of ckpt-e000000-s000000000.pt failed on rank 1: ",
       "does not fit the model"), ("StateMismatchError", "shape mismatches"))),
])
def test_every_rank_closes_at_once_after_a_failed_collective(tmp_path: Path, fault: str, closing: str,
                                                             errors: tuple) -> None:
    """A collective fails on one rank, so every rank raises; then every rank closes its
    manager. Every rank must take the same path through close() and return at once: none
    may wait in close()'s barrier for a rank that skipped it (until collective_timeout,
    then raising CollectiveTimeoutError over the real error). The run then resumes from
    the last good checkpoint."""
    directory = str(tmp_path / "run")
    outs = run(_fail_then_close, 2, directory, fault, closing, timeout=4 * CLOSE_TIMEOUT)
    for rank, (out, expected) in enumerate(zip(outs, errors)):
        assert out["result"].startswith(expected[0]) and expected[1] in out["result"], (rank, out["result"])
        assert out["closed"] == "closed", (rank, out["closed"])
        assert out["took"] < CLOSE_TIMEOUT / 3, (rank, out["took"])
        assert out["after"].startswith("StorageError") and "CheckpointManager is closed" in out["after"], rank
    e0 = "ckpt-e000000-s000000000" + (".dcp" if fault.startswith("sharded") else ".pt")
    assert [o["names"] for o in outs] == [[e0], [e0]]
    assert sorted(p.name for p in Path(directory).iterdir() if p.name.startswith((".ckpt-tmp", "ckpt-e"))) == [e0]
    fresh = run(_resume_fresh, 2, directory, fault.startswith("sharded"), timeout=120)
    assert [f["start"] for f in fresh] == [1, 1] and [f["names"] for f in fresh] == [[e0], [e0]]
    assert equal(fresh[0]["state"], outs[0]["saved"])


# ------------------------------------------------------------------ the example, torchrun


def _torchrun(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """torchrun in its own process group: on a timeout the agent and every worker are killed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "ddp_train.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_torchrun_runs_the_ddp_example_and_resumes(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    first = _torchrun(["--dir", run_dir, "--epochs", "2"], timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "fresh run" in first.stdout and "epoch 1:" in first.stdout
    again = _torchrun(["--dir", run_dir, "--epochs", "3"], timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at epoch 2" in again.stdout and "epoch 2:" in again.stdout
