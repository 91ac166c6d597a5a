"""A GET whose body drips in (a byte every half second, each socket read answered well
within the client's ``read_timeout``) is bounded by ``ckpt_request_seconds`` in total,
body included: a resume from a slow-drip endpoint ends with a clear error naming the
URL instead of taking hours. A real S3 server (moto) behind a real proxy process
(tests/dripserver.py); the resume runs in a child with a deadline; nothing asserts timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest
import torch
from helpers import read_line, reap, spawn

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from ckpt import CheckpointManager  # noqa: E402
from tests.s3server import MotoServer, free_port  # noqa: E402

HERE = Path(__file__).resolve().parent
GAP = 0.5  # seconds between two bytes: a 1 kB checkpoint would take about 10 minutes


@pytest.fixture
def drip(server: MotoServer) -> Iterator[str]:
    """The drip proxy's endpoint, in front of the session's moto server (checkpoints only)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "dripserver.py"), str(port), server.endpoint, ".pt",
                             str(GAP)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert read_line(proc, timeout=60) == "ready"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


RESUME = textwrap.dedent("""
    import json, sys, torch, warnings
    from ckpt import CheckpointManager
    from ckpt.errors import StorageError
    url, opts = sys.argv[1], json.loads(sys.argv[2])
    mgr = CheckpointManager(url, model=torch.nn.Linear(16, 16), storage_options=opts)
    print("opened", flush=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            got = mgr.resume()
        except StorageError as e:
            print("raised", json.dumps(str(e)), flush=True)
        else:
            print("resumed", got, json.dumps([str(w.message) for w in seen]), flush=True)
""")


def test_a_slow_drip_get_is_bounded_by_the_request_limit(server: MotoServer, bucket: str, drip: str) -> None:
    url = f"s3://{bucket}/run"
    mgr = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(16, 16))
    mgr.save(epoch=0)
    mgr.close()
    opts = server.options(client_kwargs={"endpoint_url": drip}, ckpt_request_seconds=3, ckpt_retry_seconds=0,
                          config_kwargs={"connect_timeout": 5, "read_timeout": 5, "retries": {"max_attempts": 1}})
    child = spawn(RESUME, url, json.dumps(opts))
    out = reap(child, timeout=120)[0]  # unbounded: about 10 minutes (the reap kills it and the test fails)
    assert child.returncode == 0, out
    assert "opened" in out
    line = next(line for line in out.splitlines() if line.startswith(("raised", "resumed")))
    assert "ckpt_request_seconds" in line and url in line, line  # the error names the bound and the URL
    if line.startswith("resumed"):  # resume skipped the checkpoint it could not read, with a warning
        assert line.split()[1] == "0", line
