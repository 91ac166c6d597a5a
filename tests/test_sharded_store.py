"""Sharded checkpoint directories in the run directory: names, listing, deletion, cleanup."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_real_failures import tmpfs  # noqa: F401 - a fixture

import ckpt
from ckpt import CheckpointManager, schema
from ckpt.catalog import index
from ckpt.catalog.sharddir import Overwrite
from ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError
from ckpt.format.shardfiles import MANIFEST, commit, read_manifest
from ckpt.storage.local import TMP_PREFIX, LocalStore, temporary_name


def test_directory_names_share_the_file_stem() -> None:
    assert schema.dir_name(3, 1200) == "ckpt-e000003-s000001200.dcp"
    assert schema.parse_name("ckpt-e000003-s000001200.dcp") == (3, 1200)
    assert schema.parse_name("ckpt-e000003-s000001200.pt") == (3, 1200)
    for other in ("ckpt-e3-s1200.dcp", "ckpt-e000003-s000001200.dcp.corrupt", "ckpt-e000003-s000001200.dcpx"):
        assert schema.parse_name(other) is None
    assert schema.is_sharded("ckpt-e000003-s000001200.dcp") and not schema.is_sharded("ckpt-e000003-s000001200.pt")


def test_local_store_lists_and_deletes_directories_whole(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    d = tmp_path / "ckpt-e000001-s000000000.dcp"
    (d / "sub").mkdir(parents=True)
    (d / "a").write_bytes(b"x" * 10)
    (d / "sub" / "b").write_bytes(b"y" * 5)
    (tmp_path / "ckpt-e000000-s000000000.pt").write_bytes(b"z")
    assert store.list_dirs("ckpt-") == {d.name: 15}
    assert store.list("ckpt-") == {"ckpt-e000000-s000000000.pt": 1}  # files only, as before
    store.delete(d.name)
    assert not d.exists()
    store.delete(d.name)  # gone already: not an error


def test_unfinished_sharded_saves_are_cleaned_at_open(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    tmp = tmp_path / f"{TMP_PREFIX}shard-ckpt-e000001-s000000000.dcp"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"partial")
    assert store.list_dirs() == {}  # never listed
    assert store.clean_temporaries() == [tmp.name]
    assert not tmp.exists()


# -- the manifest reader: whatever ckpt did not write is damage, never a raw error or a hang --

GOOD = {"format": "ckpt-sharded", "version": 1, "world_size": 2, "states": {"model": "module"},
        "files": {"__0_0.distcp": {"size": 3, "crc32": 7}, "ckpt-meta.pt": {"size": 1, "crc32": 0}}}


def _with(**fields: object) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


MALFORMED = {
    "infinity": (_with(world_size=2).replace(b'"world_size": 2', b'"world_size": Infinity'), "not valid JSON"),
    "nan": (_with().replace(b'"size": 3', b'"size": NaN'), "not valid JSON"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "not-utf8": (b'{"format": "\xff"}', "not valid JSON"),
    "truncated": (_with()[:40], "not valid JSON"),
    "array": (b"[]", '"format": "ckpt-sharded"'),
    "other-format": (_with(format="dcp"), '"format": "ckpt-sharded"'),
    "version-string": (_with(version="1"), '"version" is "1"; expected a positive integer'),
    "version-bool": (_with(version=True), '"version" is true; expected a positive integer'),
    "version-missing": (json.dumps({k: v for k, v in GOOD.items() if k != "version"}).encode(), '"version"'),
    "world-size-string": (_with(world_size="2"), '"world_size" is "2"; expected a positive integer'),
    "world-size-zero": (_with(world_size=0), '"world_size" is 0'),
    "states-list": (_with(states=["model"]), '"states" is a JSON array; expected an object'),
    "states-kind": (_with(states={"model": "tensor"}), '"states"\\[\'model\'\\] is "tensor"'),
    "files-list": (_with(files=["__0_0.distcp"]), '"files" is a JSON array; expected an object'),
    "files-null": (_with(files=None), '"files" is null; expected an object'),
    "size-string": (_with(files={"a": {"size": "3", "crc32": 7}}), '"files"\\[\'a\'\\] is a JSON object; expected'),
    "crc-too-big": (_with(files={"a": {"size": 3, "crc32": 1 << 32}}), "expected"),
    "crc-float": (_with(files={"a": {"size": 3, "crc32": 7.0}}), "expected"),
    "entry-list": (_with(files={"a": [3, 7]}), '"files"\\[\'a\'\\] is a JSON array'),
    "outside-parent": (_with(files={"../x": {"size": 1, "crc32": 0}}), "relative to the checkpoint directory"),
    "outside-absolute": (_with(files={"/dev/zero": {"size": 1, "crc32": 0}}), "relative to the checkpoint"),
}


@pytest.mark.parametrize("content, message", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_manifest_is_corrupt_with_the_path_and_what_was_expected(tmp_path: Path, content: bytes,
                                                                             message: str) -> None:
    (tmp_path / MANIFEST).write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=message) as info:
        read_manifest(tmp_path)
    assert info.value.path == str(tmp_path / MANIFEST) and str(tmp_path / MANIFEST) in str(info.value)
    assert "resume skips this checkpoint" in info.value.hint


def test_the_manifest_ckpt_writes_reads_back(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_bytes(_with())
    assert read_manifest(tmp_path) == GOOD
    (tmp_path / MANIFEST).write_bytes(_with(version=2))
    with pytest.raises(FormatVersionError, match="upgrade ckpt"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(CheckpointNotFoundError, match="unfinished save"):
        read_manifest(tmp_path)


_READ_ODD_MANIFEST = """
import os, sys
from pathlib import Path
from ckpt.errors import CorruptCheckpointError
from ckpt.format.shardfiles import MANIFEST, read_manifest, verify_files

directory = Path(sys.argv[1])
(directory / "shard").mkdir()
os.mkfifo(directory / "shard" / "__0_0.distcp")
where = directory / MANIFEST
for kind in ("fifo", "dev-zero", "directory"):
    if kind == "fifo":
        os.mkfifo(where)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", where)
    else:
        where.mkdir()
    try:
        read_manifest(directory)
    except CorruptCheckpointError as e:
        print(kind, e.path == str(where), "expected a regular JSON file" in str(e))
    os.rmdir(where) if kind == "directory" else os.unlink(where)
try:  # a FIFO in place of one of the listed files
    verify_files(directory / "shard", {"files": {"__0_0.distcp": {"size": 0, "crc32": 0}}})
except CorruptCheckpointError as e:
    print("shard-fifo", e.path.endswith("__0_0.distcp"))
"""


def test_a_manifest_that_is_not_a_regular_file_is_corrupt_without_blocking(tmp_path: Path) -> None:
    # in a child with a deadline: a regression hangs one process, not the suite
    proc = subprocess.run([sys.executable, "-c", _READ_ODD_MANIFEST, str(tmp_path)],
                          cwd=Path(ckpt.__file__).resolve().parent.parent, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["fifo True True", "dev-zero True True", "directory True True",
                                        "shard-fifo True"]


# -- overwriting a sharded checkpoint: the old one survives until the new one is committed --

def _directory(path: Path, content: bytes) -> Path:
    path.mkdir()
    (path / "__0_0.distcp").write_bytes(content)
    return path


def test_an_overwritten_directory_left_aside_by_a_crash_is_put_back_at_open(tmp_path: Path) -> None:
    """A crash between the commit's two renames (old name -> aside, new -> old name)
    leaves the old directory only under its aside name: the next open puts it back."""
    store = LocalStore(tmp_path)
    name = schema.dir_name(1, 0)
    aside = _directory(tmp_path / temporary_name(name, "prev-"), b"old")
    _directory(tmp_path / f"{TMP_PREFIX}shard-{name}", b"new, complete but never committed")
    assert store.clean_temporaries() == [f"{TMP_PREFIX}shard-{name}"]
    assert not aside.exists() and (tmp_path / name / "__0_0.distcp").read_bytes() == b"old"
    # once the new one holds the name (a crash after the second rename), the aside copy goes
    aside = _directory(tmp_path / temporary_name(name, "prev-"), b"older")
    assert store.clean_temporaries() == [aside.name]
    assert (tmp_path / name / "__0_0.distcp").read_bytes() == b"old"


def test_commit_puts_the_old_directory_back_when_the_rename_fails(request: pytest.FixtureRequest,
                                                                   tmp_path: Path) -> None:
    """A real failing rename: the new directory is on another file system (EXDEV)."""
    scratch = request.getfixturevalue("tmpfs")("1m")
    final = _directory(tmp_path / "e1", b"old")
    tmp = _directory(scratch / "tmp-e1", b"new")
    aside = tmp_path / "aside-e1"
    with pytest.raises(OSError) as info:
        commit(tmp, final, {"format": "ckpt-sharded"}, aside=aside)
    assert info.value.errno == errno.EXDEV
    assert (final / "__0_0.distcp").read_bytes() == b"old" and not aside.exists()
    assert tmp.is_dir()  # save_sharded removes its scratch directory itself


def test_commit_moves_the_old_directory_aside_and_the_new_one_in(tmp_path: Path) -> None:
    final = _directory(tmp_path / "e1", b"old")
    tmp = _directory(tmp_path / "tmp-e1", b"new")
    manifest = commit(tmp, final, {"format": "ckpt-sharded"}, aside=tmp_path / "aside-e1")
    assert (final / "__0_0.distcp").read_bytes() == b"new" and MANIFEST in {p.name for p in final.iterdir()}
    assert (tmp_path / "aside-e1" / "__0_0.distcp").read_bytes() == b"old" and not tmp.exists()
    assert manifest["files"]["__0_0.distcp"]["size"] == 3


def _indexed(directory: Path) -> list:
    return [e["file"] for e in json.loads((directory / index.INDEX_NAME).read_text())["checkpoints"]]


@pytest.mark.parametrize("stray", [False, True], ids=["nothing-under-the-new-name", "a-stray-directory-there"])
def test_replacing_a_file_by_a_directory_keeps_the_file_until_the_commit(tmp_path: Path, stray: bool) -> None:
    """A sharded save over a single-file checkpoint of the same (epoch, step) (a run that
    moved from DDP to FSDP): the file leaves the index first, stays on disk, and comes back
    into the index if the save fails; only what this save wrote is removed."""
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2))
    old = mgr.save(epoch=0)
    new = schema.dir_name(0, 0)
    if stray:
        _directory(tmp_path / new, b"not ours")
    replacing = Overwrite(mgr.catalog.store, old.name, new, list(mgr.checkpoints))
    assert replacing.begin() == [] and _indexed(tmp_path) == []
    if not stray:
        _directory(tmp_path / new, b"the failed save's")
    replacing.undo()
    assert _indexed(tmp_path) == [old.name] and old.path.is_file()
    assert (tmp_path / new).exists() == stray  # a stray directory is not this save's to delete
    if stray:
        return
    replacing = Overwrite(mgr.catalog.store, old.name, new, list(mgr.checkpoints))
    replacing.begin()
    _directory(tmp_path / new, b"committed")
    replacing.done()  # the caller committed the new index
    replacing.undo()  # after the commit: nothing to undo
    assert not old.path.exists() and (tmp_path / new).is_dir()
