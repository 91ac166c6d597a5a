"""Asynchronous saves (``async_save=True``): one in flight, index and retention only at
commit, errors never lost, flush on close and at exit, staging reused and released, and
a SIGKILL during a background write loses nothing committed."""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch
from helpers import reap, spawn

from ckpt import CheckpointManager, ConfigError, StorageError
from ckpt.format import torchfile as fileio
from ckpt.storage import local as storage

WRITER = "ckpt-writer"


def writer_threads() -> int:
    return sum(t.name == WRITER for t in threading.enumerate())


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """fsync on the background writer blocks until the event is set (the commit is held
    before its rename); the number of writer threads alive is recorded at each fsync."""
    release = threading.Event()
    release.alive_at_fsync = []  # type: ignore[attr-defined]
    real = os.fsync

    def fsync(fd: int) -> None:
        if threading.current_thread().name == WRITER:
            release.alive_at_fsync.append(writer_threads())  # type: ignore[attr-defined]
            release.wait()
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return release


def set_when_blocked(event: threading.Event) -> None:
    """Set ``event`` once this thread is blocked joining the writer (no sleeps to guess)."""
    waiter = threading.get_ident()

    def watch() -> None:
        while not event.is_set():
            frame = sys._current_frames().get(waiter)
            where = set()
            while frame is not None:
                where.add(Path(frame.f_code.co_filename).name)
                frame = frame.f_back
            if {"writer.py", "threading.py"} <= where:
                event.set()
            time.sleep(0.001)

    threading.Thread(target=watch, daemon=True).start()


def fail_replace_in_writer(monkeypatch: pytest.MonkeyPatch, times: int = 1) -> None:
    """The background writer's next ``times`` renames fail with a full disk."""
    real = os.replace
    left = [times]

    def replace(src, dst) -> None:  # noqa: ANN001
        if threading.current_thread().name == WRITER and left[0] > 0:
            left[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def weights(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_save_returns_before_the_commit_and_the_index_changes_only_at_commit(
        run_dir: Path, trainables: Callable, gate: threading.Event) -> None:
    mgr = CheckpointManager(run_dir, async_save=True, keep_last=1, **trainables())
    first = mgr.save(epoch=0)
    gate.set()
    mgr.wait()
    gate.clear()
    second = mgr.save(epoch=1)
    assert (second.size, second.checksum) == (0, None)  # pending
    assert [r.epoch for r in mgr.checkpoints] == [0] and first.path.exists()  # no retention yet
    assert not second.path.exists()
    assert [r.epoch for r in CheckpointManager(run_dir).checkpoints] == [0]  # index unchanged
    gate.set()
    mgr.wait()
    committed = mgr.latest  # the record is frozen: the committed one replaces the pending one
    assert committed.key == second.key and (second.size, second.checksum) == (0, None)
    assert committed.size == second.path.stat().st_size and committed.checksum.startswith("crc32:")
    assert [r.epoch for r in mgr.checkpoints] == [1] and not first.path.exists()
    assert mgr.verify() == {second.path.name: "ok"}
    mgr.close()


def test_one_save_in_flight_the_next_waits_and_says_so(
        run_dir: Path, trainables: Callable, gate: threading.Event, caplog: pytest.LogCaptureFixture) -> None:
    mgr = CheckpointManager(run_dir, async_save=True, **trainables())
    mgr.save(epoch=0)
    set_when_blocked(gate)
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        mgr.save(epoch=1)  # blocks until epoch 0 is committed
    assert [r.epoch for r in mgr.checkpoints] == [0]
    assert "waited" in caplog.text and "epoch 0, step 0" in caplog.text
    mgr.close()
    assert [r.epoch for r in CheckpointManager(run_dir).checkpoints] == [0, 1]
    assert set(gate.alive_at_fsync) == {1}  # type: ignore[attr-defined]


def test_training_after_save_does_not_leak_into_the_checkpoint(
        run_dir: Path, trainables: Callable, gate: threading.Event) -> None:
    t = trainables()
    t.step()
    mgr = CheckpointManager(run_dir, async_save=True, **t)
    extra = {"history": [1.0], "t": torch.zeros(2)}
    record = mgr.save(epoch=0, extra=extra)
    saved = weights(t["model"])
    saved_avg = t["optimizer"].state_dict()["state"][0]["exp_avg"].clone()
    t.step()  # in place, while the commit is held
    extra["history"].append(2.0)
    extra["t"].add_(1)
    gate.set()
    mgr.close()
    obj = torch.load(record.path, weights_only=True)
    assert all(torch.equal(obj["model"][k], v) for k, v in saved.items())
    assert torch.equal(obj["optimizer"]["state"][0]["exp_avg"], saved_avg)
    assert obj["extra"]["history"] == [1.0] and torch.equal(obj["extra"]["t"], torch.zeros(2))
    assert record.extra["history"] == [1.0] and torch.equal(record.extra["t"], torch.zeros(2))


def test_training_right_after_a_steady_state_save_does_not_leak_into_it(
        run_dir: Path, trainables: Callable, gate: threading.Event) -> None:
    """The second save of the same state takes the staging's steady path (buffers reused)."""
    t = trainables()
    t.step()
    mgr = CheckpointManager(run_dir, async_save=True, **t)
    mgr.save(epoch=0)
    gate.set()
    mgr.wait()
    gate.clear()
    t.step()
    record = mgr.save(epoch=1)
    saved, saved_avg = weights(t["model"]), t["optimizer"].state_dict()["state"][0]["exp_avg"].clone()
    t.step()  # in place, at once, while the commit is held
    assert not all(torch.equal(v, saved[k]) for k, v in weights(t["model"]).items())
    gate.set()
    mgr.close()
    obj = torch.load(record.path, weights_only=True)
    assert all(torch.equal(obj["model"][k], v) for k, v in saved.items())
    assert torch.equal(obj["optimizer"]["state"][0]["exp_avg"], saved_avg)


def test_a_background_error_is_raised_by_wait_once_and_changes_nothing(
        run_dir: Path, trainables: Callable, monkeypatch: pytest.MonkeyPatch, snapshot: Callable) -> None:
    mgr = CheckpointManager(run_dir, async_save=True, keep_last=1, **trainables())
    mgr.save(epoch=0)
    mgr.wait()
    before = snapshot(run_dir)
    fail_replace_in_writer(monkeypatch)
    mgr.save(epoch=1)
    mgr.refresh()  # waits for the commit but leaves its error to wait()
    with pytest.raises(StorageError, match="No space left") as info:
        mgr.wait()
    assert "background save of epoch 1, step 0" in "\n".join(getattr(info.value, "__notes__", [""]))
    assert snapshot(run_dir) == before  # no partial or temporary file, index as it was
    mgr.wait()  # raised once, not forever
    mgr.save(epoch=1)
    mgr.close()
    assert [r.epoch for r in CheckpointManager(run_dir).checkpoints] == [1]


def test_a_background_error_is_raised_by_the_next_save(
        run_dir: Path, trainables: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(run_dir, async_save=True, **trainables())
    fail_replace_in_writer(monkeypatch)
    mgr.save(epoch=0)
    with pytest.raises(StorageError, match="No space left"):
        mgr.save(epoch=1)  # not written: the caller learns of the failure first
    assert writer_threads() == 0 and mgr.checkpoints == []
    mgr.save(epoch=1)
    mgr.close()
    assert [r.epoch for r in CheckpointManager(run_dir).checkpoints] == [1]


def test_close_raises_a_pending_error_and_still_closes(
        run_dir: Path, trainables: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(run_dir, async_save=True, **trainables())
    fail_replace_in_writer(monkeypatch)
    mgr.save(epoch=0)
    with pytest.raises(StorageError, match="No space left"):
        mgr.close()
    assert mgr._engine.writer.stager.nbytes == 0
    with pytest.raises(StorageError, match="closed"):
        mgr.save(epoch=1)
    mgr.close()  # idempotent, and the error is not raised twice


def test_close_flushes_and_releases_the_staging_buffers(
        run_dir: Path, trainables: Callable, gate: threading.Event) -> None:
    mgr = CheckpointManager(run_dir, async_save=True, **trainables())
    record = mgr.save(epoch=0)
    staged = mgr._engine.writer.stager.nbytes
    assert staged >= sum(v.nelement() * v.element_size() for v in mgr.trackables["model"].state_dict().values())
    set_when_blocked(gate)
    mgr.close()
    assert mgr.latest.checksum is not None and mgr._engine.writer.stager.nbytes == 0
    assert CheckpointManager(run_dir).verify() == {record.path.name: "ok"}


def test_staging_buffers_are_reused_across_saves(run_dir: Path, trainables: Callable) -> None:
    t = trainables()
    t.step()
    with CheckpointManager(run_dir, async_save=True, **t) as mgr:
        mgr.save(epoch=0)
        buffers = {k: b.data_ptr() for k, b in mgr._engine.writer.stager._buffers.items()}
        t.step()
        mgr.save(epoch=1)
        assert {k: b.data_ptr() for k, b in mgr._engine.writer.stager._buffers.items()} == buffers
    restored = trainables(seed=1)
    assert CheckpointManager(run_dir, **restored).resume() == 2
    assert all(torch.equal(restored.weights()[k], v) for k, v in t.weights().items())


def test_one_writer_thread_serves_every_save_and_ends_with_close(
        run_dir: Path, trainables: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread is started once, not per save (save() waited for each new one to be
    scheduled), idles between saves under another name, and ends when the manager closes."""
    writers: List[threading.Thread] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if threading.current_thread().name == WRITER:
            writers.append(threading.current_thread())
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    mgr = CheckpointManager(run_dir, async_save=True, **trainables())
    for epoch in range(3):
        mgr.save(epoch=epoch)
        mgr.wait()
        assert writer_threads() == 0  # idle between saves
    assert len(writers) >= 3 and len(set(writers)) == 1
    mgr.close()
    writers[0].join(timeout=30)
    assert not writers[0].is_alive()
    assert [r.epoch for r in CheckpointManager(run_dir).checkpoints] == [0, 1, 2]


def test_the_context_manager_flushes(run_dir: Path, trainables: Callable) -> None:
    with CheckpointManager(run_dir, async_save=True, **trainables()) as mgr:
        mgr.save(epoch=0, metrics={"loss": 1.0})
    assert [(r.epoch, r.metrics) for r in CheckpointManager(run_dir).checkpoints] == [(0, {"loss": 1.0})]


def test_async_save_must_be_a_bool(run_dir: Path) -> None:
    with pytest.raises(ConfigError, match="async_save"):
        CheckpointManager(run_dir, async_save="yes")


# -- real processes --------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, torch
    from ckpt import CheckpointManager
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])  # ~8 MiB
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 512)).sum().backward()
    opt.step()  # Adam state: ~25 MiB per checkpoint in all
    mgr = CheckpointManager(sys.argv[1], model=model, optimizer=opt, keep_last=2, async_save=True)
    start = mgr.resume()
    SETUP
    for epoch in range(start, start + int(sys.argv[2])):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(epoch)
        mgr.save(epoch=epoch, extra={"epoch": epoch})
        if epoch > start:
            print("committed", epoch - 1, flush=True)  # save() returned: the previous one is in
""")


def run_child(directory: Path, epochs: int, setup: str = "pass") -> subprocess.Popen:
    """Save ``epochs`` epochs asynchronously, then exit without wait() or close()."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = CHILD.replace("SETUP", setup)
    return subprocess.Popen([sys.executable, "-c", code, str(directory), str(epochs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def check_directory(directory: Path) -> List[int]:
    """Everything listed loads, verifies and holds its own epoch; no temporary file left."""
    mgr = CheckpointManager(directory)
    assert not [n for n in os.listdir(directory) if n.startswith(storage.TMP_PREFIX)]
    assert set(mgr.verify().values()) <= {"ok"}
    for record in mgr.checkpoints:
        obj = fileio.load(record.path, checksum=record.checksum)
        assert obj["extra"] == {"epoch": record.epoch}
        assert all(bool((v == record.epoch).all()) for v in obj["model"].values())
    return [r.epoch for r in mgr.checkpoints]


@pytest.mark.slow
def test_sigkill_during_async_writes_loses_nothing_committed(tmp_path: Path, seed: int) -> None:
    directory = tmp_path / "run"
    rng = random.Random(seed)
    reported = -1
    for _ in range(4):
        child = run_child(directory, 10_000)
        for seen, line in enumerate(child.stdout, start=1):
            reported = max(reported, int(line.split()[1]))
            if seen >= 2:
                break
        time.sleep(rng.uniform(0, 0.05))  # land anywhere in the next background write
        child.send_signal(signal.SIGKILL)
        child.wait()
        listed = check_directory(directory)
        assert reported in listed, (reported, listed, child.stderr.read())
    assert reported >= 4


@pytest.mark.slow
def test_interpreter_exit_flushes_the_save_in_flight(tmp_path: Path) -> None:
    child = run_child(tmp_path / "run", 3)  # exits right after the last save() returns
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert check_directory(tmp_path / "run") == [1, 2]


@pytest.mark.slow
def test_an_error_nobody_collected_is_logged_at_exit(tmp_path: Path) -> None:
    fail = ("import os, errno; os.replace = lambda *a: "
            "(_ for _ in ()).throw(OSError(errno.ENOSPC, 'No space left on device'))")
    child = run_child(tmp_path / "run", 1, setup=fail)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0
    assert "background save of epoch 0, step 0" in err and "FAILED" in err and "No space left" in err


@pytest.mark.parametrize("child_does", ["exit", "close"])
def test_a_child_forked_during_a_save_exits(child_does: str) -> None:
    """The exit, and the writer's wait/close (a ``with CheckpointManager`` left in the
    child), wait for the saves in flight of this process, not for its parent's: a child
    forked while the parent's writer thread was busy has no such thread."""
    script = textwrap.dedent("""
        import os, signal, sys, threading, time
        from ckpt.background.writer import AsyncWriter, _Worker
        release = threading.Event()
        worker = _Worker()
        worker.run(release.wait)        # the parent's save, in flight at the fork
        writer = AsyncWriter("run")
        writer.start("epoch 0, step 0", release.wait)
        pid = os.fork()
        if pid == 0:
            if sys.argv[1] == "close":
                assert not writer.busy()
                writer.close()          # must not wait for the parent's save
            sys.exit(0)                 # the child's normal exit: must not wait for it
        deadline, done = time.monotonic() + 30, (0, 0)
        while done == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
            done = os.waitpid(pid, os.WNOHANG)
        if done == (0, 0):                  # still there: it hung in its exit
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        print("child", "hung" if done == (0, 0) else f"exited {os.waitstatus_to_exitcode(done[1])}")
        release.set()
        worker.join()
        writer.close()
    """)
    (out,) = reap(spawn(script, child_does), timeout=60)
    assert "child exited 0" in out, out
