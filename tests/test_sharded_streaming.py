"""Sharded saves checksum each file as it is written and fsync it once (real gloo ranks).

The rank processes count every ``os.fsync`` by the path of its descriptor and make any
read-back checksum of a whole file fail, so a save that reads a shard again, or syncs
a file twice, fails here.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from dist_harness import run
from helpers import fsdp_mlp

from ckpt.distributed import collective as cd


def _save_counting(rank: int, world: int, root: Path) -> dict:
    from ckpt.distributed.sharded import save_sharded
    from ckpt.format import shardfiles
    from ckpt.io import checksum

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def no_read_back(*args: object, **kwargs: object) -> int:
        raise AssertionError("a file of the checkpoint was read back to checksum it")

    os.fsync = fsync
    shardfiles._crc32 = no_read_back  # type: ignore[assignment]
    checksum.file_crc = no_read_back  # type: ignore[assignment]
    ctx = cd.context(timeout=30)
    model, opt = fsdp_mlp(world, seed=0, hidden=64)
    model(__import__("torch").randn(3, 4)).sum().backward()
    opt.step()
    manifest = save_sharded(ctx, root / ".tmp-e1", root / "e1", {"model": model, "optimizer": opt},
                            {"epoch": 1}, timeout=20)
    return {"manifest": manifest, "synced": synced}


def test_a_sharded_save_checksums_while_writing_and_fsyncs_each_file_once(tmp_path: Path) -> None:
    outs = run(_save_counting, 2, tmp_path, timeout=120)
    manifest = outs[0]["manifest"]
    final = tmp_path / "e1"
    files = sorted(p.name for p in final.iterdir())
    assert files == sorted([*manifest["files"], "ckpt-manifest.json"])
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "ckpt-meta.pt"} <= set(manifest["files"])
    for name, want in manifest["files"].items():  # the sums taken on the way are the files' own
        data = (final / name).read_bytes()
        assert want == {"size": len(data), "crc32": zlib.crc32(data)}, name
    tmp = str(tmp_path / ".tmp-e1")
    leader = [p for p in outs[0]["synced"]]
    other = outs[1]["synced"]
    assert sorted(other) == [f"{tmp}/__1_0.distcp"]  # rank 1: its own shard, once
    expected = sorted([f"{tmp}/__0_0.distcp", f"{tmp}/.metadata.tmp", f"{tmp}/ckpt-meta.pt",
                       f"{tmp}/ckpt-manifest.json", tmp, str(tmp_path)])
    assert sorted(leader) == expected  # each file, the directory and its parent: once each


def _load_counting(rank: int, world: int, root: Path) -> dict:
    from helpers import full_state
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadItemType

    from ckpt.distributed.sharded import load_sharded

    fallback: list[str] = []
    dcp_read = FileSystemReader.read_data

    def read_data(self, plan, planner):  # type: ignore[no-untyped-def]
        fallback.extend(i.storage_index.fqn for i in plan.items if i.type != LoadItemType.BYTE_IO)
        return dcp_read(self, plan, planner)

    FileSystemReader.read_data = read_data  # type: ignore[method-assign]
    ctx = cd.context(timeout=30)
    model, opt = fsdp_mlp(world, seed=1, hidden=64)
    load_sharded(ctx, root / "e1", {"model": model, "optimizer": opt}, timeout=20)
    full = full_state(model, opt)  # collective
    return {"fallback": fallback, "full": full if rank == 0 else None}


def test_a_sharded_load_reads_every_tensor_into_place_at_any_world_size(tmp_path: Path) -> None:
    from helpers import equal

    saved = run(_save_full, 2, tmp_path, timeout=120)[0]
    for world in (2, 1, 3):  # the same layout, then resharded
        outs = run(_load_counting, world, tmp_path, timeout=120)
        assert [o["fallback"] for o in outs] == [[]] * world  # no tensor went through torch.load + copy
        assert equal(outs[0]["full"], saved), world


def _save_full(rank: int, world: int, root: Path) -> object:
    import torch
    from helpers import full_state

    from ckpt.distributed.sharded import save_sharded

    ctx = cd.context(timeout=30)
    model, opt = fsdp_mlp(world, seed=0, hidden=64)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    save_sharded(ctx, root / ".tmp-e1", root / "e1", {"model": model, "optimizer": opt}, {"epoch": 1}, timeout=20)
    full = full_state(model, opt)  # collective
    return full if rank == 0 else None
