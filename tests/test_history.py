"""The metric history (``ckpt-history.jsonl``): every save, evicted ones included,
one short append per commit, torn and foreign lines ignored."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from ckpt import CheckpointManager
from ckpt.catalog import history
from ckpt.catalog.catalog import Catalog
from ckpt.storage.local import LocalStore


def saves(directory: Path, n: int, **options: object) -> CheckpointManager:
    mgr = CheckpointManager(directory, model=torch.nn.Linear(2, 2), **options)  # type: ignore[arg-type]
    for i in range(n):
        mgr.save(epoch=i, step=i * 10, metrics={"loss": 1.0 / (i + 1), "odd": math.nan if i == 1 else 0.0})
    return mgr


def test_every_save_is_kept_with_the_policy_and_lines_do_not_grow(tmp_path: Path) -> None:
    saves(tmp_path, 6, keep_last=2, keep_best=1, monitor="loss", mode="max").close()
    store = LocalStore(tmp_path, create=False)
    entries = history.read(store)
    assert [e.key for e in entries] == [(i, i * 10) for i in range(6)]
    assert len(list(tmp_path.glob("ckpt-e*.pt"))) == 3  # evicted files are gone, their metrics are not
    assert entries[0].metrics["loss"] == 1.0 and math.isnan(entries[1].metrics["odd"])
    assert entries[-1].retention is not None and entries[-1].retention.keep_last == 2
    assert entries[-1].retention.mode == "max" and entries[-1].retention.monitor == "loss"
    lengths = [len(line) for line in (tmp_path / history.HISTORY_NAME).read_bytes().splitlines()]
    assert max(lengths) - min(lengths) < 40 and max(lengths) < 300  # constant per save, however long the run


def test_a_torn_or_foreign_line_is_skipped_and_the_next_append_starts_afresh(tmp_path: Path) -> None:
    mgr = saves(tmp_path, 2)
    path = tmp_path / history.HISTORY_NAME
    with open(path, "ab") as f:
        f.write(b'{"epoch": 5, "step": 5')  # a crash in the middle of an append
    assert len(history.read(LocalStore(tmp_path, create=False))) == 2
    mgr.save(epoch=2, step=20)
    mgr.close()
    with open(path, "ab") as f:
        f.write(b'[1, 2]\n{"epoch": -1, "step": 0}\nnot json\n\xff\xfe\n')
    entries = history.read(LocalStore(tmp_path, create=False))
    assert [e.key for e in entries] == [(0, 0), (1, 10), (2, 20)]


def test_merged_adds_committed_records_the_history_lacks(tmp_path: Path) -> None:
    saves(tmp_path, 3).close()
    store = LocalStore(tmp_path, create=False)
    lines = (tmp_path / history.HISTORY_NAME).read_bytes().splitlines(keepends=True)
    (tmp_path / history.HISTORY_NAME).write_bytes(lines[0])  # a crash after the index, before the append
    records = Catalog(store).scan().records
    merged = history.merged(history.read(store), records)
    assert [e.key for e in merged] == [(0, 0), (1, 10), (2, 20)]
    assert merged[2].metrics["loss"] == pytest.approx(1 / 3) and merged[2].retention is None


def test_a_failed_append_warns_and_the_save_succeeds(tmp_path: Path) -> None:
    (tmp_path / history.HISTORY_NAME).mkdir()  # something in its place that cannot be appended to
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = mgr.save(epoch=0, step=0)
    mgr.close()
    assert rec.path.is_file() and [r.key for r in mgr.checkpoints] == [(0, 0)]
    assert any("metric history" in str(w.message) for w in caught)
    assert history.read(LocalStore(tmp_path, create=False)) == []


def test_last_reads_only_the_tail(tmp_path: Path) -> None:
    saves(tmp_path, 2, keep_last=5).close()
    path = tmp_path / history.HISTORY_NAME
    lines = path.read_bytes()
    path.write_bytes(b'{"epoch": 0, "step": 0}\n' * 20000 + lines + b'{"torn')  # old lines, then ours
    entry = history.last(LocalStore(tmp_path, create=False))
    assert entry is not None and entry.key == (1, 10) and entry.retention is not None
    assert entry.retention.keep_last == 5
    path.write_bytes(b"")
    assert history.last(LocalStore(tmp_path, create=False)) is None
