"""Concurrency: real processes on one directory.

Two writers save at the same time, and a reader lists and loads while a writer saves.
Commits are serialised by the directory lock and every writer reconciles the index
with the directory under it, so nobody's checkpoint is dropped; readers only ever see
files that were renamed into place after their fsync, and an index that was replaced
atomically, so it is always valid JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from ckpt import CheckpointExistsError, CheckpointManager
from ckpt import schema as format
from ckpt.catalog import index
from ckpt.format import torchfile as fileio
from ckpt.storage import local as storage

PRELUDE = r"""
import json, os, sys, time, warnings
import torch
from ckpt import CheckpointManager, CheckpointNotFoundError
from ckpt.format import torchfile as fileio
from ckpt.storage import local as storage

directory, go = sys.argv[1], sys.argv[2]
warnings.simplefilter("error")  # a warning (say, an unreadable file) is a failure here

def make(**options):
    model = torch.nn.Linear(512, 1024)  # 2 MiB of weights
    return CheckpointManager(directory, model=model, progress=False, **options), model

def wait_for_go():
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
"""

WRITER = PRELUDE + r"""
parity, count, keep_last = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
mgr, model = make(keep_last=None if keep_last == "none" else int(keep_last))
wait_for_go()
for epoch in range(count):
    step = 2 * epoch + parity  # the two writers use distinct (epoch, step) keys
    with torch.no_grad():
        model.weight.fill_(step)
    mgr.save(epoch=epoch, step=step, extra={"step": step})
open(go + ".done", "w").close()
print(json.dumps({"saved": count}))
"""

READER = PRELUDE + r"""
mgr, model = make()
index_path = os.path.join(directory, "ckpt-index.json")
wait_for_go()
stats = {"rounds": 0, "loads": 0, "vanished": 0, "restores": 0}
while not os.path.exists(go + ".done"):  # until the writer has finished
    try:
        with open(index_path, encoding="utf-8") as f:
            json.load(f)  # raises if a reader ever sees a torn index
    except FileNotFoundError:
        continue  # nothing committed yet
    stats["rounds"] += 1
    for record in mgr.refresh():
        assert not record.path.name.startswith(storage.TMP_PREFIX), record.path
        try:
            obj = fileio.load(record.path, checksum=record.checksum)
        except CheckpointNotFoundError:
            assert not record.path.exists()  # evicted by the writer's retention meanwhile
            stats["vanished"] += 1
            continue
        step = obj["step"]
        assert obj["extra"] == {"step": step} and obj["epoch"] == record.epoch, record.path
        assert bool((obj["model"]["weight"] == step).all()), f"{record.path} is not whole"
        stats["loads"] += 1
    if mgr.checkpoints:
        try:
            mgr.restore("latest")
            stats["restores"] += 1
        except CheckpointNotFoundError:
            stats["vanished"] += 1
print(json.dumps(stats))
"""


def start(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: List[subprocess.Popen]) -> List[dict]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"process failed:\n{err[-4000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def wait_until_ready(procs: List[subprocess.Popen], go: Path) -> None:
    """Let the processes import torch and open the directory, then start them together."""
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready", proc.communicate()[1][-4000:]
    go.touch()


def listing(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir() if format.parse_name(p.name))


def assert_index_matches_files(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if p.name.startswith(storage.TMP_PREFIX)]
    indexed = sorted(e["file"] for e in json.loads((directory / index.INDEX_NAME).read_text())["checkpoints"])
    assert indexed == listing(directory)  # no writer dropped another's commits or kept stale ones


@pytest.mark.slow
def test_two_writers_at_once(tmp_path: Path) -> None:
    directory, go, count = tmp_path / "run", tmp_path / "go", 15
    procs = [start(WRITER, directory, go, parity, count, "none") for parity in (0, 1)]
    wait_until_ready(procs, go)
    assert finish(procs) == [{"saved": count}, {"saved": count}]
    assert_index_matches_files(directory)
    mgr = CheckpointManager(directory, model=torch.nn.Linear(512, 1024), progress=False)
    assert [r.step for r in mgr.checkpoints] == list(range(2 * count))
    assert set(mgr.verify().values()) == {"ok"}
    for record in mgr.checkpoints:
        assert bool((fileio.load(record.path)["model"]["weight"] == record.step).all())


@pytest.mark.slow
def test_reader_while_writer_saves(tmp_path: Path) -> None:
    directory, go = tmp_path / "run", tmp_path / "go"
    directory.mkdir()
    writer = start(WRITER, directory, go, 0, 40, 3)
    reader = start(READER, directory, go)
    wait_until_ready([writer, reader], go)
    (written, stats) = finish([writer, reader])
    assert written == {"saved": 40}
    assert stats["loads"] > 0 and stats["rounds"] > 1, stats
    print(f"\nreader while writing: {stats}")
    assert_index_matches_files(directory)
    assert listing(directory) == [format.file_name(e, 2 * e) for e in (37, 38, 39)]


def test_same_key_from_two_managers_is_refused_not_torn(tmp_path: Path) -> None:
    """A second writer of an (epoch, step) another one committed gets a clear error."""
    first = CheckpointManager(tmp_path, model=torch.nn.Linear(4, 4), progress=False)
    second = CheckpointManager(tmp_path, model=torch.nn.Linear(4, 4), progress=False)
    first.save(epoch=0)
    before = (tmp_path / format.file_name(0, 0)).read_bytes()
    with pytest.raises(CheckpointExistsError, match="already exists"):
        second.save(epoch=0)  # its own list is stale; the check under the lock is not
    assert (tmp_path / format.file_name(0, 0)).read_bytes() == before
    second.save(epoch=1)
    assert [r.epoch for r in first.refresh()] == [0, 1]
