"""A multi-node sharded job killed mid-upload, restarted on the same nodes: each node's
cache is put right (ckpt.distributed.nodecache).

Two gloo ranks, each a "node" with its own ``cache_dir``, one S3 run on the moto server.
The killed job commits epoch 0 (uploaded), then epoch 1 in both caches, whose upload is
stopped half way (every rank's shard files on the store, no manifest, no commit
record), then epoch 2, committed by rank 0 while node 1 never renames its staged part
into place, then stages epoch 3 in both caches and is SIGKILLed while writing it. The
restart's open finds no staging in either cache (node 1's part of epoch 2 renamed into
place, epoch 3's removed) and uploads epochs 1 and 2 whole (each node its files, rank 0
the commit record last) before it returns; the resume is exact from epoch 2, the newest
committed on the store; every checkpoint there is complete, never half.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_harness import kill_self, launch, run
from helpers import equal, fsdp_mlp, full_state, temporaries

pytestmark = pytest.mark.slow
E0, E1, E2, E3 = (f"ckpt-e{e:06d}-s000000000.dcp" for e in range(4))
DEADLINE = 60.0


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int) -> None:
    gen = torch.Generator().manual_seed(100 + epoch)
    model(torch.randn(3, 4, generator=gen)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _until(done: Any, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while not done():
        if time.monotonic() > end:
            raise TimeoutError(f"waited {DEADLINE:g} s for {what}")
        time.sleep(0.02)


def _killed(rank: int, world: int, url: str, opts: dict, base: str) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from ckpt import CheckpointManager
    from ckpt.distributed import targets

    model, opt = fsdp_mlp(world, seed=0)
    mgr = CheckpointManager(url, model=model, optimizer=opt, storage_options=opts, cache_dir=f"{base}/node{rank}",
                            collective_timeout=DEADLINE)
    _train(model, opt, 0)
    mgr.save(epoch=0)
    mgr.wait()  # epoch 0 committed on the store
    _train(model, opt, 1)
    held = threading.Event()
    if rank == 0:  # the upload stops before the manifest and the record: every shard file is up

        def stop(self: Any) -> set[str]:
            held.set()
            threading.Event().wait()  # until the SIGKILL
            return set()

        targets._Upload._others_done = stop  # type: ignore[method-assign]
    mgr.save(epoch=1)  # committed in both caches
    if rank == 0:
        _until(held.is_set, "rank 0's files of epoch 1 uploaded")
    else:
        mgr.catalog.store.flush()  # this rank's files of epoch 1 uploaded
        # epoch 2: committed by rank 0, but this node is "killed" before its own rename
        targets.TieredTarget.after = lambda self, manifest, mine: None  # type: ignore[method-assign]
    _train(model, opt, 2)
    mgr.save(epoch=2)
    state = full_state(model, opt)
    if rank == 0:
        torch.save(state, f"{base}/e2.pt")

    def die(*args: Any) -> None:  # both ranks staged epoch 3 in their caches and are writing it
        Path(f"{base}/writing{rank}").touch()
        _until(lambda: all(Path(f"{base}/writing{r}").exists() for r in range(world)), "every rank writing")
        kill_self()

    FileSystemWriter.write_data = die  # type: ignore[method-assign, assignment]
    _train(model, opt, 3)
    mgr.save(epoch=3)


def _restarted(rank: int, world: int, url: str, opts: dict, base: str) -> Any:
    from ckpt import CheckpointManager

    cache = Path(f"{base}/node{rank}")
    model, opt = fsdp_mlp(world, seed=1)
    mgr = CheckpointManager(url, model=model, optimizer=opt, storage_options=opts, cache_dir=str(cache),
                            collective_timeout=DEADLINE)
    staged = temporaries(cache)  # right after the open
    committed = sorted(k.rsplit("/", 1)[1] for k in _records(opts, url))  # before the resume
    start = mgr.resume()
    state = full_state(model, opt)
    _train(model, opt, start)
    mgr.save(epoch=start)
    mgr.close()
    return staged, committed, start, state


def _records(opts: dict, url: str) -> list[str]:
    import s3fs

    return list(s3fs.S3FileSystem(**opts).glob(f"{url[len('s3://'):]}/*.ckpt-commit"))


def _objects(server: Any, url: str) -> dict[str, bytes]:
    import s3fs

    fs = s3fs.S3FileSystem(**server.options())
    root = url[len("s3://"):]
    return {k[len(root) + 1:]: fs.cat_file(k) for k in fs.find(root)}


def test_a_job_killed_mid_upload_leaves_no_staging_and_its_checkpoint_goes_up_whole(server: Any, bucket: str,
                                                                                    tmp_path: Path) -> None:
    url = f"s3://{bucket}/run"
    outs = launch(_killed, 2, url, server.options(), str(tmp_path), timeout=3 * DEADLINE)
    assert all(o.killed for o in outs), [(o.error, o.traceback) for o in outs]
    node0, node1 = tmp_path / "node0", tmp_path / "node1"  # what the kill left in each cache:
    assert temporaries(node0) == [f".ckpt-tmp-shard-{E3}"]  # epoch 3 staged; 1 and 2 committed
    assert (node0 / E1).is_dir() and (node0 / E2).is_dir()
    assert sorted(temporaries(node1)) == [f".ckpt-tmp-shard-{E2}", f".ckpt-tmp-shard-{E3}"]  # 2: not renamed
    assert (node1 / E1).is_dir() and not (node1 / E2).exists()
    half = _objects(server, url)
    assert f"{E1}/__0_0.distcp" in half and f"{E1}/__1_0.distcp" in half  # every shard file up ...
    assert f"{E1}.ckpt-commit" not in half and f"{E1}/ckpt-manifest.json" not in half  # ... uncommitted
    assert not [k for k in half if k.startswith((E2, E3))]

    got = run(_restarted, 2, url, server.options(), str(tmp_path), timeout=3 * DEADLINE)
    assert [staged for staged, _, _, _ in got] == [[], []]  # each node cleaned its own cache
    assert (node1 / E2 / "__1_0.distcp").is_file()  # node 1's part of epoch 2, renamed into place
    assert got[0][1] == [f"{E0}.ckpt-commit", f"{E1}.ckpt-commit", f"{E2}.ckpt-commit"]  # uploaded by the open
    assert [start for _, _, start, _ in got] == [3, 3]
    assert equal(got[0][3], torch.load(tmp_path / "e2.pt", weights_only=True))  # exact, from epoch 2
    objects = _objects(server, url)
    for name in (E1, E2, E3):  # committed on the store, every file whole
        manifest = json.loads(objects[f"{name}/ckpt-manifest.json"])
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "ckpt-meta.pt"} <= set(manifest["files"])
        for rel, want in manifest["files"].items():
            data = objects[f"{name}/{rel}"]
            assert want == {"size": len(data), "crc32": zlib.crc32(data)}, rel
        record = json.loads(objects[f"{name}.ckpt-commit"])
        assert record["checksum"] == f"crc32:{zlib.crc32(objects[f'{name}/ckpt-manifest.json']):08x}"
