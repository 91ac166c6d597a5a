"""The metric history and the retention reasons live in the store: ``ckpt ls`` and
``ckpt plot`` on an ``s3://`` run (real moto server), plain and tiered; what a save
costs in requests (no listing of the run per commit)."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Counter, List

import pytest
import torch
from helpers import child_env, reap, spawn

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
    assert history.HISTORY_NAME not in keys(server, f"{bucket}/run")  # the segment is in the index
    assert len(_segment(server, f"{bucket}/run").splitlines()) == 6
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
    assert len(_segment(server, f"{bucket}/run")) <= 600  # what each commit rewrites stays small
    again = open_existing(url, server.options())
    assert [e.epoch for e in history.read(again)] == list(range(10))
    # a restarted writer goes on with the same chain
    more = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(2, 2), keep_last=1)
    more.save(epoch=10, metrics={"loss": 0.05})
    more.close()
    assert [e.epoch for e in history.read(again)] == list(range(11))


def _segment(server: MotoServer, prefix: str) -> str:
    """The current history segment, as the index on the store holds it."""
    from tests.test_remote import server_fs
    segment = json.loads(server_fs(server).cat_file(f"{prefix}/ckpt-index.json"))[history.INDEX_FIELD]
    assert isinstance(segment, str)
    return segment


def test_a_run_an_earlier_ckpt_wrote_keeps_its_history_and_moves_it_into_the_index(server: MotoServer,
                                                                                   bucket: str) -> None:
    from tests.test_remote import server_fs
    url, prefix = f"s3://{bucket}/run", f"{bucket}/run"
    _run(url, server, saves=3)
    fs = server_fs(server)
    index = json.loads(fs.cat_file(f"{prefix}/ckpt-index.json"))
    fs.pipe_file(f"{prefix}/{history.HISTORY_NAME}", index.pop(history.INDEX_FIELD).encode())  # as ckpt 0.x left it
    fs.pipe_file(f"{prefix}/ckpt-index.json", json.dumps(index).encode())
    assert [e.epoch for e in history.read(open_existing(url, server.options()))] == [0, 1, 2]
    mgr = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(2, 2), keep_last=2)
    mgr.save(epoch=3, metrics={"val_loss": 0.4})
    mgr.close()
    assert [e.epoch for e in history.read(open_existing(url, server.options()))] == [0, 1, 2, 3]
    assert len(_segment(server, prefix).splitlines()) == 4  # carried into the index


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


def test_a_steady_save_is_three_puts_and_one_batch_delete(server: MotoServer, bucket: str) -> None:
    """The checkpoint and its record, the index with the history segment inside (written
    whole in one PUT: no record of its own), and retention's record and object in one
    DeleteObjects (was 10 requests, then 5: docs/explanation/remote-runs.md)."""
    url = f"s3://{bucket}/run"
    mgr = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(8, 8), keep_last=2)
    mgr.save(epoch=0)
    mgr.save(epoch=1)
    counts = _counted(mgr)
    for epoch in range(2, 6):
        counts.clear()
        mgr.save(epoch=epoch, metrics={"loss": 1.0 / epoch})
        assert dict(counts) == {"PUT": 3, "POST delete": 1}, counts
    mgr.close()
    names = keys(server, f"{bucket}/run")
    assert "ckpt-index.json.ckpt-commit" not in names and history.HISTORY_NAME not in names
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


_KILLED = textwrap.dedent("""
    import json, os, signal, sys, torch
    from ckpt import CheckpointManager
    url, opts, kill_at = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    mgr = CheckpointManager(url, storage_options=opts, model=torch.nn.Linear(2, 2), keep_last=2)
    for epoch in range(3):
        mgr.save(epoch=epoch, metrics={"loss": 1.0 / (epoch + 1)})
    sent = []
    def seen(request, **_):
        if ".ckpt-writer" not in request.url:  # the lease's heartbeat: not the save's
            path = request.url.split("?", 1)[0].rsplit("/", 1)[-1]
            sent.append("DeleteObjects" if "?delete" in request.url else request.method + " " + path)
            if len(sent) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    mgr.catalog.store.fs.s3.meta.events.register("before-send.s3", seen)
    mgr.save(epoch=3, metrics={"loss": 0.25})
    print(sent, flush=True)
""")


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5], ids=["object", "record", "index", "delete", "none"])
def test_a_steady_save_killed_before_each_request_leaves_a_run_that_resumes(server: MotoServer, bucket: str,
                                                                           kill_at: int) -> None:
    """SIGKILL just before each request of a steady save (the checkpoint object, its
    commit record, the index with the history, retention's delete): a restart resumes
    from a checkpoint that verifies, the history holds the save exactly when its index
    did, and the next save goes on."""
    url = f"s3://{bucket}/run"
    child = spawn(_KILLED, url, json.dumps(server.options()), str(kill_at))
    out = reap(child, timeout=120)[0]
    assert child.returncode == (-9 if kill_at < 5 else 0), out
    if kill_at == 5:  # what the kill points are
        assert out.splitlines()[0] == str(["PUT ckpt-e000003-s000000000.pt",
                                           "PUT ckpt-e000003-s000000000.pt.ckpt-commit",
                                           "PUT ckpt-index.json", "DeleteObjects"]), out
    mgr = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(2, 2), keep_last=2)
    committed = kill_at >= 3  # its record is in: the object is listed (and the index adopts it)
    assert mgr.checkpoints[-1].epoch == (3 if committed else 2)
    assert set(mgr.verify().values()) == {"ok"}
    assert mgr.resume() == mgr.checkpoints[-1].epoch + 1
    assert [e.epoch for e in history.read(mgr.catalog.store)] == [0, 1, 2, 3][:4 if kill_at >= 4 else 3]
    mgr.save(epoch=4, metrics={"loss": 0.2})
    mgr.close()
    again = CheckpointManager(url, storage_options=server.options(), model=torch.nn.Linear(2, 2))
    assert [r.epoch for r in again.checkpoints] == [3 if committed else 2, 4]
    assert [e.epoch for e in history.read(again.catalog.store)][-1] == 4
