"""ckpt.storage.trees read as a plain folder (open_tree): a local directory and objects
under a URL give the same answers (the Hugging Face plug-in reads checkpoint-N folders so)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Callable

import pytest

from ckpt.io.checksum import file_checksum
from ckpt.storage.trees import checksum, open_tree


def _local(tmp_path: Path) -> str:
    return str(tmp_path / "out")


def _memory(tmp_path: Path) -> str:
    pytest.importorskip("fsspec")
    return f"memory://trees-{secrets.token_hex(4)}/out"


@pytest.mark.parametrize("where", [_local, _memory], ids=["local", "memory"])
def test_open_tree_reads_folders_sizes_and_checksums(tmp_path: Path, where: Callable[[Path], str]) -> None:
    import fsspec
    location = where(tmp_path)
    fs, root = fsspec.core.url_to_fs(location)
    fs.makedirs(f"{root}/checkpoint-2/sub", exist_ok=True)
    fs.makedirs(f"{root}/checkpoint-4", exist_ok=True)
    fs.pipe_file(f"{root}/checkpoint-2/sub/model.bin", b"x" * 1000)
    fs.pipe_file(f"{root}/checkpoint-4/a.json", b"{}")
    tree = open_tree(location)
    assert sorted(tree.folders()) == ["checkpoint-2", "checkpoint-4"]
    sub = tree.sub("checkpoint-2")
    assert str(sub.where()) == f"{location}/checkpoint-2"
    assert sub.size("sub/model.bin") == 1000 and sub.size("absent") is None and tree.size("checkpoint-2") is None
    (tmp_path / "same").write_bytes(b"x" * 1000)
    assert checksum(sub, "sub/model.bin") == file_checksum(tmp_path / "same")
    assert sub.read_bytes("sub/model.bin") == b"x" * 1000
    assert open_tree(f"{location}/nothing").folders() == []
    with pytest.raises(FileNotFoundError):
        sub.read_bytes("absent")
