"""A sharded resume verifies each shard file while it loads, reading its data once.

Real gloo ranks (forkserver processes with deadlines, reaped by the harness): a byte
flipped in one shard file of the newest checkpoint makes every rank resume the previous
checkpoint exactly, at the saving world size and resharded, and the damaged one is moved
aside; the bytes each rank reads of each file are counted by a wrapper around DCP's file
layer, installed in the test's ranks only (see docs/explanation/performance.md).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from dist_harness import run
from helpers import equal, fsdp_mlp, full_state

pytestmark = pytest.mark.slow

HIDDEN = 16384  # pieces of 64-256 KiB: large enough to be read in place, not whole
SMALL = ("ckpt-manifest.json", ".metadata", "ckpt-meta.pt")


def _train_step(model: Any, opt: Any) -> None:
    import torch

    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()


def _save_two(rank: int, world: int, directory: str) -> Any:
    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, 0, hidden=HIDDEN)
    _train_step(model, opt)
    mgr = CheckpointManager(directory, model=model, optimizer=opt, collective_timeout=30)
    mgr.save(epoch=0)
    first = full_state(model, opt)
    _train_step(model, opt)
    mgr.save(epoch=1)
    mgr.close()
    return first if rank == 0 else None


class _Counting:
    """A stream DCP reads, counting the bytes each read returns into ``counts[name]``."""

    def __init__(self, raw: Any, counts: dict[str, int], name: str) -> None:
        self.raw, self.counts, self.name = raw, counts, name

    def readinto(self, b: Any) -> int:
        n = self.raw.readinto(b)
        self.counts[self.name] = self.counts.get(self.name, 0) + (n or 0)
        return int(n or 0)

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.counts[self.name] = self.counts.get(self.name, 0) + len(data)
        return bytes(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def _count_reads() -> dict[str, int]:
    """From now on, the bytes this process reads of each file through DCP's local file layer."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    counts: dict[str, int] = {}
    inner = FileSystem.create_stream

    @contextmanager
    def create_stream(self: Any, path: Any, mode: str) -> Iterator[Any]:
        with inner(self, path, mode) as stream:
            yield _Counting(stream, counts, os.path.basename(os.fspath(path)))

    FileSystem.create_stream = create_stream  # type: ignore[assignment,method-assign]
    return counts


def _resume(rank: int, world: int, directory: str) -> dict:
    from test_sharded_reads import _record

    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, 7, hidden=HIDDEN)  # other weights: all must come from the checkpoint
    mgr = CheckpointManager(directory, model=model, optimizer=opt, collective_timeout=30)
    counts = _count_reads()
    opened = _record(Path(directory))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = mgr.resume()
    names = [r.name for r in mgr.records]
    mgr.close()
    state = full_state(model, opt)
    return {"start": start, "state": state if rank == 0 else None, "counts": counts, "records": names,
            "warned": [str(w.message) for w in caught], "opened": [name for name, _ in opened]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("verify") / "run"
    first = run(_save_two, 2, str(root), timeout=120)[0]
    return root, first


def _copy(saved: tuple[Path, Any], tmp_path: Path) -> tuple[Path, Path]:
    import shutil

    root = tmp_path / "run"
    shutil.copytree(saved[0], root)
    newest = sorted(root.glob("*.dcp"))[-1]
    return root, newest


@pytest.mark.parametrize("world", [2, 1, 3])
def test_a_flipped_byte_in_a_shard_of_the_newest_resumes_the_previous_exactly(saved: tuple, tmp_path: Path,
                                                                              world: int) -> None:
    root, newest = _copy(saved, tmp_path)
    shard = newest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor: only its CRC-32 can tell
    shard.write_bytes(bytes(data))
    outs = run(_resume, world, str(root), timeout=180)
    assert [o["start"] for o in outs] == [1] * world  # epoch 0's checkpoint: resume at epoch 1
    assert equal(outs[0]["state"], saved[1])  # every rank's shards, exactly the previous checkpoint's
    assert all(newest.name not in o["records"] for o in outs)
    assert not newest.exists() and list(root.glob(newest.name + ".corrupt*"))  # moved aside, kept
    assert any("damaged" in w and newest.name in w and "checksum mismatch" in w for w in outs[0]["warned"])


def test_a_damaged_newest_with_every_older_one_damaged_raises_on_every_rank(saved: tuple, tmp_path: Path) -> None:
    from dist_harness import launch

    root, _ = _copy(saved, tmp_path)
    for directory in root.glob("*.dcp"):
        shard = directory / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x10
        shard.write_bytes(bytes(data))
    outs = launch(_resume, 2, str(root), timeout=180)
    assert type(outs[0].error).__name__ == "CheckpointNotFoundError", outs[0].traceback
    assert outs[1].error is not None and "no valid checkpoint to resume from" in str(outs[1].error)  # rank 0's
    assert len(list(root.glob("*.corrupt*"))) == 2


@pytest.mark.parametrize("world", [2, 1, 3])
def test_each_shard_file_is_read_once_and_the_small_files_once_by_rank_0(saved: tuple, world: int) -> None:
    root = saved[0]
    newest = sorted(root.glob("*.dcp"))[-1]
    sizes = {p.name: p.stat().st_size for p in newest.glob("*.distcp")}
    outs = run(_resume, world, str(root), timeout=180)
    assert [o["start"] for o in outs] == [2] * world
    read = [{name: n for name, n in o["counts"].items() if name in sizes} for o in outs]
    for name, size in sizes.items():  # one rank read every byte of it (and summed them)
        assert max(r.get(name, 0) for r in read) == size, (name, size, read)
    total = sum(sum(r.values()) for r in read)
    if world <= 2:  # nothing read twice but the few small pieces every rank restores (optimizer steps)
        assert total <= sum(sizes.values()) * 1.02, (read, sizes)
    else:  # resharded: the bytes a rank restores from a file another rank sums are read by both
        assert total < 2 * sum(sizes.values()), (read, sizes)
    assert sorted(n for n in outs[0]["opened"] if n in SMALL) == sorted(SMALL)  # each once, by rank 0
    assert all(not set(o["opened"]) & set(SMALL) for o in outs[1:])
