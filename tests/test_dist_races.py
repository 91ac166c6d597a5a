"""The collective resume against a real concurrent writer (real gloo ranks, bounded in time).

Both engines resume through one loop (``ckpt.resume.newest_valid``): newest valid first,
a checkpoint replaced or deleted meanwhile looked up again in a fresh listing, damage
quarantined, then the fallback. Here the collective engine resumes, over and over, from
a directory that a writer process keeps saving into and evicting from (``keep_last=2``):
a checkpoint evicted under rank 0's choice is looked up again, not taken for damage
(nothing is moved aside), and every resume finds a checkpoint.

With two ranks, the other rank reads the file after rank 0 chose it; a writer that
replaces or deletes it in between (a hook in rank 1's process acts as that writer, at
that moment, through the catalog's own lock and index) makes every rank choose again:
all resume from the same checkpoint, a few times at most, then all raise together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest
import torch
from dist_harness import launch, run
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


# -- two ranks: the chosen file replaced or deleted between rank 0's choice and rank 1's read --

WIDTH = 4


def _concurrent_writer(directory: Path, name: str, mode: str, fill: float) -> None:
    """What another job writing into the run directory does, through ckpt's own commit
    transaction under the writers' lock: delete ``name`` (evicted: out of the index, then
    the file), or replace it by a checkpoint of the same (epoch, step) with other weights."""
    from ckpt import schema, state
    from ckpt._version import __version__
    from ckpt.catalog import Catalog
    from ckpt.policy import RetentionPolicy
    from ckpt.storage.local import LocalStore

    cat = Catalog(LocalStore(directory))
    epoch, step = schema.parse_name(name) or (0, 0)
    if mode == "delete":
        with cat.store.lock(commit=True):
            records = cat.scan(locked=True).records
            cat.retain([r for r in records if r.name != name], RetentionPolicy())
            cat.store.delete(name)
        return
    model = torch.nn.Linear(WIDTH, WIDTH)
    with torch.no_grad():
        model.weight.fill_(fill)
    checkpoint = schema.build({"model": model.state_dict()}, epoch=epoch, step=step, mid_epoch=False, metrics={},
                              rng=state.capture_rng(), extra={}, library_version=__version__)
    cat.commit(checkpoint, retention=RetentionPolicy(), overwrite=True)


def _resume_with_a_writer_at_rank1s_read(rank: int, world: int, directory: str, mode: str) -> Tuple[Any, ...]:
    """Resume on every rank; on rank 1, the writer acts as it is about to read the file
    rank 0 chose (once, or at every read: ``mode`` ends in ``-always``)."""
    import warnings

    import ckpt.engine.restoring as restoring

    real, fired = restoring.load, []

    def load(mgr: Any, record: Any, direct: bool = False) -> Any:
        if rank == 1 and (not fired or mode.endswith("-always")):
            fired.append(record.name)
            _concurrent_writer(Path(directory), record.name, mode.removesuffix("-always"), 7.0 + len(fired))
        return real(mgr, record, direct)

    restoring.load = load  # rank 1's process only: the real load runs, on the real files
    model = torch.nn.Linear(WIDTH, WIDTH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the choice made again is reported as a warning
        with CheckpointManager(directory, model=model, progress=False, collective_timeout=60) as mgr:
            start = mgr.resume()
            names = [r.name for r in mgr.checkpoints]
    return start, float(model.weight.mean()), fired, names


@pytest.fixture
def three_epochs(tmp_path: Path) -> Path:
    """Epochs 0, 1, 2, each model's weights filled with its epoch number."""
    model = torch.nn.Linear(WIDTH, WIDTH)
    with CheckpointManager(tmp_path / "run", model=model, progress=False) as mgr:
        for epoch in range(3):
            with torch.no_grad():
                model.weight.fill_(float(epoch))
            mgr.save(epoch=epoch)
    return tmp_path / "run"


def test_every_rank_chooses_again_when_the_chosen_file_is_deleted_before_a_rank_reads_it(
        three_epochs: Path) -> None:
    got = run(_resume_with_a_writer_at_rank1s_read, 2, str(three_epochs), "delete", timeout=DEADLINE)
    assert got[1][2] == ["ckpt-e000002-s000000000.pt"]  # the writer acted once, at rank 1's read
    assert [(start, weight) for start, weight, _, _ in got] == [(2, 1.0), (2, 1.0)]  # both resumed epoch 1
    assert got[0][3] == got[1][3] == ["ckpt-e000000-s000000000.pt", "ckpt-e000001-s000000000.pt"]
    assert _quarantined(three_epochs) == []


def test_every_rank_chooses_again_when_the_chosen_file_is_replaced_before_a_rank_reads_it(
        three_epochs: Path) -> None:
    got = run(_resume_with_a_writer_at_rank1s_read, 2, str(three_epochs), "replace", timeout=DEADLINE)
    assert got[1][2] == ["ckpt-e000002-s000000000.pt"]
    assert [(start, weight) for start, weight, _, _ in got] == [(3, 8.0), (3, 8.0)]  # both: the new bytes
    assert _quarantined(three_epochs) == []


def test_a_file_replaced_at_every_read_fails_every_rank_after_a_few_passes(three_epochs: Path) -> None:
    from ckpt import CorruptCheckpointError
    from ckpt.resume import RESUME_PASSES

    outcomes = launch(_resume_with_a_writer_at_rank1s_read, 2, str(three_epochs), "replace-always",
                      timeout=DEADLINE)
    assert isinstance(outcomes[1].error, CorruptCheckpointError), outcomes[1].traceback
    assert isinstance(outcomes[0].error, CorruptCheckpointError), outcomes[0].traceback  # rank 1's, rebuilt
    assert outcomes[0].error.rank == 1 and "failed on rank 1: " in str(outcomes[0].error)
    assert _quarantined(three_epochs) == []  # the other rank's failure is not damage: nothing moved aside
    model = torch.nn.Linear(WIDTH, WIDTH)
    with CheckpointManager(three_epochs, model=model, progress=False) as mgr:
        assert mgr.resume() == 3
    assert float(model.weight.mean()) == 7.0 + RESUME_PASSES  # replaced once per pass: all chose again each time
