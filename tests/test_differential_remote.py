"""Differential checkpoints (chunks) on a real S3 server (moto, its own process) and tiered.

Also issue 28: a manager opened on a run (an evaluation job) while a differential save
was in flight deleted that save's new tensor file, and the checkpoint committed
unrestorable.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from ckpt import CheckpointManager  # noqa: E402
from ckpt.catalog import differential  # noqa: E402
from ckpt.format import chunks, torchfile  # noqa: E402
from ckpt.storage.remote import FsspecStore  # noqa: E402
from tests.s3server import MotoServer  # noqa: E402


def remote_blobs(server: MotoServer, url: str) -> set[str]:
    store = FsspecStore(url, server.options())
    return {n for n in store.list(differential.BLOB_PREFIX)}


def touch(table: torch.nn.Embedding, epoch: int) -> None:
    with torch.no_grad():
        table.weight[(epoch * 97) % 3000:(epoch * 97) % 3000 + 100] += 1.0


@pytest.mark.parametrize("tiered", [False, True], ids=["s3", "tiered"])
def test_differential_async_saves_on_s3_restore_alone(server: MotoServer, bucket: str, tmp_path: Path,
                                                      tiered: bool) -> None:
    url = f"s3://{bucket}/run"
    extra: Dict[str, Any] = {"cache_dir": str(tmp_path / "cache")} if tiered else {}
    torch.manual_seed(0)
    table = torch.nn.Embedding(4096, 64)  # 1 MiB
    mgr = CheckpointManager(url, embedding=table, differential=True, keep_last=2, async_save=True,
                            storage_options=server.options(), progress=False, **extra)
    saved: Dict[int, torch.Tensor] = {}
    for epoch in range(4):
        touch(table, epoch)
        mgr.save(epoch=epoch)
        saved[epoch] = table.weight.detach().clone()
    mgr.close()
    kept = [r.epoch for r in mgr.checkpoints]
    assert kept == [2, 3]
    if tiered:
        shutil.rmtree(tmp_path / "cache")  # the remote copy alone
    referenced = {b for r in mgr.checkpoints for b, _ in r.blobs}
    assert referenced <= remote_blobs(server, url)
    for epoch in kept:
        fresh = torch.nn.Embedding(4096, 64)
        reader = CheckpointManager(url, embedding=fresh, storage_options=server.options(), progress=False)
        reader.restore(epoch)
        assert torch.equal(fresh.weight, saved[epoch])
        assert set(reader.verify().values()) == {"ok"}
        reader.close()


def test_a_reader_never_deletes_the_pack_of_a_save_in_flight(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    table = torch.nn.Embedding(2048, 64)
    writer = CheckpointManager(url, embedding=table, differential=True, storage_options=server.options(),
                               progress=False)
    writer.save(epoch=0)
    # a save in flight has committed its pack and not yet the checkpoint that references it
    store = FsspecStore(url, server.options())
    live = differential.new_name()
    torchfile.write(store, live, torch.ones(2048, 64), nbytes=2048 * 64 * 4, progress=False)
    reader: Optional[CheckpointManager] = CheckpointManager(url, embedding=torch.nn.Embedding(2048, 64),
                                                            storage_options=server.options())
    assert reader is not None and reader.resume() == 1
    reader.close()
    assert live in remote_blobs(server, url)  # the evaluation job left it alone
    writer.save(epoch=1)  # the writer itself still saves (the reader took nothing over)
    assert live in remote_blobs(server, url)  # first sighting by the writer: maybe in flight
    writer.save(epoch=2)
    assert live not in remote_blobs(server, url)  # still unreferenced a commit later: a crash's, collected
    assert remote_blobs(server, url) == {b for r in writer.checkpoints for b, _ in r.blobs}
    writer.close()


def count_gets(mgr: CheckpointManager) -> List[str]:
    """The keys of the GET requests the manager's S3 client sends from now on (botocore's
    ``before-send`` event, on the real requests to the moto server)."""
    gets: List[str] = []

    def note(request: Any, **_: Any) -> None:
        if request.method == "GET":
            gets.append(request.url.split("?", 1)[0].rsplit("/", 1)[-1])
    store = mgr.catalog.store
    store.fs.s3.meta.events.register("before-send.s3", note)
    return gets


def test_plain_s3_compares_by_digest_and_downloads_no_pack(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    torch.manual_seed(1)
    table = torch.nn.Embedding(4096, 64)  # 1 MiB, 2048 chunks
    mgr = CheckpointManager(url, embedding=table, differential=True, keep_last=2,
                            storage_options=server.options(), progress=False)
    mgr.save(epoch=0)
    gets = count_gets(mgr)
    saved: Dict[int, torch.Tensor] = {}
    for epoch in range(1, 4):
        touch(table, epoch)  # 100 rows: 50 chunks
        before = remote_blobs(server, url)
        mgr.save(epoch=epoch)
        saved[epoch] = table.weight.detach().clone()
        (new,) = remote_blobs(server, url) - before
        size = FsspecStore(url, server.options()).list(new)[new]
        assert size < table.weight.nbytes / 10, size  # only the changed chunks
    downloaded = [k for k in gets if k.endswith(".pt")]
    assert downloaded == [], downloaded  # neither a pack nor the previous checkpoint
    mgr.close()
    # a new writer process knows nothing of the last save: it reads the (small) checkpoint, no pack
    writer = CheckpointManager(url, embedding=table, differential=True, keep_last=2,
                               storage_options=server.options(), progress=False)
    assert writer.resume() == 4
    gets = count_gets(writer)
    touch(table, 4)
    writer.save(epoch=4)
    saved[4] = table.weight.detach().clone()
    assert not [k for k in gets if k.startswith(differential.BLOB_PREFIX) and k.endswith(".pt")], gets
    with FsspecStore(url, server.options()).local_path(writer.latest.name) as copy:
        ref = torch.load(copy, weights_only=True)["embedding"]["weight"][chunks.KEY]
    assert ref["digests"].shape == (2048,)
    writer.close()
    for epoch in (3, 4):
        fresh = torch.nn.Embedding(4096, 64)
        reader = CheckpointManager(url, embedding=fresh, storage_options=server.options(), progress=False)
        reader.restore(epoch)
        assert torch.equal(fresh.weight.view(torch.int32), saved[epoch].view(torch.int32))
        assert set(reader.verify().values()) == {"ok"}
        reader.close()
