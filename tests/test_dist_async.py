"""Asynchronous saves under a real gloo process group (tests/dist_harness.py).

``save()`` returns once the state is staged; the write and the commit run on each
rank's writer thread; ``wait()``/``close()`` are collective. Gates hold a writer
thread where a test needs the save in flight (no timing is asserted).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_harness import kill_self, launch, run
from helpers import equal, fsdp_mlp, full_state
from test_dist_manager import _ddp_run, _fsdp_resume, _fsdp_save, _step
from test_real_failures import PAGE, fill, tmpfs  # noqa: F401 - tmpfs is a fixture

pytestmark = pytest.mark.slow

E0, E1 = "ckpt-e000000-s000000000.pt", "ckpt-e000001-s000000000.pt"


def _hold_writer(rank: int, at: str) -> threading.Event:
    """Hold this rank's writer thread before ``at`` (``"commit"``: rank 0's write and commit;
    ``"collective"``: its first background collective) until the event is set."""
    from ckpt.distributed import collective as cd
    from ckpt.engine import saving

    gate = threading.Event()
    name, module = ("commit", saving) if at == "commit" else ("sync", cd)
    real = getattr(module, name)

    def held(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "ckpt-writer":
            gate.wait(120)
        return real(*args, **kwargs)

    setattr(module, name, held)
    return gate


def test_ddp_async_saves_resume_exactly_like_synchronous_ones(tmp_path: Path) -> None:
    epochs = 3
    sync = run(_ddp_run, 2, str(tmp_path / "sync"), epochs, None, False, False, timeout=120)
    asynchronous = run(_ddp_run, 2, str(tmp_path / "async"), epochs, None, False, True, timeout=120)
    outs = launch(_ddp_run, 2, str(tmp_path / "killed"), epochs, (1, 8), False, True, timeout=120)
    assert all(o.killed for o in outs), [(o.exitcode, o.error) for o in outs]
    resumed = run(_ddp_run, 2, str(tmp_path / "killed"), epochs, None, False, True, timeout=120)
    for a, b, c in zip(sync, asynchronous, resumed):
        assert all(torch.equal(p, q) and torch.equal(p, r) for p, q, r in zip(a["params"], b["params"], c["params"]))
        assert torch.equal(a["rng"], b["rng"]) and torch.equal(a["rng"], c["rng"])  # every rank its own RNG
    assert not torch.equal(sync[0]["rng"], sync[1]["rng"])
    for out in asynchronous + resumed:  # wait(): every rank sees the committed records
        assert out["checkpoints"] == sync[0]["checkpoints"]
    obj = torch.load(tmp_path / "async" / sync[0]["checkpoints"][-1], weights_only=True)
    assert len(obj["ckpt"]["rng_per_rank"]) == 2


def _returns_before_the_write(rank: int, world: int, directory: str) -> dict:
    from ckpt import CheckpointManager

    gate = _hold_writer(rank, "commit")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    mgr = CheckpointManager(directory, model=model, async_save=True, collective_timeout=60)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    pending = mgr.save(epoch=0)
    files = sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("ckpt-e"))
    before = {"files": files, "records": len(mgr.checkpoints), "size": pending.size, "name": pending.name}
    with torch.no_grad():  # training goes on at once: the checkpoint keeps the staged copy
        model.weight.fill_(99.0)
        model.bias.zero_()
    gate.set()
    mgr.wait()
    after = [(r.name, r.size > 0) for r in mgr.checkpoints]
    mgr.close()
    loaded = torch.load(Path(directory) / E0, weights_only=True)["model"] if rank == 0 else None
    return {"before": before, "after": after, "saved": saved, "loaded": loaded}


def test_save_returns_before_the_write_and_training_may_change_the_state(tmp_path: Path) -> None:
    outs = run(_returns_before_the_write, 2, str(tmp_path), timeout=120)
    for out in outs:
        assert out["before"] == {"files": [], "records": 0, "size": 0, "name": E0}  # nothing committed yet
        assert out["after"] == [(E0, True)]
    assert all(torch.equal(outs[0]["loaded"][k], v) for k, v in outs[0]["saved"].items())


def _killed_after_save(rank: int, world: int, directory: str) -> dict:
    from ckpt import CheckpointManager

    mgr = CheckpointManager(directory, model=torch.nn.Linear(4, 4), async_save=True, collective_timeout=30)
    mgr.save(epoch=0)
    mgr.wait()
    if rank == 1:
        _hold_writer(rank, "collective")  # its part never reaches rank 0
    mgr.save(epoch=1)
    if rank == 1:
        kill_self()  # right after save() returned
    try:
        mgr.wait()
        result = "returned"
    except Exception as e:  # noqa: BLE001 - the test checks what rank 0 raised
        result = f"{type(e).__name__}: {e}"
    mgr.close()  # after the failure: no barrier waits for the dead rank
    return {"result": result, "names": [r.name for r in mgr.checkpoints]}


def _resume(rank: int, world: int, directory: str) -> int:
    from ckpt import CheckpointManager

    mgr = CheckpointManager(directory, model=torch.nn.Linear(4, 4), async_save=True, collective_timeout=30)
    start = mgr.resume()
    mgr.close()
    return start


def test_a_rank_killed_after_save_returned_commits_nothing_and_rank_0_raises(tmp_path: Path) -> None:
    outs = launch(_killed_after_save, 2, str(tmp_path), timeout=150)
    assert outs[1].killed and outs[0].ok, outs[0].traceback
    got = outs[0].value
    assert got["result"].startswith(("RankLostError", "CollectiveTimeoutError")), got["result"]
    assert "epoch 1" in got["result"] and "rank 1" in got["result"]  # bounded: the harness deadline
    assert got["names"] == [E0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-e")) == [E0]
    assert run(_resume, 2, str(tmp_path), timeout=120) == [1, 1]  # the previous checkpoint


def _disk_full(rank: int, world: int, directory: str) -> dict:
    from ckpt import CheckpointManager

    mgr = CheckpointManager(directory, model=torch.nn.Linear(64, 64), async_save=True, collective_timeout=30)
    mgr.save(epoch=0)
    mgr.wait()
    filler = fill(Path(directory).parent, leave=PAGE) if rank == 0 else None
    mgr.save(epoch=1)  # returns: the write fails in the background
    outcome = {}
    for call in ("wait", "after"):
        try:
            mgr.wait() if call == "wait" else mgr.save(epoch=2)
            outcome[call] = "returned"
        except Exception as e:  # noqa: BLE001 - the test checks what each rank raised
            outcome[call] = f"{type(e).__name__}: {e}"
        if filler is not None:
            filler.unlink()
            filler = None
    mgr.wait()
    outcome["names"] = [r.name for r in mgr.checkpoints]
    mgr.close()
    return outcome


def test_a_background_write_that_fails_raises_on_every_rank_at_wait(tmp_path: Path, tmpfs) -> None:  # noqa: F811
    directory = tmpfs("4m") / "run"
    outs = run(_disk_full, 2, str(directory), timeout=120)
    assert outs[0]["wait"].startswith("StorageError") and "No space left" in outs[0]["wait"], outs[0]
    assert outs[1]["wait"].startswith("StorageError") and "(commit) failed on rank 0: " in outs[1]["wait"]
    assert "No space left" in outs[1]["wait"]  # rank 0's own error, rebuilt: the same type and text
    for out in outs:  # the next save works, and nothing of the failed one is left
        assert out["after"] == "returned"
        assert out["names"] == [E0, "ckpt-e000002-s000000000.pt"]
    assert not [p for p in directory.iterdir() if p.name.startswith(".ckpt-tmp") or E1 in p.name]


def _fsdp_async(rank: int, world: int, directory: str, epochs: int) -> dict:
    """FSDP2 with async saves; the last one held in flight while training changes the state."""
    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, 0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mgr = CheckpointManager(directory, model=model, optimizer=opt, scheduler=sched, keep_last=2,
                            collective_timeout=30, async_save=True)
    for epoch in range(epochs):
        _step(model, opt, epoch)
        sched.step()
        gate = None
        if epoch == epochs - 1:
            mgr.wait()  # the previous save committed: the gate holds only the last one
            gate = _hold_writer(rank, "collective")
        pending = mgr.save(epoch=epoch, metrics={"loss": float(epoch)})
    assert gate is not None
    last = f"ckpt-e{epochs - 1:06d}-s000000000.dcp"
    in_flight = {"name": pending.name, "size": pending.size, "indexed": last in [r.name for r in mgr.checkpoints],
                 "on_disk": (Path(directory) / last).exists()}
    full = full_state(model, opt)  # the state saved; collective on the training group, beside the writer
    lr = sched.get_last_lr()
    _step(model, opt, 99)  # training goes on while the save is in flight
    gate.set()
    mgr.wait()
    names = [r.name for r in mgr.checkpoints]
    mgr.close()
    return {"full": full if rank == 0 else None, "names": names, "lr": lr, "in_flight": in_flight}


def test_fsdp2_async_saves_are_the_synchronous_ones_and_resume_at_any_world_size(tmp_path: Path) -> None:
    saved = run(_fsdp_async, 2, str(tmp_path / "async"), 3, timeout=180)
    sync = run(_fsdp_save, 2, str(tmp_path / "sync"), 3, timeout=180)
    names = ["ckpt-e000001-s000000000.dcp", "ckpt-e000002-s000000000.dcp"]
    for out in saved:
        assert out["in_flight"] == {"name": names[-1], "size": 0, "indexed": False, "on_disk": False}
        assert out["names"] == names  # after wait(), on every rank
    assert sync[0]["names"] == names and equal(saved[0]["full"], sync[0]["full"])
    assert not [p for p in (tmp_path / "async").iterdir() if p.name.startswith(".ckpt-tmp")]
    for world in (2, 1):
        outs = run(_fsdp_resume, world, str(tmp_path / "async"), timeout=180)
        for out in outs:
            assert out["start"] == 3 and out["lr"] == saved[0]["lr"]
        assert equal(outs[0]["full"], saved[0]["full"])  # the state at save(), not the one after
        assert outs[0]["verify"] == dict.fromkeys(names, "ok")
