"""The metric history and the retention reasons live in the store: ``ckpt ls`` and
``ckpt plot`` on an ``s3://`` run (real moto server), plain and tiered; what a save
costs in requests (no listing of the run per commit)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Counter, List

import pytest
import torch
from helpers import child_env

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from ckpt import CheckpointManager  # noqa: E402
from ckpt.catalog import history  # noqa: E402
from ckpt.storage import open_existing  # noqa: E402
from tests.s3server import MotoServer  # noqa: E402
from tests.test_remote import keys  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _cli(server: MotoServer, *args: str) -> subprocess.CompletedProcess:
    env = child_env(**server.aws_env(), MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "ckpt", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=90)


def _run(url: str, server: MotoServer, saves: int = 6, **kw: Any) -> CheckpointManager:
    mgr = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(2, 2),
                            keep_last=2, keep_best=1, monitor="val_loss", **kw)
    for epoch in range(saves):
        mgr.save(epoch=epoch, metrics={"val_loss": [0.9, 0.5, 0.7, 0.8, 0.6, 0.65][epoch % 6]})
    mgr.close()
    return mgr


def test_ls_on_a_url_says_why_each_checkpoint_is_kept(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    _run(url, server)
    out = _cli(server, "ls", url, "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    why = {c["file"]: c["kept_because"] for c in listed["checkpoints"]}
    assert why == {"ckpt-e000001-s000000000.pt": ["best"],
                   "ckpt-e000004-s000000000.pt": ["last-2"],
                   "ckpt-e000005-s000000000.pt": ["latest", "last-2"]}
    assert listed["policy_source"] == "recorded by the manager"  # was "none recorded": "no retention"
    table = _cli(server, "ls", url)
    assert table.returncode == 0 and "no retention" not in table.stdout and "keep_best=1" in table.stdout


def test_plot_on_a_url_draws_every_save_evicted_ones_too(server: MotoServer, bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/run"
    _run(url, server)
    out = _cli(server, "plot", url, "--metric", "val_loss")
    assert out.returncode == 0, out.stderr
    chart = out.stdout
    assert "val_loss over epochs" in chart and "B best" in chart
    assert sum(line.count(".") for line in chart.splitlines()[1:-3]) >= 3  # the evicted saves are drawn
    png = tmp_path / "curve.png"
    if _has_matplotlib():
        out = _cli(server, "plot", url, "--metric", "val_loss", "-o", str(png))
        assert out.returncode == 0 and "6 saves of val_loss, 3 kept" in out.stdout, out.stderr
        assert png.read_bytes()[:4] == b"\x89PNG"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_tiered_runs_keep_the_history_on_both_tiers(server: MotoServer, bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/run"
    _run(url, server, cache_dir=str(tmp_path / "cache"))
    assert history.HISTORY_NAME in keys(server, f"{bucket}/run")
    remote = history.read(open_existing(url, server.options()))
    assert [e.epoch for e in remote] == list(range(6))
    assert history.last(open_existing(url, server.options())).retention.keep_best == 1  # type: ignore[union-attr]


def test_a_long_history_is_a_chain_of_small_segments(server: MotoServer, bucket: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(history, "SEGMENT_MAX", 600)  # about three lines a segment
    url = f"s3://{bucket}/run"
    mgr = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(2, 2), keep_last=1)
    for epoch in range(10):
        mgr.save(epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
    mgr.close()
    names = keys(server, f"{bucket}/run")
    segments = [n for n in names if n.startswith("ckpt-history-") and n.endswith(".jsonl")]
    assert len(segments) >= 2 and all(names[n] <= 600 for n in segments)
    assert names[history.HISTORY_NAME] <= 600  # the object rewritten at each commit stays small
    again = open_existing(url, server.options())
    assert [e.epoch for e in history.read(again)] == list(range(10))
    # a restarted writer goes on with the same chain
    more = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(2, 2), keep_last=1)
    more.save(epoch=10, metrics={"loss": 0.05})
    more.close()
    assert [e.epoch for e in history.read(again)] == list(range(11))


def _counted(mgr: CheckpointManager) -> Counter[str]:
    counts: Counter[str] = collections.Counter()

    def count(request: Any, **_: Any) -> None:
        query = request.url.split("?", 1)[1].split("=")[0] if "?" in request.url else ""
        counts[f"{request.method} {query}".strip()] += 1

    mgr.catalog.store.fs.s3.meta.events.register("before-send.s3", count)  # type: ignore[attr-defined]
    return counts


def test_a_save_does_not_list_the_run(server: MotoServer, bucket: str) -> None:
    url = f"s3://{bucket}/run"
    mgr = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(8, 8), keep_last=2)
    mgr.save(epoch=0)
    counts = _counted(mgr)
    per_save: List[int] = []
    for epoch in range(1, 5):
        counts.clear()
        mgr.save(epoch=epoch, metrics={"loss": 1.0})
        assert counts["GET list-type"] == 0, counts  # no listing of the run per commit
        assert counts["HEAD"] == 0, counts  # no size check: S3 checks the PUT itself
        per_save.append(sum(counts.values()))
    assert max(per_save) <= 12, per_save  # was 21 (docs/explanation/remote-runs.md)
    mgr.close()


def test_a_steady_save_is_four_puts_and_one_batch_delete(server: MotoServer, bucket: str) -> None:
    """The checkpoint and its record, the index and the history segment (each written
    whole in one PUT: no record of their own), and retention's record and object in one
    DeleteObjects (was 10 requests: docs/explanation/remote-runs.md)."""
    url = f"s3://{bucket}/run"
    mgr = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(8, 8), keep_last=2)
    mgr.save(epoch=0)
    mgr.save(epoch=1)
    counts = _counted(mgr)
    for epoch in range(2, 6):
        counts.clear()
        mgr.save(epoch=epoch, metrics={"loss": 1.0 / epoch})
        assert dict(counts) == {"PUT": 4, "POST delete": 1}, counts
    mgr.close()
    names = keys(server, f"{bucket}/run")
    assert "ckpt-index.json.ckpt-commit" not in names and "ckpt-history.jsonl.ckpt-commit" not in names
    again = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(8, 8))
    assert [r.epoch for r in again.checkpoints] == [4, 5]
    assert [e.epoch for e in history.read(again.catalog.store)] == list(range(6))


def test_an_index_with_an_earlier_ckpts_record_is_read_and_its_record_dropped(server: MotoServer,
                                                                             bucket: str) -> None:
    from tests.test_remote import server_fs
    url = f"s3://{bucket}/run"
    _run(url, server, saves=3)
    fs = server_fs(server)
    stale = f"{bucket}/run/ckpt-index.json.ckpt-commit"
    fs.pipe_file(stale, json.dumps({"size": 1, "checksum": "crc32:00000000"}).encode())  # as ckpt 0.x left it
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read as it is: no "index unreadable; rebuilding"
        mgr = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(2, 2), keep_last=2)
    assert [r.epoch for r in mgr.checkpoints] == [1, 2]
    mgr.save(epoch=3)
    mgr.close()
    assert not fs.exists(stale)
