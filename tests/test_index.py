"""The JSON index: round trip, and rebuilding it from the self-describing files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import record_data_offset

import ckpt
from ckpt import CheckpointManager, record
from ckpt import schema as format
from ckpt.catalog import Catalog, history, index
from ckpt.format import torchfile as fileio
from ckpt.io.checksum import file_checksum
from ckpt.record import CheckpointRecord
from ckpt.storage import LocalStore
from ckpt.storage import local as storage

FOREIGN = {"notes.txt": b"my notes", "model.pt": b"not ours", "ckpt-e1.pt.bak": b"backup",
           "ckpt-e000001-s000000000.pt.corrupt": b"kept damaged", "ckpt-e000002-s000000000.pth": b"x",
           "CKPT-E000003-S000000000.PT": b"y", "ckpt-e000004-s000000000.pt~": b"z"}


def write_checkpoint(directory: Path, epoch: int, step: int = 0, metrics=None, mid_epoch=False) -> CheckpointRecord:
    """One real checkpoint file, committed the way the manager commits it (no index)."""
    checkpoint = format.build({"model": {"w": torch.full((3,), float(epoch))}}, epoch=epoch, step=step,
                              mid_epoch=mid_epoch, metrics=dict(metrics or {}), rng={}, extra={"e": epoch},
                              library_version="test")
    written = fileio.write(LocalStore(directory), checkpoint.name, checkpoint.obj, nbytes=checkpoint.nbytes,
                           progress=False)
    return record.make(checkpoint.header, directory / written.name, size=written.size, checksum=written.checksum)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return storage.prepare_directory(tmp_path / "run")


@pytest.fixture
def three(directory):
    return [write_checkpoint(directory, 0, 10, {"loss": 0.5}),
            write_checkpoint(directory, 1, 20, {"loss": float("nan"), "acc": float("inf")}),
            write_checkpoint(directory, 1, 25, {}, mid_epoch=True)]


def reconcile_quietly(directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Catalog(LocalStore(directory)).scan()[:2]


def same(a, b) -> bool:
    """Records equal in every index field (NaN metrics compare equal through JSON)."""
    return json.dumps([r.to_json() for r in a]) == json.dumps([r.to_json() for r in b])


def test_index_is_human_readable_json_with_every_field(directory, three):
    index.write(LocalStore(directory), list(reversed(three)))
    data = json.loads((directory / index.INDEX_NAME).read_text())
    assert data["format"] == index.INDEX_VERSION
    entry = data["checkpoints"][0]  # sorted by (epoch, step), whatever the input order
    assert entry == {"file": "ckpt-e000000-s000000010.pt", "epoch": 0, "step": 10, "mid_epoch": False,
                     "metrics": {"loss": 0.5}, "size": three[0].path.stat().st_size,
                     "checksum": file_checksum(three[0].path), "time": three[0].time}
    assert [e["step"] for e in data["checkpoints"]] == [10, 20, 25]
    assert "\n" in (directory / index.INDEX_NAME).read_text()  # indented, one field per line


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity, which are not JSON (jq, JavaScript, Go reject them)."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_index_round_trip_keeps_nan_and_inf_metrics(directory, three):
    index.write(LocalStore(directory), three)
    data = strict_json((directory / index.INDEX_NAME).read_text())
    assert data["checkpoints"][1]["metrics"] == {"loss": "nan", "acc": "inf"}
    back = index.read(LocalStore(directory), index.read_raw(LocalStore(directory)))
    assert same(back, three)
    assert math.isnan(back[1].metrics["loss"]) and back[1].metrics["acc"] == math.inf


def test_missing_index_is_rebuilt_from_the_files(directory, three):
    assert index.read(LocalStore(directory), index.read_raw(LocalStore(directory))) is None
    records, changed = Catalog(LocalStore(directory)).scan()[:2]
    assert changed
    assert same(records, three)  # epoch, step, metrics (NaN too), size, checksum, time, mid_epoch


@pytest.mark.parametrize("damage", [
    b"", b"{not json", b"[1, 2]", b'{"checkpoints": 5}', b'{"checkpoints": [{"epoch": 1}]}', b"\xff\xfe\x00",
])
def test_garbage_index_warns_and_is_rebuilt(directory, three, damage):
    (directory / index.INDEX_NAME).write_bytes(damage)
    with pytest.warns(UserWarning, match="index unreadable"):
        records, changed = Catalog(LocalStore(directory)).scan()[:2]
    assert changed and same(records, three)


def test_torn_index_is_rebuilt(directory, three):
    index.write(LocalStore(directory), three)
    text = (directory / index.INDEX_NAME).read_bytes()
    (directory / index.INDEX_NAME).write_bytes(text[: len(text) // 2])
    with pytest.warns(UserWarning, match="index unreadable"):
        records, _ = Catalog(LocalStore(directory)).scan()[:2]
    assert same(records, three)


def test_entries_whose_file_is_gone_are_dropped_with_a_warning(directory, three):
    index.write(LocalStore(directory), three)
    three[1].path.unlink()
    with pytest.warns(UserWarning, match="missing on disk.*ckpt-e000001-s000000020.pt"):
        records, _ = Catalog(LocalStore(directory)).scan()[:2]
    assert same(records, [three[0], three[2]])


def test_files_without_an_entry_are_added(directory, three):
    index.write(LocalStore(directory), three[:1])
    records, changed = Catalog(LocalStore(directory)).scan()[:2]
    assert changed and same(records, three)


def test_index_that_matches_the_files_is_not_rewritten(directory, three):
    index.write(LocalStore(directory), three)
    assert Catalog(LocalStore(directory)).scan()[:2][1] is False


def test_unreadable_unindexed_file_is_skipped_and_left_in_place(directory, three):
    index.write(LocalStore(directory), three)
    bad = directory / format.file_name(7, 0)
    bad.write_bytes(b"garbage, not a zip archive")
    with pytest.warns(UserWarning, match="ckpt-e000007-s000000000.pt.*unreadable"):
        records, _ = Catalog(LocalStore(directory)).scan()[:2]
    assert same(records, three)
    assert bad.read_bytes() == b"garbage, not a zip archive"


def test_foreign_files_are_never_listed(directory, three):
    for name, data in FOREIGN.items():
        (directory / name).write_bytes(data)
    (directory / format.file_name(9, 0)).mkdir()  # a directory with a checkpoint's name
    records, _ = reconcile_quietly(directory)
    assert same(records, three)


def test_index_entries_naming_foreign_files_are_ignored(directory, three):
    index.write(LocalStore(directory), three)
    data = json.loads((directory / index.INDEX_NAME).read_text())
    for name in ["notes.txt", "../outside.pt", "model.pt"]:
        data["checkpoints"].append({**data["checkpoints"][0], "file": name, "epoch": 9})
    (directory / index.INDEX_NAME).write_text(json.dumps(data))
    (directory / "notes.txt").write_bytes(b"mine")
    records, _ = reconcile_quietly(directory)
    assert same(records, three)


def test_manager_never_touches_foreign_files(tmp_path, trainables, snapshot):
    directory = tmp_path / "run"
    directory.mkdir()
    for name, data in FOREIGN.items():
        (directory / name).write_bytes(data)
    objs = trainables()
    with CheckpointManager(directory, keep_last=1, **objs) as mgr:
        for epoch in range(3):
            mgr.save(epoch=epoch)
        assert [r.epoch for r in mgr.checkpoints] == [2]
        mgr.restore("latest")
        mgr.verify()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CheckpointManager(directory, keep_last=1, **objs).resume()
    files = snapshot(directory)
    assert {n: files[n] for n in FOREIGN} == FOREIGN
    assert set(files) - set(FOREIGN) == {storage.LOCK_NAME, index.INDEX_NAME, history.HISTORY_NAME,
                                              format.file_name(2, 0)}


def test_manager_rebuilds_and_rewrites_a_lost_index(run_dir, trainables):
    objs = trainables()
    with CheckpointManager(run_dir, **objs) as mgr:
        mgr.save(epoch=0, metrics={"loss": 1.0})
        mgr.save(epoch=1, metrics={"loss": 0.5})
        before = json.loads((run_dir / index.INDEX_NAME).read_text())
    (run_dir / index.INDEX_NAME).unlink()
    mgr = CheckpointManager(run_dir, **objs)
    assert [r.metrics for r in mgr.checkpoints] == [{"loss": 1.0}, {"loss": 0.5}]
    assert json.loads((run_dir / index.INDEX_NAME).read_text()) == before


# -- anything odd in the index: rebuilt from the files (issue 11 item 10) ------------------

def _run_with_index(directory: Path, content: bytes) -> None:
    with CheckpointManager(directory, model=torch.nn.Linear(4, 2)) as mgr:
        mgr.save(epoch=0)
        mgr.save(epoch=1)
    (directory / "ckpt-index.json").write_bytes(content)


@pytest.mark.parametrize("content", [
    b'{"format": 1, "checkpoints": [{"file": "ckpt-e000000-s000000000.pt", "epoch": Infinity}]}',
    b'{"format": 1, "checkpoints": [{"file": "ckpt-e000000-s000000000.pt", "epoch": NaN}]}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"format": 1, "checkpoints": ["ckpt-e000000-s000000000.pt"]}',
    b'{"format": 1, "checkpoints": [[1, 2]]}',
    b'{"format": 1, "checkpoints": [null]}',
], ids=["infinity", "nan", "deep", "string-entry", "list-entry", "null-entry"])
def test_an_odd_index_is_rebuilt_from_the_files(tmp_path: Path, content: bytes) -> None:
    _run_with_index(tmp_path, content)
    with pytest.warns(UserWarning, match="index"):
        mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2))
    assert [r.epoch for r in mgr.checkpoints] == [0, 1]
    assert mgr.resume() == 2


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_an_index_that_is_not_a_regular_file_is_rebuilt_without_hanging(tmp_path: Path, kind: str) -> None:
    _run_with_index(tmp_path, b"")
    where = tmp_path / "ckpt-index.json"
    where.unlink()
    if kind == "fifo":
        os.mkfifo(where)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", where)
    else:
        where.mkdir()
    # runs in a child with a generous deadline: a hang fails the test instead of the suite
    code = ("import sys, torch, warnings; warnings.simplefilter('ignore'); from ckpt import CheckpointManager; "
            "print([r.epoch for r in CheckpointManager(sys.argv[1], model=torch.nn.Linear(4, 2)).checkpoints])")
    source = str(Path(ckpt.__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=source, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[0, 1]"


def test_a_null_checksum_does_not_turn_integrity_off(tmp_path: Path) -> None:
    _run_with_index(tmp_path, b"")
    (tmp_path / "ckpt-index.json").unlink()
    with CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2)):
        pass  # index rewritten from the files
    entries = json.loads((tmp_path / "ckpt-index.json").read_text())
    for entry in entries["checkpoints"]:
        entry["checksum"] = None
    (tmp_path / "ckpt-index.json").write_text(json.dumps(entries))
    newest = tmp_path / "ckpt-e000001-s000000000.pt"
    data = bytearray(newest.read_bytes())
    at = record_data_offset(newest, "archive/data/0") + 5  # inside the first tensor's bytes
    data[at] ^= 0x01
    newest.write_bytes(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(4, 2))
        assert mgr.resume() == 1  # the flipped bit is caught: falls back to epoch 0
