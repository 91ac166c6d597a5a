"""The index journal and the writer's book: a save reads nothing when no other writer
committed, readers replay the journal, anything odd is rebuilt from the files."""

from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path
from typing import Dict

import pytest
import torch

from ckpt import CheckpointManager, schema
from ckpt.catalog import Catalog, book, history, index
from ckpt.policy import RetentionPolicy
from ckpt.storage import LocalStore
from ckpt.storage import local as storage
from ckpt.verdicts import MissingFilesWarning


@pytest.fixture
def journal_always(monkeypatch):
    """Journal from the first commit (normally only once the snapshot passes 64 KiB)."""
    monkeypatch.setattr(book, "JOURNAL_MIN", 0)


class CountingStore(LocalStore):
    """A real local store that counts directory listings and whole-file reads."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.calls: Dict[str, int] = {"list": 0, "read_bytes": 0}

    def list(self, prefix: str = "") -> Dict[str, int]:
        self.calls["list"] += 1
        return super().list(prefix)

    def read_bytes(self, name: str) -> bytes:
        self.calls["read_bytes"] += 1
        return super().read_bytes(name)


def checkpoint(epoch: int, loss: float) -> schema.Checkpoint:
    return schema.build({"model": {"w": torch.full((2,), float(epoch))}}, epoch=epoch, step=0,
                        mid_epoch=False, metrics={"loss": loss}, rng={}, extra={}, library_version="test")


def fresh_names(directory: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean journal reads without any warning
        return [r.name for r in Catalog(LocalStore(directory)).scan().records]


def journal_lines(directory: Path):
    path = directory / index.JOURNAL_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_save_reads_and_lists_nothing_when_no_other_writer_committed(tmp_path, journal_always):
    store = CountingStore(tmp_path / "run")
    catalog = Catalog(store)
    catalog.open()
    retention = RetentionPolicy(keep_last=3)
    catalog.commit(checkpoint(0, 1.0), retention=retention)  # first commit after open: nothing read again
    opened = dict(store.calls)
    for epoch in range(1, 8):
        catalog.commit(checkpoint(epoch, 1.0), retention=retention)
    assert store.calls == opened  # seven commits, no listing and no index read
    assert fresh_names(store.directory) == [schema.file_name(e, 0) for e in (5, 6, 7)]


def _past_a_tick(directory: Path, probe: Path) -> None:
    """Wait until the filesystem's (coarse) clock has moved past ``directory``'s mtime, so
    that a change made now shows in it."""
    while True:
        probe.touch()
        if probe.stat().st_mtime_ns > directory.stat().st_mtime_ns:
            return


def test_its_own_background_deletes_send_no_commit_to_a_scan_but_a_hand_deletion_does(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "RECLAIM_MIN", 1)  # every evicted file is freed in the background
    released, real_unlink = threading.Event(), os.unlink

    def late(path, *a, **k):  # the background unlink lands after the commit has returned
        if threading.current_thread().name == "ckpt-reclaim":
            assert released.wait(60)
        return real_unlink(path, *a, **k)
    monkeypatch.setattr(os, "unlink", late)
    store = CountingStore(tmp_path / "run")
    catalog = Catalog(store)
    catalog.open()
    retention = RetentionPolicy(keep_last=2)
    catalog.commit(checkpoint(0, 1.0), retention=retention)
    opened = dict(store.calls)
    for epoch in range(1, 6):
        released.clear()
        catalog.commit(checkpoint(epoch, 1.0), retention=retention)  # evicts epoch - 2 from 2 on
        _past_a_tick(store.directory, tmp_path / "probe")
        released.set()
        store.flush()
    assert store.calls == opened  # the evicted files' unlinks changed nothing the book watches
    _past_a_tick(store.directory, tmp_path / "probe")
    os.unlink(store.directory / schema.file_name(5, 0))  # by hand: the index still lists it
    with pytest.warns(MissingFilesWarning):
        _, kept = catalog.commit(checkpoint(6, 1.0), retention=retention)
    assert store.calls["list"] == opened["list"] + 1  # seen: the directory was scanned again
    assert [r.epoch for r in kept] == [4, 6]
    assert fresh_names(store.directory) == [schema.file_name(e, 0) for e in (4, 6)]


def test_the_journal_holds_one_json_line_per_commit_and_readers_replay_it(tmp_path, journal_always):
    run = tmp_path / "run"
    model = torch.nn.Linear(2, 2)
    mgr = CheckpointManager(run, keep_best=2, monitor="loss", model=model)
    for epoch, loss in enumerate([5.0, 1.0, 3.0, 0.5, 4.0]):
        mgr.save(epoch=epoch, metrics={"loss": loss})
        lines = journal_lines(run)
        size = (run / index.JOURNAL_NAME).stat().st_size if lines else 0
        assert size <= (run / index.INDEX_NAME).stat().st_size  # folded in once it outgrows the snapshot
        assert fresh_names(run) == [r.name for r in mgr.checkpoints]
    assert [r.epoch for r in mgr.checkpoints] == [1, 3, 4]  # best two and the newest
    every = [line for line in journal_lines(run)]
    assert every and all(set(line) == {"add", "drop"} for line in every)
    again = CheckpointManager(run, keep_best=2, monitor="loss", model=torch.nn.Linear(2, 2))
    assert [(r.name, r.checksum, r.metrics) for r in again.checkpoints] == \
        [(r.name, r.checksum, r.metrics) for r in mgr.checkpoints]


def test_a_torn_last_journal_line_is_ignored_and_never_extended(tmp_path, journal_always):
    run = tmp_path / "run"
    mgr = CheckpointManager(run, model=torch.nn.Linear(2, 2))
    for epoch in range(3):
        mgr.save(epoch=epoch)
    before = fresh_names(run)
    with open(run / index.JOURNAL_NAME, "ab") as f:
        f.write(b'{"add":[{"file":"ckpt-e000009')  # a crash mid-append
    assert fresh_names(run) == before
    mgr2 = CheckpointManager(run, model=torch.nn.Linear(2, 2))
    mgr2.save(epoch=3)
    assert fresh_names(run) == before + [schema.file_name(3, 0)]
    raw = index.read_raw(LocalStore(run))
    assert raw.journal is None or raw.journal.endswith(b"\n")  # rewritten, not appended after the tear


def test_an_odd_journal_line_rebuilds_the_index_from_the_files(tmp_path, journal_always):
    run = tmp_path / "run"
    mgr = CheckpointManager(run, model=torch.nn.Linear(2, 2))
    for epoch in range(3):
        mgr.save(epoch=epoch)
    with open(run / index.JOURNAL_NAME, "ab") as f:
        f.write(b'{"add":[{"file":"ckpt-e000000-s000000000.pt","epoch":7}],"drop":[]}\n')
    with pytest.warns(UserWarning, match="index unreadable"):
        names = [r.name for r in Catalog(LocalStore(run)).scan().records]
    assert names == [schema.file_name(e, 0) for e in range(3)]


def test_a_journal_without_its_snapshot_is_rebuilt(tmp_path, journal_always):
    run = tmp_path / "run"
    mgr = CheckpointManager(run, model=torch.nn.Linear(2, 2))
    for epoch in range(3):
        mgr.save(epoch=epoch)
    (run / index.INDEX_NAME).unlink()
    (run / index.JOURNAL_NAME).write_bytes(index.encode_line([], []))
    with pytest.warns(UserWarning, match="without its snapshot"):
        names = [r.name for r in Catalog(LocalStore(run)).scan().records]
    assert names == [schema.file_name(e, 0) for e in range(3)]


def test_a_writer_sees_another_writers_commits(tmp_path, journal_always):
    run = tmp_path / "run"
    a, b = Catalog(LocalStore(run)), Catalog(LocalStore(run))
    a.open(), b.open()
    retention = RetentionPolicy(keep_last=2)
    for epoch in range(6):
        writer = a if epoch % 2 == 0 else b
        _, kept = writer.commit(checkpoint(epoch, 1.0), retention=retention)
        assert [r.epoch for r in kept] == [e for e in (epoch - 1, epoch) if e >= 0]
    assert fresh_names(run) == [schema.file_name(e, 0) for e in (4, 5)]
    assert sorted(p.name for p in run.glob("ckpt-e*")) == [schema.file_name(e, 0) for e in (4, 5)]


def test_a_small_index_stays_one_plain_json_file(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep_last=2, model=torch.nn.Linear(2, 2))
    for epoch in range(5):
        mgr.save(epoch=epoch)
    assert not (run / index.JOURNAL_NAME).exists()
    data = json.loads((run / index.INDEX_NAME).read_text())
    assert [e["epoch"] for e in data["checkpoints"]] == [3, 4]
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [storage.LOCK_NAME, index.INDEX_NAME, history.HISTORY_NAME, schema.file_name(3, 0), schema.file_name(4, 0)])
