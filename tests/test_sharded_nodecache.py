"""A multi-node sharded job killed mid-upload, restarted on the same nodes: each node's
cache is put right (ckpt.distributed.nodecache).

Two gloo ranks, each a "node" with its own ``cache_dir``, one S3 run on the moto server.
The killed job commits epoch 0 (uploaded), then epoch 1 in both caches, whose upload is
stopped half way (every rank's shard files on the store, no manifest, no commit
record), then stages epoch 2 in both caches and is SIGKILLed while writing it. The
restart finds no staging in either cache, resumes exactly from epoch 1 (committed in the
caches), and its first save uploads epoch 1 whole before its own: on the store, epoch 1
is complete and committed, never half.
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
E1, E2 = "ckpt-e000001-s000000000.dcp", "ckpt-e000002-s000000000.dcp"
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
    state = full_state(model, opt)
    if rank == 0:
        torch.save(state, f"{base}/e1.pt")
        _until(held.is_set, "rank 0's files of epoch 1 uploaded")
    else:
        mgr.catalog.store.flush()  # this rank's files of epoch 1 uploaded

    def die(*args: Any) -> None:  # both ranks staged epoch 2 in their caches and are writing it
        Path(f"{base}/writing{rank}").touch()
        _until(lambda: all(Path(f"{base}/writing{r}").exists() for r in range(world)), "every rank writing")
        kill_self()

    FileSystemWriter.write_data = die  # type: ignore[method-assign, assignment]
    _train(model, opt, 2)
    mgr.save(epoch=2)


def _restarted(rank: int, world: int, url: str, opts: dict, base: str) -> Any:
    from ckpt import CheckpointManager

    cache = Path(f"{base}/node{rank}")
    model, opt = fsdp_mlp(world, seed=1)
    mgr = CheckpointManager(url, model=model, optimizer=opt, storage_options=opts, cache_dir=str(cache),
                            collective_timeout=DEADLINE)
    staged = temporaries(cache)  # right after the open
    start = mgr.resume()
    state = full_state(model, opt)
    _train(model, opt, start)
    mgr.save(epoch=start)  # the first save: epoch 1 goes up before it
    mgr.close()
    return staged, start, state


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
    for node in ("node0", "node1"):  # what the kill left: epoch 2 staged, epoch 1 committed, in both caches
        assert temporaries(tmp_path / node) == [f".ckpt-tmp-shard-{E2}"]
        assert (tmp_path / node / E1).is_dir()
    half = _objects(server, url)
    assert f"{E1}/__0_0.distcp" in half and f"{E1}/__1_0.distcp" in half  # every shard file up ...
    assert f"{E1}.ckpt-commit" not in half and f"{E1}/ckpt-manifest.json" not in half  # ... uncommitted

    got = run(_restarted, 2, url, server.options(), str(tmp_path), timeout=3 * DEADLINE)
    assert [staged for staged, _, _ in got] == [[], []]  # each node cleaned its own cache
    assert [start for _, start, _ in got] == [2, 2]
    assert equal(got[0][2], torch.load(tmp_path / "e1.pt", weights_only=True))  # exact, from epoch 1
    objects = _objects(server, url)
    for name in (E1, E2):  # committed on the store, every file whole
        manifest = json.loads(objects[f"{name}/ckpt-manifest.json"])
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "ckpt-meta.pt"} <= set(manifest["files"])
        for rel, want in manifest["files"].items():
            data = objects[f"{name}/{rel}"]
            assert want == {"size": len(data), "crc32": zlib.crc32(data)}, rel
        record = json.loads(objects[f"{name}.ckpt-commit"])
        assert record["checksum"] == f"crc32:{zlib.crc32(objects[f'{name}/ckpt-manifest.json']):08x}"
