"""Remote and tiered run directories attacked as users would (real moto S3 server, own process).

A tiered save never waits on a hung endpoint; the CLI lists a URL as JSON; two writers
on one run are told it is a writer conflict; ``ckpt prune`` never takes a live run over.
Every child process has a deadline and is reaped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import child_env

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from ckpt import CheckpointManager  # noqa: E402
from tests.s3server import MotoServer  # noqa: E402
from tests.test_remote import QUICK, keys, manager, server_fs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]



TIERED_HUNG = textwrap.dedent("""
    import json, os, signal, sys, torch
    from ckpt import CheckpointManager
    url, opts, cache, server_pid = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    mgr = CheckpointManager(url, model=torch.nn.Linear(4, 4), storage_options=opts, cache_dir=cache)
    mgr.save(epoch=0)
    mgr.wait()
    os.kill(server_pid, signal.SIGSTOP)   # the endpoint hangs: connections open, nothing answers
    try:
        for epoch in (1, 2, 3):
            mgr.save(epoch=epoch)
            print("saved", epoch, flush=True)
    finally:
        os.kill(server_pid, signal.SIGCONT)
    mgr.close()                           # the uploads go up now that it answers again
    print("closed", flush=True)
""")


def _child(script: str, *args: str, timeout: float = 50) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_tiered_save_never_waits_on_a_hung_endpoint(server: MotoServer, bucket: str, tmp_path: Path) -> None:
    # each remote operation retries for 30 s: a save that touched the remote would take
    # longer than the child's whole deadline, three of them far longer
    opts = dict(server.options(config_kwargs=QUICK), ckpt_retry_seconds=30)
    try:
        out = _child(TIERED_HUNG, f"s3://{bucket}/run", json.dumps(opts), str(tmp_path / "cache"),
                     str(server.proc.pid), timeout=50)
    finally:
        server.resume()
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:4] == ["saved 1", "saved 2", "saved 3", "closed"]
    assert {f"ckpt-e00000{e}-s000000000.pt" for e in range(4)} <= set(keys(server, f"{bucket}/run"))


def test_cli_lists_a_url_as_json(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    mgr = manager(url, server, keep_last=3)
    for epoch in range(2):
        mgr.save(epoch=epoch, metrics={"val_loss": 1.0 / (epoch + 1)})
    mgr.close()
    env = child_env(**server.aws_env())
    out = subprocess.run([sys.executable, "-m", "ckpt", "list", url, "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    text = json.dumps(listed)
    assert "ckpt-e000000-s000000000.pt" in text and "ckpt-e000001-s000000000.pt" in text


def test_two_writers_on_one_run_are_told_it_is_a_writer_conflict(server: MotoServer, bucket: str) -> None:
    # the second writer is refused (it used to take the run over and fail the first)
    from ckpt.errors import WriterConflictError
    url = f"s3://{bucket}/run"
    opts = server.options(ckpt_lease_seconds=4)
    first = CheckpointManager(url, storage_options=opts, model=torch.nn.Linear(2, 2))
    first.save(epoch=0)
    second = CheckpointManager(url, storage_options=opts, model=torch.nn.Linear(2, 2))
    with pytest.warns(UserWarning, match="waiting"), pytest.raises(WriterConflictError, match="a writer holds"):
        second.save(epoch=1)
    first.save(epoch=2)
    first.close()


def test_an_upload_replaced_by_a_second_writer_is_reported_as_a_writer_conflict(server: MotoServer,
                                                                                bucket: str) -> None:
    # a second writer landing between an upload and its commit used to replace the
    # object (reported as a conflict after the fact); now it is refused before it writes
    from ckpt.errors import WriterConflictError
    from ckpt.storage.remote import FsspecStore

    url, opts = f"s3://{bucket}/run", server.options(ckpt_lease_seconds=4)
    refused = []

    class Raced(FsspecStore):
        def _upload(self, name: str, produce: Any, on_write: Any) -> Any:
            if name == "ckpt-index.json":
                other = FsspecStore(url, opts)
                with pytest.raises(WriterConflictError, match="a writer holds this run directory") as info, \
                        pytest.warns(UserWarning, match="waiting"), other.lock(commit=True):
                    other.write(name, lambda f: f.write(b"{}"))
                refused.append(str(info.value))
            return super()._upload(name, produce, on_write)

    first = Raced(url, opts)
    with first.lock(commit=True):
        first.write("ckpt-index.json", lambda f: f.write(b'{"a": 1}'))
    assert refused and first.read_bytes("ckpt-index.json") == b'{"a": 1}'
    first.release()


def _cli(server: MotoServer, *args: str) -> subprocess.CompletedProcess:
    env = child_env(**server.aws_env())
    return subprocess.run([sys.executable, "-m", "ckpt", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_prune_never_takes_a_live_run_over(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    mgr = manager(url, server)
    for epoch in range(3):
        mgr.save(epoch=epoch)
    out = _cli(server, "prune", url, "--keep-last", "1", "--yes")
    assert out.returncode != 0 and "a writer holds this run directory" in out.stderr, out.stderr
    mgr.save(epoch=3)  # the writer goes on (prune used to take the run over: every save failed)
    assert [r.epoch for r in mgr.checkpoints] == [0, 1, 2, 3]
    mgr.close()  # a clean close frees the run: prune works now
    out = _cli(server, "prune", url, "--keep-last", "1", "--yes")
    assert out.returncode == 0, out.stderr
    assert sorted(n for n in keys(server, f"{bucket}/run") if n.endswith(".pt")) == ["ckpt-e000003-s000000000.pt"]
    again = manager(url, server)  # and a new writer opens it
    again.save(epoch=4)
    again.close()


def test_a_killed_writers_multipart_upload_is_aborted_when_the_next_writer_claims_the_run(
        server: MotoServer, bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    # what a writer SIGKILLed mid-upload leaves: an open multipart upload under the run
    up = s3.create_multipart_upload(Bucket=bucket, Key="run/ckpt-e000003-s000000000.pt")
    s3.upload_part(Bucket=bucket, Key="run/ckpt-e000003-s000000000.pt", UploadId=up["UploadId"],
                   PartNumber=1, Body=b"x" * (5 << 20))
    other = s3.create_multipart_upload(Bucket=bucket, Key="elsewhere/big.bin")  # not this run's
    assert len(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 2
    reader = manager(f"s3://{bucket}/run", server)  # opening alone (an eval job) aborts nothing
    assert reader.checkpoints == []
    assert len(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 2
    writer = manager(f"s3://{bucket}/run", server)
    writer.save(epoch=0)  # claims the run: the dead writer's upload is aborted
    left = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [other["UploadId"]]
    writer.close()


# -- adversarial round: objects deleted behind ckpt's back; tiered kill before the upload ---------


def test_a_checkpoint_object_deleted_behind_ckpts_back_is_skipped_on_resume(server: MotoServer,
                                                                             bucket: str) -> None:
    url = f"s3://{bucket}/run"
    mgr = manager(url, server)
    for epoch in range(3):
        mgr.save(epoch=epoch)
    mgr.close()
    server_fs(server).rm_file(f"{bucket}/run/ckpt-e000002-s000000000.pt")  # its commit record stays
    again = manager(url, server, seed=1)
    with pytest.warns(UserWarning):
        assert again.resume() == 2  # the newest that is there: epoch 1
    again.save(epoch=2)  # and the run goes on
    again.close()


TIERED_KILLED = textwrap.dedent("""
    import json, os, signal, sys, torch
    from ckpt import CheckpointManager
    url, opts, cache = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    mgr = CheckpointManager(url, model=torch.nn.Linear(4, 4), storage_options=opts, cache_dir=cache)
    mgr.save(epoch=0)
    mgr.wait()
    mgr.catalog.store.remote.write = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    mgr.save(epoch=1)   # committed locally; the upload thread is killed with the process
    mgr.wait()
""")


def test_tiered_killed_between_local_commit_and_upload_resumes_on_either_cache(server: MotoServer, bucket: str,
                                                                              tmp_path: Path) -> None:
    url, opts = f"s3://{bucket}/run", server.options()
    out = _child(TIERED_KILLED, url, json.dumps(opts), str(tmp_path / "cache"), timeout=60)
    assert out.returncode == -9, out.stderr[-2000:]
    import torch

    same = CheckpointManager(url, model=torch.nn.Linear(4, 4), storage_options=opts, cache_dir=str(tmp_path / "cache"))
    assert same.resume() == 2  # the local commit stands
    same.save(epoch=2)  # the restarted writer's first commit uploads it too (it used to stay local only)
    same.close()
    assert {"ckpt-e000001-s000000000.pt", "ckpt-e000002-s000000000.pt"} <= set(keys(server, f"{bucket}/run"))
    fresh = CheckpointManager(url, model=torch.nn.Linear(4, 4), storage_options=opts,
                              cache_dir=str(tmp_path / "new-cache"))
    assert fresh.resume() == 3  # a new machine: every checkpoint is on the remote tier
    fresh.close()
