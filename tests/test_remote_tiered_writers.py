"""One writer per remote run with ``cache_dir`` (tiered) too, on a real S3 server (moto)
and real processes: a second writing process is refused at its first save, before it
commits anything (not even in its own cache), with an error naming the run URL, the
holder and the fix; opening the run, and a reader with a ``cache_dir`` (resume, verify),
are never refused (a tiered writer SIGKILLed and restarted at once: test_remote_writers).
Every child has a deadline.
"""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from helpers import read_line, reap, spawn

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from ckpt import CheckpointManager  # noqa: E402
from tests.s3server import MotoServer  # noqa: E402
from tests.test_remote_writers import holder_pid, opts  # noqa: E402

HOLD = textwrap.dedent("""
    import json, sys, time, torch
    from ckpt import CheckpointManager
    url, opts, cache = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    mgr = CheckpointManager(url, model=torch.nn.Linear(2, 2), storage_options=opts, cache_dir=cache)
    mgr.save(epoch=0)
    mgr.wait()
    print("saved", flush=True)
    time.sleep(600)
""")

SECOND = textwrap.dedent("""
    import json, sys, torch, warnings
    warnings.simplefilter("ignore")
    from ckpt import CheckpointManager, WriterConflictError
    url, opts, cache = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    mgr = CheckpointManager(url, model=torch.nn.Linear(2, 2), storage_options=opts, cache_dir=cache)
    print("opened", mgr.resume(), flush=True)   # opening and resuming: never refused
    try:
        mgr.save(epoch=5)
    except WriterConflictError as e:
        print("refused", json.dumps(str(e)), flush=True)
        mgr.close()
        sys.exit(3)
    print("saved", flush=True)
""")


def test_a_second_tiered_writer_is_refused_before_it_commits_anything(server: MotoServer, bucket: str,
                                                                      tmp_path: Path) -> None:
    url = f"s3://{bucket}/run"
    first = spawn(HOLD, url, json.dumps(opts(server)), str(tmp_path / "a"))
    try:
        assert read_line(first) == "saved"
        assert holder_pid(server, bucket) == first.pid
        second = spawn(SECOND, url, json.dumps(opts(server)), str(tmp_path / "b"))
        out = reap(second, timeout=120)[0]
        assert second.returncode == 3, out
        assert "opened 1" in out  # opened and resumed from the run: not refused
        refused = json.loads(out.split("refused ", 1)[1].splitlines()[0])
        assert "a writer holds this run directory" in refused and url in refused
        assert f"writer pid {first.pid} on " in refused  # the holder
        assert "stop that process" in refused and "own prefix" in refused  # how to fix it
        assert not list((tmp_path / "b").glob("ckpt-e*"))  # nothing committed, not even in its cache
        reader = CheckpointManager(url, storage_options=opts(server), cache_dir=str(tmp_path / "r"),
                                   model=torch.nn.Linear(2, 2))  # an evaluation job with a cache
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert reader.resume() == 1
            assert reader.verify() == {"ckpt-e000000-s000000000.pt": "ok"}
        reader.close()
        assert holder_pid(server, bucket) == first.pid  # the reader took nothing
        names = [r.name for r in CheckpointManager(url, storage_options=opts(server),
                                                   model=torch.nn.Linear(2, 2)).checkpoints]
        assert names == ["ckpt-e000000-s000000000.pt"]  # nothing of the refused writer reached the store
    finally:
        first.kill()
        reap(first)
