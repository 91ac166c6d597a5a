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

from pathlib import Path
from typing import Iterator, List

import pytest
import torch
from dist_harness import run
from test_races import DEADLINE, SIZE, _quarantined, writer_process

from ckpt import CheckpointManager

pytestmark = pytest.mark.slow

READS = 25  # resumes per rank (the bound; no timing is asserted)


@pytest.fixture
def evicting(tmp_path: Path) -> Iterator[Path]:
    """A writer process saving a new epoch in a loop with keep_last=2; stopped and reaped."""
    with writer_process(tmp_path, "evict") as directory:
        yield directory


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
