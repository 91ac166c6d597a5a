"""ckpt's CkptSaver with the real ignite Engine and Checkpoint handler (tiny model, CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("ignite")

import trainer_runs  # noqa: E402
from helpers import same_weights  # noqa: E402
from ignite.handlers import Checkpoint  # noqa: E402

from ckpt.errors import CorruptCheckpointError  # noqa: E402
from ckpt.integrations.ignite import CkptSaver, last_checkpoint, load  # noqa: E402


@pytest.mark.slow
def test_killed_run_resumes_bit_exact(tmp_path: Path) -> None:
    run, full = tmp_path / "run", tmp_path / "full.pt"
    trainer_runs.run_and_kill("ignite", run, lambda d: full.exists() and any(d.glob("checkpoint_3.pt.ckpt-sum")),
                              "--full", str(full))  # one launch: the uninterrupted run, then the killed one
    start = last_checkpoint(str(run))
    assert start is not None and torch.load(start)["trainer"]["iteration"] < 6 * trainer_runs.EPOCHS
    trainer_runs.run("ignite", run, tmp_path / "resumed.pt", "--resume")
    assert same_weights(torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "full.pt"))
    files = {p.name for p in run.glob("*.pt")}  # a new Checkpoint handler does not rediscover old files
    assert {"checkpoint_5.pt", "checkpoint_6.pt"} <= files
    assert files == {p.name[: -len(".ckpt-sum")] for p in run.glob("[!.]*.ckpt-sum")}


def test_eviction_waits_for_the_new_file(tmp_path: Path) -> None:
    from ignite.engine import Engine

    model, engine = torch.nn.Linear(2, 2), Engine(lambda e, b: None)
    saver = CkptSaver(str(tmp_path))
    handler = Checkpoint({"model": model, "trainer": engine}, saver, n_saved=1,
                         global_step_transform=lambda *_: engine.state.iteration)
    engine.state.iteration, engine.state.epoch_length, engine.state.max_epochs = 1, 1, 5
    handler(engine)
    saver.remove("checkpoint_1.pt")  # what Checkpoint does first; then its save fails
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises
        saver({"model": model.state_dict(), "bad": _Unpicklable()}, "checkpoint_2.pt")
    # ignite asked to remove checkpoint_1 before the failed save: it is still there, and verifies
    assert last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_1.pt")
    assert not list(tmp_path.glob("checkpoint_2*"))
    engine.state.iteration = 2
    handler(engine)  # the next successful save removes it
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["checkpoint_2.pt"]
    Checkpoint.load_objects({"model": model, "trainer": engine}, checkpoint=str(tmp_path / "checkpoint_2.pt"))


class _Unpicklable:
    def __reduce__(self) -> tuple:
        raise TypeError("cannot pickle this")


def test_damaged_newest_is_skipped_and_named(tmp_path: Path) -> None:
    saver = CkptSaver(str(tmp_path))
    for it in (1, 2, 3):
        saver({"model": {"w": torch.randn(64)}, "trainer": {"iteration": it}}, f"c_{it}.pt")
    data = bytearray((tmp_path / "c_3.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "c_3.pt").write_bytes(bytes(data))
    torch.save({"trainer": {"iteration": 9}}, tmp_path / "stock.pt")
    (tmp_path / "stock.pt").write_bytes((tmp_path / "stock.pt").read_bytes()[:100])  # DiskSaver killed mid-write
    with pytest.warns(UserWarning, match="c_3.pt"):
        assert last_checkpoint(str(tmp_path)) == str(tmp_path / "c_2.pt")
    with pytest.raises(CorruptCheckpointError, match=r"c_3\.pt(.|\n)*c_2\.pt"):
        load(str(tmp_path / "c_3.pt"))


def test_works_on_urls() -> None:
    pytest.importorskip("fsspec")
    url = "memory://ignite-test/run"
    saver = CkptSaver(url)
    for it in (1, 2):
        saver({"model": {"w": torch.full((3,), float(it))}, "trainer": {"iteration": it}}, f"c_{it}.pt")
    saver.remove("c_1.pt")
    saver({"model": {"w": torch.ones(3)}, "trainer": {"iteration": 3}}, "c_3.pt")  # the deferred removal now
    assert last_checkpoint(url) == url + "/c_3.pt"
    assert load(url + "/c_3.pt")["trainer"]["iteration"] == 3
    import fsspec
    names = sorted(p.rsplit("/", 1)[-1] for p in fsspec.filesystem("memory").ls("/ignite-test/run", detail=False))
    assert [n for n in names if n.startswith("c_") and n.endswith(".pt")] == ["c_2.pt", "c_3.pt"]


def test_works_on_s3_across_runs(server: Any, bucket: str) -> None:
    """A real S3 server (moto): a saver writes and rotates, is closed; a new one (the resumed run) writes on."""
    pytest.importorskip("s3fs")
    url, options = f"s3://{bucket}/run", server.options()
    saver = CkptSaver(url, storage_options=options)
    for it in (1, 2):
        saver({"model": {"w": torch.full((3,), float(it))}, "trainer": {"iteration": it}}, f"c_{it}.pt")
    saver.close()
    again = CkptSaver(url, storage_options=options)
    again.remove("c_1.pt")
    again({"model": {"w": torch.ones(3)}, "trainer": {"iteration": 3}}, "c_3.pt")
    assert last_checkpoint(url, options) == url + "/c_3.pt"
    assert load(url + "/c_2.pt", options)["trainer"]["iteration"] == 2
    again.close()
