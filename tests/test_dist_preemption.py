"""Preemption across ranks (real gloo ranks, tests/dist_harness.py): SIGTERM one rank by PID.

Every rank's should_save() turns true at the same step, every rank saves that same
(epoch, step) in one collective save, and every rank raises Preempted with 143.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, List

import pytest
import torch
from dist_harness import launch

pytestmark = pytest.mark.slow


def _loop(rank: int, world: int, directory: str) -> dict:
    from ckpt import CheckpointManager, Preempted

    model = torch.nn.Linear(2, 2)
    mgr = CheckpointManager(directory, model=model, preemption=True, collective_timeout=20)
    deadline = time.monotonic() + 40
    first_true = None
    step = 0
    try:
        while time.monotonic() < deadline:
            step += 1
            if rank == 1 and step == 20:  # far enough in: the parent may signal this rank now
                Path(directory, "pid1").write_text(str(os.getpid()))
            time.sleep(0.002)
            if mgr.should_save(step=step):
                first_true = step if first_true is None else first_true
                mgr.save_if_preempted(epoch=0, step=step)
    except Preempted as e:
        return {"code": e.code, "saved": (e.record.epoch, e.record.step), "first_true": first_true,
                "signal": e.signum}
    mgr.close()
    return {"code": None, "steps": step}


def _signal_rank1(directory: Path, stop: threading.Event) -> None:
    pid_file = directory / "pid1"
    while not stop.is_set():
        if pid_file.exists() and pid_file.read_text():
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
            return
        time.sleep(0.05)


def _run_signalling_rank1(fn: Callable[[int, int, str], dict], tmp_path: Path) -> List[dict]:
    """Run ``fn`` on 2 ranks while rank 1 is sent SIGTERM by PID; each rank's result."""
    stop = threading.Event()
    killer = threading.Thread(target=_signal_rank1, args=(tmp_path, stop), daemon=True)
    killer.start()
    try:
        outs = launch(fn, 2, str(tmp_path), timeout=90)
    finally:
        stop.set()
        killer.join(timeout=5)
    for out in outs:
        assert out.error is None, out.traceback
    return [o.value for o in outs]


def test_sigterm_to_one_rank_preempts_every_rank_at_the_same_step(tmp_path: Path) -> None:
    got = _run_signalling_rank1(_loop, tmp_path)
    assert [g["code"] for g in got] == [143, 143], got
    assert got[0]["saved"] == got[1]["saved"] and got[0]["first_true"] == got[1]["first_true"], got
    assert got[0]["saved"][1] == got[0]["first_true"]  # saved at the step should_save said
    saved = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt-e"))
    assert saved == [f"ckpt-e000000-s{got[0]['saved'][1]:09d}.pt"]


def _readme_loop(rank: int, world: int, directory: str) -> dict:
    """The README's cadence loop: ``if should_save(): save(mid_epoch=True)``; the save ends the run."""
    from ckpt import CheckpointManager, Preempted

    mgr = CheckpointManager(directory, model=torch.nn.Linear(2, 2), preemption=True, collective_timeout=20)
    deadline = time.monotonic() + 40
    step = 0
    try:
        while time.monotonic() < deadline:
            step += 1
            if rank == 1 and step == 20:
                Path(directory, "pid1").write_text(str(os.getpid()))
            time.sleep(0.002)
            if mgr.should_save(step=step):
                mgr.save(epoch=0, step=step, mid_epoch=True)
    except Preempted as e:
        return {"code": e.code, "saved": (e.record.epoch, e.record.step)}
    mgr.close()
    return {"code": None, "steps": step}


def test_the_readme_cadence_loop_ends_every_rank_after_one_save(tmp_path: Path) -> None:
    got = _run_signalling_rank1(_readme_loop, tmp_path)
    assert [g["code"] for g in got] == [143, 143] and got[0]["saved"] == got[1]["saved"], got
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("ckpt-e")]) == 1
