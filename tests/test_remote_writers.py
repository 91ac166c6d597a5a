"""One writer per remote run: the writer lease on a real S3 server (moto, its own process).

Conditional creation is really honoured by the server; a second writer is refused
(two processes starting at once: exactly one writes); a job SIGKILLed and restarted at
once is not locked out (same machine: at once; another machine: once the lease
expires; the same ``CKPT_WRITER_ID``: at once, and the old process is fenced); a clean
close frees the run; tools and readers never take it. Every child has a deadline.
"""

from __future__ import annotations

import json
import secrets
import signal
import textwrap
import time
import warnings
from typing import Any, Dict

import pytest
import torch
from helpers import read_line, reap, spawn

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from ckpt import CheckpointManager, WriterConflictError  # noqa: E402
from ckpt.storage.conditional import Objects, Precondition  # noqa: E402
from ckpt.storage.lease import WRITER_NAME, Holder  # noqa: E402
from tests.s3server import MotoServer  # noqa: E402
from tests.test_remote import server_fs  # noqa: E402

TTL = 3.0  # short leases: renewed every 0.75 s, a dead holder's expires in 3 s


def opts(server: MotoServer, **extra: Any) -> Dict[str, Any]:
    return server.options(ckpt_lease_seconds=TTL, **extra)


def writer(url: str, server: MotoServer, **extra: Any) -> CheckpointManager:
    return CheckpointManager(url, storage_options=opts(server, **extra), model=torch.nn.Linear(2, 2))


def test_the_server_honours_conditional_creation(server: MotoServer, bucket: str) -> None:
    objects = Objects(server_fs(server))
    key = f"{bucket}/k"
    tag = objects.create(key, b"one")
    with pytest.raises(Precondition):
        objects.create(key, b"two")  # If-None-Match: * refused (412)
    new = objects.replace(key, b"three", tag)
    with pytest.raises(Precondition):
        objects.replace(key, b"four", tag)  # If-Match an old version refused
    with pytest.raises(Precondition):
        objects.delete(key, tag)
    now = objects.read(key)
    assert now is not None and now.data == b"three" and now.tag == new and now.age is not None
    objects.delete(key, new)
    assert objects.read(key) is None


RACE = textwrap.dedent("""
    import json, sys, time, torch, warnings
    warnings.simplefilter("ignore")
    from ckpt import CheckpointManager, WriterConflictError
    url, opts, start = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
    mgr = CheckpointManager(url, model=torch.nn.Linear(2, 2), storage_options=opts)
    time.sleep(max(0.0, start - time.time()))
    try:
        mgr.save(epoch=int(sys.argv[4]))
    except WriterConflictError as e:
        print("refused", str(e).splitlines()[0], flush=True)
        sys.exit(3)
    print("saved", flush=True)
    time.sleep(2 * float(opts["ckpt_lease_seconds"]))   # stays alive, renewing, while the other decides
    mgr.close()
""")


def test_two_writers_starting_at_once_exactly_one_writes(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    start = f"{time.time() + 6:.3f}"  # both import torch first, then save at the same moment
    procs = [spawn(RACE, url, json.dumps(opts(server)), start, str(epoch)) for epoch in (0, 1)]
    outs = reap(*procs)
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], outs
    refused = next(o for o, p in zip(outs, procs) if p.returncode == 3)
    assert "a writer holds this run directory" in refused and url in refused
    names = [r.name for r in writer(url, server).checkpoints]
    assert len(names) == 1  # nothing of the refused writer was committed


HOLD = textwrap.dedent("""
    import json, sys, time, torch
    from ckpt import CheckpointManager
    url, opts, cache = sys.argv[1], json.loads(sys.argv[2]), (sys.argv[3:] or [None])[0]
    mgr = CheckpointManager(url, model=torch.nn.Linear(2, 2), storage_options=opts, cache_dir=cache)
    mgr.save(epoch=0)
    mgr.wait()
    print("saved", flush=True)
    time.sleep(600)
""")


def holder_pid(server: MotoServer, bucket: str) -> int:
    """The pid recorded in the run's writer lease."""
    lease = Objects(server_fs(server)).read(f"{bucket}/run/{WRITER_NAME}")
    assert lease is not None
    holder = Holder.parse(lease.data)
    assert holder is not None
    return holder.pid


@pytest.mark.parametrize("tiered", [False, True], ids=["plain", "cache_dir"])
def test_a_job_sigkilled_and_restarted_at_once_on_the_same_machine_is_not_locked_out(
        server: MotoServer, bucket: str, tmp_path: Any, tiered: bool) -> None:
    url, cache = f"s3://{bucket}/run", (str(tmp_path / "cache") if tiered else None)
    child = spawn(HOLD, url, json.dumps(server.options()), *([cache] if cache else []))  # the default 60 s lease
    try:
        assert read_line(child) == "saved"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        reap(child)
    again = CheckpointManager(url, storage_options=server.options(), cache_dir=cache, model=torch.nn.Linear(2, 2))
    assert again.resume() == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "waiting for its lease": its process is provably gone
        again.save(epoch=1)
        again.wait()
    assert [r.epoch for r in again.checkpoints] == [0, 1]
    assert holder_pid(server, bucket) != child.pid


def _rewrite_holder(server: MotoServer, bucket: str, **fields: Any) -> None:
    objects = Objects(server_fs(server))
    key = f"{bucket}/run/{WRITER_NAME}"
    now = objects.read(key)
    assert now is not None
    holder = Holder.parse(now.data)
    assert holder is not None
    objects.replace(key, json.dumps({**holder.__dict__, **fields}).encode(), now.tag)


def test_a_writer_lost_with_its_machine_frees_the_run_when_its_lease_expires(server: MotoServer,
                                                                            bucket: str) -> None:
    url = f"s3://{bucket}/run"
    first = writer(url, server)
    first.save(epoch=0)
    first.catalog.store.lease._stop_heartbeat()  # type: ignore[attr-defined]  # the machine is gone: no renewal
    first.catalog.store.lease._tag = None  # type: ignore[attr-defined]  # (and no release at exit)
    _rewrite_holder(server, bucket, host="another-machine")  # not provably dead from here
    again = writer(url, server)
    with pytest.warns(UserWarning, match="waiting up to"):
        again.save(epoch=1)  # waits for the lease to expire, then takes over
    assert [r.epoch for r in again.checkpoints] == [0, 1]
    again.close()


def test_the_same_writer_id_takes_over_at_once_and_fences_the_old_process(server: MotoServer,
                                                                         bucket: str) -> None:
    url = f"s3://{bucket}/run"
    old = writer(url, server, ckpt_writer_id="job-42")
    old.save(epoch=0)
    new = writer(url, server, ckpt_writer_id="job-42")  # the scheduler restarted the job
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new.save(epoch=1)
    deadline = time.monotonic() + 30
    while not old.catalog.store.lost():  # type: ignore[attr-defined]  # its heartbeat notices
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with pytest.raises(WriterConflictError, match="another writer has taken over") as info:
        old.save(epoch=2)
    assert "job-42" in str(info.value)
    assert [r.epoch for r in new.checkpoints] == [0, 1]
    new.close()


def test_a_clean_close_frees_the_run_at_once(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    first = writer(url, server)
    first.save(epoch=0)
    first.close()
    assert WRITER_NAME not in {p.rsplit("/", 1)[-1] for p in server_fs(server).ls(f"{bucket}/run", refresh=True)}
    second = writer(url, server)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second.save(epoch=1)
    second.close()


def test_readers_and_tools_never_take_the_run(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    live = writer(url, server)
    live.save(epoch=0)
    reader = writer(url, server)  # an evaluation job: opens, resumes, verifies
    assert reader.resume() == 1 and reader.verify() == {live.checkpoints[0].name: "ok"}
    store = live.catalog.store
    lease = Objects(server_fs(server)).read(f"{bucket}/run/{WRITER_NAME}")
    assert lease is not None and Holder.parse(lease.data).token == store.lease._me.token  # type: ignore
    from ckpt.storage import open_existing
    tool = open_existing(url, opts(server))
    with pytest.raises(WriterConflictError, match="a writer holds"):
        with tool.lock(timeout=0, commit=False):
            pass
    live.save(epoch=1)  # untouched by all of it
    live.close()


def test_lease_options_are_checked(server: MotoServer, bucket: str) -> None:
    from ckpt.errors import ConfigError
    for bad in ({"ckpt_lease_seconds": 0}, {"ckpt_lease_seconds": "1m"}, {"ckpt_writer_id": 7}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            CheckpointManager(f"s3://{bucket}/run-{secrets.token_hex(2)}", storage_options=server.options(**bad),
                              model=torch.nn.Linear(1, 1))
