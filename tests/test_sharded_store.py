"""Sharded checkpoint directories in the run directory: names, listing, deletion, cleanup."""

from __future__ import annotations

from pathlib import Path

from ckpt import schema
from ckpt.store.local import TMP_PREFIX, LocalStore


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
