"""Sharded checkpoint directories in the run directory: names, listing, deletion, cleanup."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt
from ckpt import schema
from ckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError
from ckpt.store.local import TMP_PREFIX, LocalStore
from ckpt.store.shardfiles import MANIFEST, read_manifest


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
from ckpt.store.shardfiles import MANIFEST, read_manifest, verify_files

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
