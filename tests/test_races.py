"""Real races between processes (issue 11 items 3 and 4), bounded in time.

A writer process overwrites or evicts checkpoints in a loop while this process reads
the same directory in a loop. A good file must never be moved aside as damaged, and no
raw torch ``RuntimeError`` may escape a read: a file replaced meanwhile is re-checked
under the lock, a file deleted meanwhile is skipped (resume falls back).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
import torch

import ckpt
from ckpt import CheckpointManager

pytestmark = pytest.mark.slow

WRITER = r"""
import sys, time, torch
from pathlib import Path
from ckpt import CheckpointManager
directory, mode, stop = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
model = torch.nn.Linear(int(sys.argv[4]), int(sys.argv[4]))
mgr = CheckpointManager(directory, model=model, keep_last=2, progress=False)
i = 1
while not stop.exists():
    with torch.no_grad():
        model.weight.add_(1.0)  # new bytes every save
    if mode == "overwrite":
        mgr.save(epoch=0, overwrite=True)
    else:
        mgr.save(epoch=i)
    i += 1
    (directory.parent / "saves").write_text(str(i))
"""

SIZE = 384          # a 600 kB file: reading it takes long enough for the writer to act
READS = 60          # reader iterations per test (the bound; no timing is asserted)
DEADLINE = 120.0    # generous: a loaded machine only makes the loops slower


@contextmanager
def writer_process(tmp_path: Path, mode: str) -> Iterator[Path]:
    """A writer process saving in ``mode`` (see WRITER) into ``tmp_path/run``; always
    stopped and reaped. Also used by test_dist_races.py."""
    directory, stop = tmp_path / "run", tmp_path / "stop"
    with CheckpointManager(directory, model=torch.nn.Linear(SIZE, SIZE), progress=False) as first:
        first.save(epoch=0)  # something to read from the start
    source = str(Path(ckpt.__file__).resolve().parent.parent)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), mode, str(stop), str(SIZE)],
                            cwd=source, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (tmp_path / "saves").exists() or proc.poll() is not None)
        assert proc.poll() is None, f"writer failed to start: {proc.stderr.read() if proc.stderr else ''}"
        yield directory
        assert proc.poll() is None, f"writer died: {proc.stderr.read() if proc.stderr else ''}"
    finally:
        stop.touch()
        try:
            proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
def writer(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """Start the writer process in ``request.param`` mode; always stopped and reaped."""
    with writer_process(tmp_path, request.param) as directory:
        yield directory


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the writer process made no progress")
        time.sleep(0.01)


def _quarantined(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir() if ".corrupt" in p.name)


@contextmanager
def _reader(directory: Path) -> Iterator[CheckpointManager]:
    """A manager on the directory the writer changes (its warnings about files replaced
    or gone meanwhile are expected), closed after."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with CheckpointManager(directory, model=torch.nn.Linear(SIZE, SIZE), progress=False) as mgr:
            yield mgr


@pytest.mark.parametrize("writer", ["overwrite"], indirect=True)
def test_a_reader_resuming_while_a_writer_overwrites_never_quarantines_a_good_file(writer: Path) -> None:
    for _ in range(READS):
        with _reader(writer) as mgr:
            assert mgr.resume() == 1
            assert mgr.verify() == {"ckpt-e000000-s000000000.pt": "ok"}  # replaced, not damaged
        assert _quarantined(writer) == []


@pytest.mark.parametrize("writer", ["evict"], indirect=True)
def test_a_reader_resuming_listing_and_verifying_while_a_writer_evicts(writer: Path) -> None:
    for _ in range(READS):
        with _reader(writer) as mgr:
            # each may find its file evicted meanwhile: it falls back, never a raw RuntimeError
            assert mgr.resume() >= 1
            report = mgr.verify()
            assert set(report.values()) <= {"ok"}, report
            assert all(r.epoch >= 0 for r in mgr.refresh())
        assert _quarantined(writer) == []


def _save_from_threads(mgr: CheckpointManager, threads: int, saves: int) -> List[BaseException]:
    errors: List[BaseException] = []

    def save_many(thread: int) -> None:
        try:
            for step in range(saves):
                mgr.save(epoch=0, step=thread * 100 + step, mid_epoch=True)
                mgr.refresh()
        except BaseException as e:  # collected: a thread's exception is otherwise lost
            errors.append(e)

    running = [threading.Thread(target=save_many, args=(t,)) for t in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    return errors


@pytest.mark.parametrize("async_save", [False, True])
def test_four_threads_saving_at_once_lose_no_save(tmp_path: Path, async_save: bool) -> None:
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(8, 8), async_save=async_save, progress=False)
    try:
        assert _save_from_threads(mgr, threads=4, saves=5) == []
    finally:
        mgr.close()
    expected = sorted((0, t * 100 + s) for t in range(4) for s in range(5))
    assert [r.key for r in CheckpointManager(tmp_path).checkpoints] == expected
