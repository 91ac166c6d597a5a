"""Who opens which file of a sharded checkpoint, recorded by an audit hook in each real rank.

Rank 0 alone reads the manifest, DCP's ``.metadata`` and ``ckpt-meta.pt`` and sends them
to the others; a save never reads back the manifest it wrote; rank 0's damage reaches
every rank as the same typed error with the path (see docs/explanation/performance-internals.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
from dist_harness import launch, run
from helpers import equal, fsdp_mlp, full_state

pytestmark = pytest.mark.slow

SMALL = ("ckpt-manifest.json", ".metadata", "ckpt-meta.pt")


def _record(under: Path) -> list[tuple[str, bool]]:
    """From now on, every open of a file under ``under`` in this process: (name, for writing)."""
    seen: list[tuple[str, bool]] = []
    root = os.fspath(under)

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or not isinstance(args[0], (str, os.PathLike)):
            return
        path = os.fspath(args[0])
        if not path.startswith(root):
            return
        mode, flags = args[1], args[2]
        writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                   else bool(flags & (os.O_WRONLY | os.O_RDWR)))
        seen.append((os.path.basename(path), writing))

    sys.addaudithook(hook)
    return seen


def _save_then_resume(rank: int, world: int, directory: str) -> dict:
    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, 0)
    mgr = CheckpointManager(directory, model=model, optimizer=opt, collective_timeout=30)
    seen = _record(Path(directory))
    mgr.save(epoch=0)
    saved = list(seen)
    mgr.close()
    want = full_state(model, opt)
    model, opt = fsdp_mlp(world, 1)  # other weights: all must come from the checkpoint
    again = CheckpointManager(directory, model=model, optimizer=opt, collective_timeout=30)
    del seen[:]
    start = again.resume()
    resumed = list(seen)
    again.close()
    return {"saved": saved, "resumed": resumed, "start": start, "same": equal(full_state(model, opt), want)}


def test_a_save_reads_back_nothing_and_only_rank_0_opens_the_small_files_on_resume(tmp_path: Path) -> None:
    outs = run(_save_then_resume, 2, str(tmp_path / "run"), timeout=120)
    assert [o["start"] for o in outs] == [1, 1] and outs[0]["same"]
    for out in outs:  # no rank reads the manifest its save wrote
        assert [w for name, w in out["saved"] if name == "ckpt-manifest.json"] in ([True], [])
    assert ("ckpt-manifest.json", True) in outs[0]["saved"]
    other = {name for name, _ in outs[1]["resumed"]}
    assert not other & set(SMALL), outs[1]["resumed"]
    assert other and all(name.endswith(".distcp") for name in other)  # its shards, read by itself
    assert set(SMALL) <= {name for name, _ in outs[0]["resumed"]}
    assert not any(w for _, w in outs[1]["resumed"])


def _save_plain(rank: int, world: int, directory: str) -> None:
    from ckpt.distributed import collective as cd
    from ckpt.distributed.sharded import save_sharded

    model, opt = fsdp_mlp(world, 0)
    root = Path(directory)
    save_sharded(cd.context(timeout=30), root / "tmp", root / "e1", {"model": model, "optimizer": opt},
                 {"epoch": 1}, timeout=30)


def _load_plain(rank: int, world: int, directory: str) -> tuple[str, str | None, list[str]]:
    from ckpt.distributed import collective as cd
    from ckpt.distributed.sharded import load_sharded

    model, opt = fsdp_mlp(world, 1)
    seen = _record(Path(directory))
    try:
        load_sharded(cd.context(timeout=30), Path(directory), {"model": model, "optimizer": opt}, timeout=30)
    except Exception as e:  # noqa: BLE001 - the test checks each rank's error
        return type(e).__name__, getattr(e, "path", None), [name for name, _ in seen]
    return "returned", None, [name for name, _ in seen]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reads")
    run(_save_plain, 2, str(root), timeout=90)
    return root / "e1"


@pytest.mark.parametrize("damage", ["manifest", "metadata", "meta"])
def test_damage_rank_0_finds_is_the_same_typed_error_with_the_path_on_every_rank(saved: Path, tmp_path: Path,
                                                                                 damage: str) -> None:
    import shutil

    copy = tmp_path / "e1"
    shutil.copytree(saved, copy)
    name = {"manifest": "ckpt-manifest.json", "metadata": ".metadata", "meta": "ckpt-meta.pt"}[damage]
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x55
    (copy / name).write_bytes(bytes(data))
    outs = launch(_load_plain, 2, str(copy), timeout=90)
    results = [o.value for o in outs]
    assert all(o.error is None for o in outs), [o.traceback for o in outs]
    assert results[0][0] == results[1][0] and results[0][0] in ("CorruptCheckpointError", "UnsafeCheckpointError")
    assert results[0][1] == results[1][1] == str(copy / name)
    assert not set(results[1][2]) & set(SMALL)  # rank 1 opened none of them: rank 0's verdict
    assert "__1_0.distcp" not in results[1][2]  # and read no shard of a damaged checkpoint


@pytest.mark.parametrize("world", [1, 3])
def test_resharding_still_works_with_the_files_read_once(saved: Path, world: int) -> None:
    outs = run(_load_plain, world, str(saved), timeout=90)
    assert [o[0] for o in outs] == ["returned"] * world
    for rank, (_, _, opened) in enumerate(outs):
        assert bool(set(opened) & set(SMALL)) == (rank == 0)
