"""Many nodes: two ``torchrun`` launches on 127.0.0.1 (``--nnodes 2``, one ``--node-rank``
each, c10d rendezvous on a free port), each "machine" with its own ``cache_dir``, sharing
one S3 run on the moto server; both machines are lost (their caches deleted) and the
run resumes on two new launches, bit for bit as a run that was never interrupted (the
example's loop on 2 forked ranks of :mod:`dist_harness`, never saved: a third launch less).

The launches run ``examples/fsdp2_s3.py`` (FSDP2 over gloo on CPU). Each torchrun runs
in its own session with a deadline; on a timeout its whole process group is SIGKILLed
and reaped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dist_harness
import pytest
import torch
from helpers import equal, full_state
from s3server import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fsdp2_s3.py"
pytestmark = pytest.mark.slow


def _machines(url: str, endpoint: str, caches: list[Path], epochs: int, out: Path | None,
              deadline: float = 300) -> list[str]:
    """Two torchrun "machines" (one rank each) training ``url``; their outputs."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:  # files, not pipes: neither launch can stall on its output
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in caches]
        try:
            for node, (cache, log) in enumerate(zip(caches, logs)):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                       "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                       "--rdzv-id", f"ckpt-{port}", "--max-restarts", "0", str(EXAMPLE), "--url", url,
                       "--endpoint", endpoint, "--cache-dir", str(cache), "--epochs", str(epochs)]
                if out is not None:
                    cmd += ["--out", str(out)]
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            end = time.monotonic() + deadline
            for p in procs:
                p.wait(timeout=max(1.0, end - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read().decode(errors="replace"))
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]
    return outputs


def _uninterrupted(rank: int, world: int, epochs: int) -> Any:
    """The example's training loop, never stopped and never saved, on ``world`` ranks
    (FSDP2 over gloo, as under torchrun); the whole state, on rank 0."""
    spec = importlib.util.spec_from_file_location("fsdp2_s3", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model, opt = example.build(world)
    for epoch in range(epochs):
        example.train_epoch(model, opt, epoch, rank)
    state = full_state(model, opt)
    return state if rank == 0 else None


def test_two_machines_lost_resume_exactly_on_two_new_ones(server: Any, bucket: str, tmp_path: Path) -> None:
    endpoint = server.endpoint
    uninterrupted = dist_harness.run(_uninterrupted, 2, 4, timeout=180)[0]  # forked ranks: no launch to pay
    lost = f"s3://{bucket}/lost"
    first = _machines(lost, endpoint, [tmp_path / "a0", tmp_path / "a1"], 2, None)
    assert "fresh run" in "".join(first) and "epoch 1:" in "".join(first)  # rank 0: either launch
    latest = "ckpt-e000001-s000000000.dcp"
    held = [sorted(p.name for p in (tmp_path / c / latest).glob("*.distcp")) for c in ("a0", "a1")]
    assert sorted(held) == [["__0_0.distcp"], ["__1_0.distcp"]]  # each machine's cache: its own shards
    for cache in ("a0", "a1"):  # both machines gone, with everything on their disks
        shutil.rmtree(tmp_path / cache)
    resumed = tmp_path / "resumed.pt"
    again = _machines(lost, endpoint, [tmp_path / "b0", tmp_path / "b1"], 4, resumed)
    assert "resumed at epoch 2 on 2 ranks" in "".join(again) and "epoch 3:" in "".join(again)
    assert equal(uninterrupted, torch.load(resumed, weights_only=True))  # bit for bit: weights and AdamW state
