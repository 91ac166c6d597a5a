"""Run directories on an object store: a real S3 server (moto, its own process) on 127.0.0.1.

Commit-last (nothing uncommitted is listed or resumed), retention, a client killed
mid-upload, a server that stops answering and comes back, wrong credentials and a
missing bucket, the tiered mode losing either tier, a flipped byte in a remote object.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

pytest.importorskip("s3fs")
pytest.importorskip("moto")

import fsspec  # noqa: E402

from ckpt import CheckpointManager  # noqa: E402
from ckpt.errors import ConfigError, StorageError  # noqa: E402
from ckpt.storage import open_store  # noqa: E402
from ckpt.storage.remote import COMMIT_SUFFIX, FsspecStore, ObjectPath  # noqa: E402
from ckpt.storage.tiered import TieredStore  # noqa: E402
from tests.conftest import make_trainables  # noqa: E402
from tests.s3server import MotoServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Client timeouts for the tests that pause the server (each request gives up after ~1 s).
QUICK = {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}}




def server_fs(server: MotoServer) -> Any:
    import s3fs
    return s3fs.S3FileSystem(**server.options())


def keys(server: MotoServer, prefix: str) -> Dict[str, int]:
    fs = server_fs(server)
    try:
        return {e["name"].rsplit("/", 1)[-1]: e["size"] for e in fs.ls(prefix, detail=True, refresh=True)}
    except FileNotFoundError:
        return {}


def manager(url: str, server: MotoServer, seed: int = 0, **kw: Any) -> CheckpointManager:
    t = make_trainables(seed)
    return CheckpointManager(url, storage_options=server.options(), **kw, **t)


# -- the basic contract -----------------------------------------------------------------


def test_save_resume_retention_on_s3(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/runs/exp1"
    mgr = manager(url, server, keep_last=2)
    for epoch in range(4):
        mgr.trackables["model"][0].weight.data.fill_(float(epoch))
        mgr.save(epoch=epoch, step=epoch * 10, metrics={"loss": 1.0 / (epoch + 1)})
    mgr.close()
    assert mgr.url == url
    assert isinstance(mgr.directory, ObjectPath) and str(mgr.directory) == url
    assert [str(r.path) for r in mgr.checkpoints] == [f"{url}/ckpt-e000002-s000000020.pt",
                                                      f"{url}/ckpt-e000003-s000000030.pt"]
    on_server = keys(server, f"{bucket}/runs/exp1")
    ckpts = sorted(n for n in on_server if n.startswith("ckpt-e") and n.endswith(".pt"))
    assert ckpts == [r.name for r in mgr.checkpoints]  # retention deleted the evicted objects
    assert all(n + COMMIT_SUFFIX in on_server for n in ckpts)

    again = manager(url, server, seed=1)
    assert again.resume() == 4
    assert torch.all(again.trackables["model"][0].weight == 3.0)
    assert again.verify() == {r.name: "ok" for r in mgr.checkpoints}


def test_uncommitted_object_is_never_listed_and_is_cleaned(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    mgr = manager(url, server)
    mgr.save(epoch=0, step=0)
    good = mgr.latest
    assert good is not None
    fs = server_fs(server)
    # what a crash between the upload and its commit record leaves: an object, no record
    fs.pipe_file(f"{bucket}/run/ckpt-e000005-s000000050.pt", fs.cat_file(f"{bucket}/run/{good.name}"))
    store = FsspecStore(url, server.options())
    assert "ckpt-e000005-s000000050.pt" not in store.list()
    again = manager(url, server, seed=1)
    assert [r.name for r in again.checkpoints] == [good.name]
    assert again.resume() == 1
    assert "ckpt-e000005-s000000050.pt" in keys(server, f"{bucket}/run")  # young: may be a live upload
    removed = FsspecStore(url, server.options(), stale_after=0).clean_temporaries()
    assert removed == ["ckpt-e000005-s000000050.pt"]
    assert "ckpt-e000005-s000000050.pt" not in keys(server, f"{bucket}/run")


def test_flipped_byte_in_remote_object_is_skipped(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    mgr = manager(url, server)
    mgr.trackables["model"][0].weight.data.fill_(1.0)
    mgr.save(epoch=0, step=0)
    mgr.trackables["model"][0].weight.data.fill_(2.0)
    mgr.save(epoch=1, step=1)
    mgr.close()
    latest = mgr.latest
    assert latest is not None
    fs = server_fs(server)
    key = f"{bucket}/run/{latest.name}"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(data))

    again = manager(url, server, seed=1)
    with pytest.warns(UserWarning, match="ckpt-e000001"):
        assert again.resume() == 1
    assert torch.all(again.trackables["model"][0].weight == 1.0)
    assert latest.name + ".corrupt" in again.catalog.store.list()
    assert [r.name for r in again.checkpoints] == [mgr.checkpoints[0].name]


def test_overwrite_replaces_remote_checkpoint(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    mgr = manager(url, server)
    mgr.save(epoch=0, step=5, mid_epoch=True)
    mgr.trackables["model"][0].weight.data.fill_(7.0)
    mgr.save(epoch=0, step=5)  # the end-of-epoch save replaces the mid-epoch one
    mgr.close()
    again = manager(url, server, seed=1)
    assert again.resume() == 1
    assert torch.all(again.trackables["model"][0].weight == 7.0)
    assert not any(n.startswith(".ckpt-tmp-") for n in keys(server, f"{bucket}/run"))


# -- failures -----------------------------------------------------------------------------


def test_missing_bucket_fails_at_construction(server: MotoServer) -> None:
    url = f"s3://nosuch{secrets.token_hex(4)}/run"
    with pytest.raises(StorageError, match="nosuch") as info:
        manager(url, server)
    assert url in str(info.value) and "bucket" in str(info.value)
    with pytest.raises(StorageError, match="does not exist"):  # the bucket itself as the run directory
        manager(url.rsplit("/", 1)[0], server)


def test_wrong_credentials_fail_at_construction() -> None:
    strict = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # checks keys against its IAM
    try:
        url = "s3://some-bucket/run"
        with pytest.raises(StorageError, match="access denied") as info:
            manager(url, strict)
        assert url in str(info.value) and "credentials" in str(info.value)
    finally:
        strict.stop()


def test_unreachable_server_fails_save_then_recovers(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    opts = dict(server.options(config_kwargs=QUICK), ckpt_retry_seconds=1)
    t = make_trainables(0)
    mgr = CheckpointManager(url, storage_options=opts, **t)
    mgr.catalog.store.fs.retries = 1  # s3fs's own retries (5 by default) are no storage option
    mgr.save(epoch=0, step=0)
    before = keys(server, f"{bucket}/run")
    server.pause()
    try:
        with pytest.raises(StorageError, match=url):
            mgr.save(epoch=1, step=1)
    finally:
        server.resume()
    after = keys(server, f"{bucket}/run")
    assert {n: s for n, s in after.items() if n in before} == before  # earlier checkpoints intact
    mgr.close()  # frees the run (a second live writer is refused, see test_second_writer_is_refused)
    again = CheckpointManager(url, storage_options=opts, **make_trainables(1))
    assert [r.name for r in again.checkpoints] == ["ckpt-e000000-s000000000.pt"]
    assert again.resume() == 1
    again.save(epoch=1, step=1)  # the server is back: saving works again
    assert [r.epoch for r in again.checkpoints] == [0, 1]


CHILD = textwrap.dedent("""
    import json, sys, torch
    from ckpt import CheckpointManager
    opts = json.loads(sys.argv[2])
    model = torch.nn.Linear(2048, 2048)   # 16 MiB of weights: several 5 MiB parts
    mgr = CheckpointManager(sys.argv[1], model=model, storage_options=opts)
    epoch = 0
    while True:
        model.weight.data.fill_(float(epoch))
        mgr.save(epoch=epoch, step=epoch)
        print(epoch, flush=True)
        epoch += 1
""")


@pytest.mark.slow
def test_sigkill_during_upload_lists_nothing_partial(server: MotoServer, bucket: str, tmp_path: Path) -> None:
    import json
    url = f"s3://{bucket}/run"
    opts = server.options(default_block_size=5 << 20)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, str(script), url, json.dumps(opts)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fs = server_fs(server)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "0", child.stderr.read() if child.stderr else ""
        deadline = time.monotonic() + 120
        while not fs.list_multipart_uploads(bucket):  # an upload in progress
            assert child.poll() is None and time.monotonic() < deadline
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    again = CheckpointManager(url, storage_options=opts, model=torch.nn.Linear(2048, 2048))
    names = [r.name for r in again.checkpoints]
    assert names and all(n + COMMIT_SUFFIX in keys(server, f"{bucket}/run") for n in names)
    newest = again.checkpoints[-1].epoch
    assert again.resume() == newest + 1
    assert torch.all(again.trackables["model"].weight == float(newest))
    assert again.verify() == {n: "ok" for n in names}


# -- tiered ----------------------------------------------------------------------------------


def test_tiered_resume_after_losing_either_tier(server: MotoServer, bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/run"
    cache = tmp_path / "cache"
    mgr = manager(url, server, cache_dir=str(cache), keep_last=2)
    assert isinstance(mgr.catalog.store, TieredStore)
    for epoch in range(3):
        mgr.trackables["model"][0].weight.data.fill_(float(epoch))
        mgr.save(epoch=epoch, step=epoch)
    mgr.close()  # flushes the uploads
    names = [r.name for r in mgr.checkpoints]
    assert sorted(p.name for p in cache.glob("ckpt-e*.pt")) == names
    remote = keys(server, f"{bucket}/run")
    assert sorted(n for n in remote if n.endswith(".pt")) == names  # retention on both tiers

    for p in cache.iterdir():  # the machine is lost: a fresh cache
        p.unlink()
    again = manager(url, server, seed=1, cache_dir=str(cache))
    assert again.resume() == 3
    assert torch.all(again.trackables["model"][0].weight == 2.0)
    again.close()

    third = manager(url, server, seed=2, cache_dir=str(cache))
    third.trackables["model"][0].weight.data.fill_(9.0)
    third.save(epoch=3, step=3)
    third.close()
    shutil.rmtree(cache)  # lost again: what the background upload sent survives
    fourth = manager(url, server, seed=3, cache_dir=str(cache))
    assert fourth.resume() == 4  # from the remote copy uploaded in the background
    assert torch.all(fourth.trackables["model"][0].weight == 9.0)
    fourth.close()


def test_tiered_resume_from_local_when_remote_object_deleted(server: MotoServer, bucket: str,
                                                             tmp_path: Path) -> None:
    url = f"s3://{bucket}/run"
    cache = tmp_path / "cache"
    mgr = manager(url, server, cache_dir=str(cache))
    for epoch in range(2):
        mgr.trackables["model"][0].weight.data.fill_(float(epoch))
        mgr.save(epoch=epoch, step=epoch)
    mgr.close()
    newest = mgr.checkpoints[-1].name
    fs = server_fs(server)
    fs.rm_file(f"{bucket}/run/{newest}")
    fs.rm_file(f"{bucket}/run/{newest}{COMMIT_SUFFIX}")
    again = manager(url, server, seed=1, cache_dir=str(cache))
    assert again.resume() == 2  # the local tier still holds the newest
    assert torch.all(again.trackables["model"][0].weight == 1.0)
    again.close()


def test_tiered_upload_error_is_raised_like_an_async_error(server: MotoServer, bucket: str,
                                                           tmp_path: Path) -> None:
    url = f"s3://{bucket}/run"
    opts = dict(server.options(config_kwargs=QUICK), ckpt_retry_seconds=0)
    mgr = CheckpointManager(url, storage_options=opts, cache_dir=str(tmp_path / "c"), **make_trainables(0))
    mgr.catalog.store.remote.fs.retries = 1  # s3fs's own retries (5 by default) are no storage option
    mgr.save(epoch=0, step=0)
    mgr.wait()
    server.pause()
    try:
        with pytest.warns(UserWarning, match="local tier only"):  # warned when the upload fails
            mgr.save(epoch=1, step=1)  # commits locally, returns; the upload fails in the background
            with pytest.raises(StorageError, match="background upload of ckpt-e000001") as caught:
                mgr.wait()
    finally:
        server.resume()
    inner = caught.value.__cause__  # the remote store's own error, its hint left out of the text
    assert isinstance(inner, StorageError) and inner.hint and inner.headline() in caught.value.what
    assert str(caught.value).count("hint:") == 1 and caught.value.hint.startswith("the local tier holds it")
    assert (tmp_path / "c" / "ckpt-e000001-s000000001.pt").is_file()  # the local commit stands
    mgr.save(epoch=2, step=2)
    mgr.close()  # the pending upload went up with this one
    remote = keys(server, f"{bucket}/run")
    assert {"ckpt-e000001-s000000001.pt", "ckpt-e000002-s000000002.pt"} <= set(remote)


# -- any fsspec URL; options -------------------------------------------------------------------


def test_memory_url_round_trip() -> None:
    url = f"memory://ckpt-test-{secrets.token_hex(4)}/run"
    t = make_trainables(0)
    mgr = CheckpointManager(url, keep_last=1, **t)
    t["model"][0].weight.data.fill_(3.0)
    mgr.save(epoch=0, step=0)
    mgr.save(epoch=1, step=1)
    again = CheckpointManager(url, **make_trainables(1))
    assert [r.epoch for r in again.checkpoints] == [1]
    assert again.resume() == 2
    assert torch.all(again.trackables["model"][0].weight == 3.0)
    assert isinstance(open_store(url), FsspecStore)
    fsspec.filesystem("memory").rm(url[len("memory://"):], recursive=True)


def test_options_belong_to_urls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="URL"):
        CheckpointManager(tmp_path, storage_options={"key": "x"}, model=torch.nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="dict"):
        CheckpointManager("memory://x/y", storage_options="key=x", model=torch.nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="ckpt_retry_seconds"):
        CheckpointManager("memory://x/y", storage_options={"ckpt_retry_seconds": "long"},
                          model=torch.nn.Linear(1, 1))



def test_cli_accepts_urls(capsys: pytest.CaptureFixture[str]) -> None:
    from ckpt import cli
    url = f"memory://ckpt-cli-{secrets.token_hex(4)}/run"
    mgr = CheckpointManager(url, **make_trainables(0))
    mgr.save(epoch=0, step=0, metrics={"loss": 0.5})
    name = mgr.checkpoints[0].name
    assert cli.main(["list", url]) == 0
    assert name in capsys.readouterr().out
    assert cli.main(["verify", url]) == 0
    assert "1 ok, 0 bad" in capsys.readouterr().out
    assert cli.main(["inspect", "--json", f"{url}/{name}"]) == 0
    assert '"epoch": 0' in capsys.readouterr().out
    fsspec.filesystem("memory").rm(url[len("memory://"):], recursive=True)


def test_tiered_damaged_local_copy_falls_back_to_remote(server: MotoServer, bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/run"
    cache = tmp_path / "cache"
    mgr = manager(url, server, cache_dir=str(cache))
    for epoch in range(2):
        mgr.trackables["model"][0].weight.data.fill_(float(epoch))
        mgr.save(epoch=epoch, step=epoch)
    mgr.close()
    newest = cache / mgr.checkpoints[-1].name
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    again = manager(url, server, seed=1, cache_dir=str(cache))
    with pytest.warns(UserWarning, match="local copy differs from the uploaded one"):
        assert again.resume() == 2  # the remote copy of the newest verifies
    assert torch.all(again.trackables["model"][0].weight == 1.0)
    again.close()


def test_transient_errors_are_retried_until_the_deadline() -> None:
    import errno

    from ckpt.storage import retry
    assert retry.transient(ConnectionResetError()) and retry.transient(OSError(errno.EBUSY, "SlowDown"))
    assert not retry.transient(FileNotFoundError()) and not retry.transient(PermissionError())
    calls = []

    def failing() -> None:
        calls.append(1)
        raise ConnectionRefusedError("down")

    with pytest.raises(ConnectionRefusedError):
        retry.call(failing, deadline=0.5)
    assert len(calls) >= 2
    calls.clear()

    def refused() -> None:
        calls.append(1)
        raise PermissionError("denied")

    with pytest.raises(PermissionError):
        retry.call(refused, deadline=5)
    assert len(calls) == 1


def test_failed_upload_leaves_nothing(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    store = FsspecStore(url, server.options(default_block_size=5 << 20))

    def produce(f: Any) -> None:
        for _ in range(3):  # 12 MiB: two parts are uploaded before the failure
            f.write(b"x" * (4 << 20))
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        store.write("ckpt-e000000-s000000000.pt", produce)
    assert store.list() == {}
    assert not server_fs(server).list_multipart_uploads(bucket)  # the multipart upload was aborted
    assert "ckpt-e000000-s000000000.pt" not in keys(server, f"{bucket}/run")


def test_second_writer_is_refused(server: MotoServer, bucket: str) -> None:
    # was test_second_writer_is_detected (the second writer took the run over and the
    # first one failed): now the run's writer lease refuses the second writer instead
    from ckpt.errors import WriterConflictError
    url = f"s3://{bucket}/run"
    opts = server.options(ckpt_lease_seconds=4)  # renewed every second: a live holder is seen at once
    first = CheckpointManager(url, storage_options=opts, **make_trainables(0))
    first.save(epoch=0, step=0)
    second = CheckpointManager(url, storage_options=opts, **make_trainables(1))
    second.resume()
    with pytest.warns(UserWarning, match="waiting up to"), pytest.raises(WriterConflictError) as info:
        second.save(epoch=1, step=1)
    text = str(info.value)
    assert url in text and f"pid {os.getpid()}" in text and "a writer holds this run directory" in text
    assert "close()" in text and "ckpt_lease_seconds" in text and "CKPT_WRITER_ID" in text
    first.save(epoch=2, step=2)  # the writer goes on
    assert [r.epoch for r in manager(url, server).checkpoints] == [0, 2]
    first.close()


def test_restore_by_url(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    mgr = manager(url, server)
    mgr.trackables["model"][0].weight.data.fill_(4.0)
    mgr.save(epoch=0, step=0)
    mgr.trackables["model"][0].weight.data.fill_(5.0)
    mgr.save(epoch=1, step=1)
    first = str(mgr.checkpoints[0].path)
    assert first.startswith("s3://")
    assert mgr.restore(first).epoch == 0
    assert torch.all(mgr.trackables["model"][0].weight == 4.0)
