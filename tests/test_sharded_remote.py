"""FSDP2 (sharded) checkpoints on URLs: S3 on the moto server, ``memory://``, with and
without ``cache_dir``; saved by 2 real gloo ranks, resumed on 1 and on 3 (resharding).

With ``cache_dir`` each save commits in the cache first and uploads in the background;
the tests delete the caches after ``close()`` (the machines are lost) and resume from
the store alone. ``per-rank`` gives each rank its own cache directory, as ranks on
separate machines have.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_harness import run
from helpers import equal, fsdp_mlp, full_state

pytestmark = pytest.mark.slow


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int) -> None:
    gen = torch.Generator().manual_seed(100 + epoch)
    model(torch.randn(3, 4, generator=gen)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _cache(base: str | None, mode: str, rank: int) -> str | None:
    if base is None:
        return None
    return str(Path(base) / (f"node{rank}" if mode == "per-rank" else "node"))


def _save(rank: int, world: int, url: str, opts: dict, cache: str | None, mode: str) -> Any:
    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, seed=0)
    mgr = CheckpointManager(url, model=model, optimizer=opt, storage_options=opts, keep_last=2,
                            cache_dir=_cache(cache, mode, rank), collective_timeout=60)
    for epoch in range(mgr.resume(), 3):
        _train(model, opt, epoch)
        mgr.save(epoch=epoch, metrics={"loss": float(epoch)})
    names = [r.name for r in mgr.checkpoints]
    mgr.close()  # every rank: its uploads committed
    full = full_state(model, opt)
    return (full, names) if rank == 0 else None


def _resume(rank: int, world: int, url: str, opts: dict, cache: str | None, mode: str) -> Any:
    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, seed=1, shard=world > 1)
    mgr = CheckpointManager(url, model=model, optimizer=opt, storage_options=opts,
                            cache_dir=_cache(cache, mode, rank), collective_timeout=60)
    start = mgr.resume()
    full = full_state(model, opt)
    mgr.close()
    return (start, full) if rank == 0 else None


def _objects(server: Any, url: str) -> dict[str, bytes]:
    import s3fs

    fs = s3fs.S3FileSystem(**server.options())
    root = url[len("s3://"):]
    return {k[len(root) + 1:]: fs.cat_file(k) for k in fs.find(root)}


@pytest.fixture(scope="module", params=["no cache", "shared cache", "per-rank"])
def saved(request: pytest.FixtureRequest, server: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    import s3fs

    name = f"b{zlib.crc32(request.param.encode()):08x}"
    s3fs.S3FileSystem(**server.options()).mkdir(name)
    url = f"s3://{name}/runs/fsdp"
    cache = None if request.param == "no cache" else str(tmp_path_factory.mktemp("cache"))
    full, names = run(_save, 2, url, server.options(), cache, request.param, timeout=240)[0]
    if cache is not None:
        shutil.rmtree(cache)  # both machines lost: only the store is left
    return url, full, names, request.param


def test_the_store_holds_every_shard_checksummed_and_committed_last(saved: tuple, server: Any) -> None:
    url, _, names, _ = saved
    assert names == ["ckpt-e000001-s000000000.dcp", "ckpt-e000002-s000000000.dcp"]  # keep_last=2
    objects = _objects(server, url)
    for name in names:
        manifest = json.loads(objects[f"{name}/ckpt-manifest.json"])
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "ckpt-meta.pt"} <= set(manifest["files"])
        for rel, want in manifest["files"].items():  # the CRCs taken while streaming are the objects'
            data = objects[f"{name}/{rel}"]
            assert want == {"size": len(data), "crc32": zlib.crc32(data)}, rel
        record = json.loads(objects[f"{name}.ckpt-commit"])
        assert record["checksum"] == f"crc32:{zlib.crc32(objects[f'{name}/ckpt-manifest.json']):08x}"
    evicted = "ckpt-e000000-s000000000.dcp"
    assert not [k for k in objects if k.startswith(evicted)]  # retention removed its objects too


@pytest.mark.parametrize("world", [1, 3])
def test_a_run_saved_on_2_ranks_resumes_from_the_store_on_1_and_3(saved: tuple, server: Any, world: int,
                                                                  tmp_path: Path) -> None:
    url, full, _, mode = saved
    cache = None if mode == "no cache" else str(tmp_path / "fresh")  # new machines: empty caches
    start, loaded = run(_resume, world, url, server.options(), cache, mode, timeout=240)[0]
    assert start == 3
    assert equal(loaded, full)


def _memory(rank: int, world: int) -> Any:
    from ckpt import CheckpointManager

    model, opt = fsdp_mlp(world, seed=0)
    with CheckpointManager("memory://ckpt-test/fsdp", model=model, optimizer=opt) as mgr:
        _train(model, opt, 0)
        mgr.save(epoch=0)
    full = full_state(model, opt)
    again, opt2 = fsdp_mlp(world, seed=1)
    with CheckpointManager("memory://ckpt-test/fsdp", model=again, optimizer=opt2) as mgr:
        assert mgr.resume() == 1
    return equal(full_state(again, opt2), full)


def test_a_sharded_checkpoint_on_memory_url_round_trips() -> None:
    assert run(_memory, 1, timeout=120) == [True]


def _replicated(rank: int, world: int, url: str, opts: dict, cache: str | None) -> Any:
    from ckpt import CheckpointManager

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)  # the same on every rank: a replicated (DDP-like) state
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with CheckpointManager(url, model=model, optimizer=opt, storage_options=opts,
                           cache_dir=None if cache is None else f"{cache}/node{rank}") as mgr:
        start = mgr.resume()
        if start == 0:
            model(torch.ones(2, 4)).sum().backward()
            opt.step()
            mgr.save(epoch=0)
    return start, {k: v.clone() for k, v in model.state_dict().items()}


def test_a_replicated_run_on_2_ranks_with_per_node_caches_resumes_on_1(server: Any, bucket: str,
                                                                       tmp_path: Path) -> None:
    url = f"s3://{bucket}/runs/ddp"
    (start, saved), _ = run(_replicated, 2, url, server.options(), str(tmp_path / "a"), timeout=120)
    shutil.rmtree(tmp_path / "a")
    [(again, loaded)] = run(_replicated, 1, url, server.options(), str(tmp_path / "b"), timeout=120)
    assert (start, again) == (0, 1)
    assert equal(loaded, saved)


def test_an_unfinished_sharded_save_on_the_store_is_never_listed_and_is_cleaned(server: Any, bucket: str) -> None:
    import s3fs

    from ckpt.storage.remote import FsspecStore

    fs = s3fs.S3FileSystem(**server.options())
    fs.pipe_file(f"{bucket}/run/ckpt-e000001-s000000000.dcp/__0_0.distcp", b"partial")  # no commit record
    store = FsspecStore(f"s3://{bucket}/run", server.options(), stale_after=0)
    assert store.list_dirs() == {}
    assert store.clean_temporaries() == ["ckpt-e000001-s000000000.dcp"]
    assert not fs.find(f"{bucket}/run/ckpt-e000001-s000000000.dcp")
