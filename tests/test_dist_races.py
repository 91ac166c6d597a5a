"""The collective resume against a real concurrent writer (real gloo ranks, bounded in time).

Both engines resume through one loop (``ckpt.resume.newest_valid``): newest valid first,
a checkpoint replaced or deleted meanwhile looked up again in a fresh listing, damage
quarantined, then the fallback. Here the collective engine resumes, over and over, from
a directory that a writer process keeps saving into and evicting from (``keep_last=2``):
a checkpoint evicted under rank 0's choice is looked up again, not taken for damage
(nothing is moved aside), and every resume finds a checkpoint.

One rank, in a real process group: with more, each other rank reads the chosen file
after rank 0 chose it, and a writer that evicts it in between fails that resume on every
rank (a known gap: ranks do not choose again; a run directory has one writer).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import pytest
import torch
from dist_harness import run
from test_races import DEADLINE, SIZE, WRITER, _quarantined, _wait_for

import ckpt
from ckpt import CheckpointManager

pytestmark = pytest.mark.slow

READS = 25  # resumes per rank (the bound; no timing is asserted)


@pytest.fixture
def evicting(tmp_path: Path) -> Iterator[Path]:
    """A writer process saving a new epoch in a loop with keep_last=2; stopped and reaped."""
    directory, stop = tmp_path / "run", tmp_path / "stop"
    with CheckpointManager(directory, model=torch.nn.Linear(SIZE, SIZE), progress=False) as first:
        first.save(epoch=0)
    source = str(Path(ckpt.__file__).resolve().parent.parent)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(directory), "evict", str(stop), str(SIZE)],
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


def _resume_loop(rank: int, world: int, directory: str, reads: int) -> List[int]:
    import warnings

    assert torch.distributed.is_initialized()  # the collective engine, not the local one
    starts = []
    for _ in range(reads):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # files evicted meanwhile are reported as skipped
            with CheckpointManager(directory, model=torch.nn.Linear(SIZE, SIZE), progress=False,
                                   collective_timeout=60) as mgr:
                starts.append(mgr.resume())
    return starts


def test_the_collective_resume_looks_again_when_a_writer_evicts_and_never_quarantines(evicting: Path) -> None:
    [starts] = run(_resume_loop, 1, str(evicting), READS, timeout=DEADLINE * 2)
    assert len(starts) == READS and min(starts) >= 1, starts
    assert _quarantined(evicting) == []
