"""Adversarial round on remote runs (issue 28, item 2), real moto S3 server as its own process.

A client SIGKILLed mid-upload, then restarted at once; the server frozen mid-upload;
the server stopped and restarted (moto keeps nothing: the bucket is gone); objects
deleted or overwritten behind ckpt's back; a reader listing while a writer commits;
wrong endpoints, missing buckets and wrong credentials, with and without a cache.
Every child process has a deadline and is reaped; nothing asserts timing.
"""

from __future__ import annotations

import json
import secrets
import signal
import textwrap
import time
from pathlib import Path
from typing import Any, List

import pytest
import torch
from helpers import Child, read_line, reap, spawn

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from ckpt import CheckpointManager, cli  # noqa: E402
from ckpt.errors import StorageError  # noqa: E402
from tests.s3server import MotoServer, free_port  # noqa: E402
from tests.test_remote import QUICK, server_fs  # noqa: E402


def _wait_for_upload(server: MotoServer, bucket: str, proc: Child, deadline: float = 120) -> None:
    fs = server_fs(server)
    end = time.monotonic() + deadline
    while not fs.list_multipart_uploads(bucket):
        assert proc.poll() is None, reap(proc)
        assert time.monotonic() < end, "no multipart upload started"
        time.sleep(0.02)


BIG = textwrap.dedent("""
    import json, sys, torch
    from ckpt import CheckpointManager
    opts = json.loads(sys.argv[2])
    model = torch.nn.Linear(2048, 2048)   # 16 MiB: several 5 MiB parts
    mgr = CheckpointManager(sys.argv[1], model=model, storage_options=opts)
    mgr.save(epoch=0)
    print("saved", flush=True)
    for epoch in range(1, 60):   # one upload after another, until killed or the server freezes
        try:
            mgr.save(epoch=epoch)
        except Exception as e:
            print("error", type(e).__name__, str(e).splitlines()[0], flush=True)
            sys.exit(4)
""")


def test_client_sigkilled_mid_upload_restarts_at_once_and_aborts_the_upload(server: MotoServer,
                                                                           bucket: str) -> None:
    url = f"s3://{bucket}/run"
    opts = server.options(default_block_size=5 << 20)
    child = spawn(BIG, url, json.dumps(opts))
    try:
        assert read_line(child) == "saved"
        _wait_for_upload(server, bucket, child)
        child.send_signal(signal.SIGKILL)
    finally:
        reap(child)
    assert child.returncode == -signal.SIGKILL
    # what the kill left open (usually one upload: none if the kill landed between two)
    again = CheckpointManager(url, storage_options=opts, model=torch.nn.Linear(2048, 2048))
    newest = again.checkpoints[-1].epoch  # nothing partial listed: every listed one verifies
    assert again.verify() == {r.name: "ok" for r in again.checkpoints}
    assert again.resume() == newest + 1
    again.save(epoch=newest + 1)  # not locked out: the killed writer's process is provably gone
    assert not server_fs(server).list_multipart_uploads(bucket)  # and any upload it left was aborted
    assert again.verify() == {r.name: "ok" for r in again.checkpoints}
    again.close()


def test_server_frozen_mid_upload_fails_the_save_in_bounded_time(server: MotoServer, bucket: str) -> None:
    # found by this round: an upload to a server that stopped answering hung forever
    # (botocore's Expect: 100-continue, which aiohttp waits for with no timeout)
    url = f"s3://{bucket}/run"
    opts = dict(server.options(default_block_size=5 << 20, config_kwargs=QUICK), ckpt_retry_seconds=2,
                ckpt_request_seconds=5)
    child = spawn(BIG, url, json.dumps(opts))
    try:
        assert read_line(child) == "saved"
        _wait_for_upload(server, bucket, child)
        server.pause()
        try:
            out = reap(child, timeout=120)[0]  # the child raised and exited: it did not hang
        finally:
            server.resume()
    finally:
        reap(child)
    assert child.returncode in (0, 4), out  # 0: the last part went up just before the pause
    if child.returncode == 4:
        assert "StorageError" in out and url in out
    again = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(2048, 2048))
    assert again.resume() == again.checkpoints[-1].epoch + 1
    assert again.verify() == {r.name: "ok" for r in again.checkpoints}
    again.close()


def test_server_restarted_empty_mid_run_is_a_clear_error_and_loses_nothing_local(tmp_path: Path) -> None:
    srv = MotoServer()
    port = srv.port
    try:
        bucket = f"b{secrets.token_hex(4)}"
        server_fs(srv).mkdir(bucket)
        url = f"s3://{bucket}/run"
        opts = dict(srv.options(config_kwargs=QUICK), ckpt_retry_seconds=1)
        cache = tmp_path / "cache"
        tiered = CheckpointManager(url, storage_options=opts, cache_dir=str(cache), model=torch.nn.Linear(2, 2))
        plain = CheckpointManager(f"s3://{bucket}/plain", storage_options=opts, model=torch.nn.Linear(2, 2))
        tiered.save(epoch=0)
        tiered.wait()
        plain.save(epoch=0)
        srv.stop()
        srv = MotoServer(port=port)  # the same endpoint, restarted: moto kept nothing, the bucket is gone
        with pytest.raises(StorageError) as info:
            plain.save(epoch=1)
        text = str(info.value)
        assert "s3://" in text and bucket in text and "hint:" in text
        with pytest.warns(UserWarning, match="local tier only"):
            tiered.save(epoch=1)  # commits locally; the upload fails in the background
            with pytest.raises(StorageError, match="background upload"):
                tiered.wait()
        assert sorted(p.name for p in cache.glob("ckpt-e*.pt")) == ["ckpt-e000000-s000000000.pt",
                                                                     "ckpt-e000001-s000000000.pt"]
        with pytest.raises(StorageError, match="does not exist"):  # a restart of the job is told why
            CheckpointManager(url, storage_options=opts, cache_dir=str(cache), model=torch.nn.Linear(2, 2))
    finally:
        srv.stop()


def test_objects_overwritten_or_deleted_behind_ckpts_back_are_flagged(server: MotoServer, bucket: str,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    url = f"s3://{bucket}/run"
    mgr = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(4, 4))
    for epoch in range(4):
        mgr.save(epoch=epoch)
    mgr.close()
    fs = server_fs(server)
    names = [r.name for r in mgr.checkpoints]
    other = CheckpointManager(f"s3://{bucket}/other", storage_options=server.options(), model=torch.nn.Linear(4, 4))
    other.save(epoch=1)
    other.close()
    fs.pipe_file(f"{bucket}/run/{names[1]}", fs.cat_file(f"{bucket}/other/{names[1]}"))  # a valid file, not ours
    fs.rm_file(f"{bucket}/run/{names[2]}")  # the object, its commit record stays
    fs.rm_file(f"{bucket}/run/{names[3]}.ckpt-commit")  # the record, the object stays
    _env(monkeypatch, server)
    assert cli.main(["verify", url]) == 1
    out = capsys.readouterr().out
    assert f"{names[1]}: damaged" in out and f"{names[2]}: missing" in out, out
    again = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(4, 4))
    with pytest.warns(UserWarning):
        assert again.resume() == 1  # epochs 3 (uncommitted), 2 (gone) and 1 (not its bytes) skipped
    again.save(epoch=4)
    again.close()


def _env(monkeypatch: pytest.MonkeyPatch, server: MotoServer) -> None:
    for k, v in server.aws_env().items():
        monkeypatch.setenv(k, v)


WRITER = textwrap.dedent("""
    import json, sys, torch
    from ckpt import CheckpointManager
    mgr = CheckpointManager(sys.argv[1], model=torch.nn.Linear(8, 8), storage_options=json.loads(sys.argv[2]),
                            keep_last=2)
    for epoch in range(int(sys.argv[3])):
        mgr.save(epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
        print(epoch, flush=True)
    mgr.close()
""")


def test_a_reader_listing_while_a_writer_commits_never_reports_damage(server: MotoServer, bucket: str,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    url = f"s3://{bucket}/run"
    child = spawn(WRITER, url, json.dumps(server.options()), "25")
    _env(monkeypatch, server)
    codes: List[int] = []
    try:
        assert read_line(child) == "0"
        while child.poll() is None and len(codes) < 40:
            codes.append(cli.main(["ls", url, "--json"]))
            listed = json.loads(capsys.readouterr().out)
            assert all(c["status"] == "ok" for c in listed["checkpoints"]), listed
            assert not [p for p in listed["problems"] if p["status"] in ("damaged", "missing")], listed
    finally:
        out = reap(child)[0]
    assert child.returncode == 0, out
    assert codes and set(codes) == {0}


@pytest.mark.parametrize("cached", [False, True])
def test_wrong_endpoint_bucket_or_credentials_fail_at_once_naming_the_url(server: MotoServer, tmp_path: Path,
                                                                         cached: bool) -> None:
    cache = {"cache_dir": str(tmp_path / "c")} if cached else {}

    def attempt(url: str, **options: Any) -> str:
        with pytest.raises(StorageError) as info:
            CheckpointManager(url, storage_options=options, model=torch.nn.Linear(1, 1), **cache)
        text = str(info.value)
        assert url in text and "hint:" in text and "Traceback" not in text
        return text

    quick = dict(config_kwargs=QUICK, ckpt_retry_seconds=1)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    text = attempt("s3://bucket/run", **server.options(client_kwargs={"endpoint_url": dead}, **quick))
    assert "cannot reach" in text and "endpoint" in text
    text = attempt(f"s3://nosuch{secrets.token_hex(3)}/run", **server.options(**quick))
    assert "does not exist" in text and "create the bucket" in text
    strict = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        text = attempt("s3://some-bucket/run", **strict.options(**quick))
        assert "access denied" in text and "credentials" in text
    finally:
        strict.stop()
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # nothing written


def test_cli_on_a_missing_bucket_prints_one_line(server: MotoServer, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    _env(monkeypatch, server)
    url = f"s3://nosuch{secrets.token_hex(3)}/run"
    for command in (["ls", url], ["verify", url], ["plot", url, "--metric", "loss"],
                    ["prune", url, "--keep-last", "1"]):
        code = cli.main(command)
        err = capsys.readouterr().err
        assert code != 0 and err.startswith("ckpt: error: ") and url in err and "Traceback" not in err, (command, err)
