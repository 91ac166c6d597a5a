"""ckpt's CheckpointCallback with the real Hugging Face Trainer (tiny BERT from a config, CPU)."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import trainer_runs  # noqa: E402
from helpers import same_weights  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from ckpt.errors import CorruptCheckpointError  # noqa: E402
from ckpt.integrations.transformers import INCOMPLETE, MANIFEST, commit_directory, last_checkpoint, verify_directory  # noqa: E402

SECOND = 2 * trainer_runs.HF_SAVE_EVERY


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> trainer_runs.Baseline:
    """The final weights of the uninterrupted run (shared by the kill tests)."""
    return trainer_runs.Baseline(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def zygotes() -> Iterator[trainer_runs.Zygotes]:
    """Two imports of torch and hf for this module's four runs, each forked from one."""
    yield from trainer_runs.zygotes("hf")


def _writing_second(d: Path) -> bool:
    """The Trainer is inside its second save: model and optimizer written, no manifest."""
    half = d / f"checkpoint-{SECOND}"
    return (half / "optimizer.pt").exists() and (d / f"checkpoint-{trainer_runs.HF_SAVE_EVERY}" / MANIFEST).exists()


@pytest.mark.slow
def test_kill_during_save_never_resumes_from_it_and_resume_is_bit_exact(
        tmp_path: Path, baseline: trainer_runs.Baseline, zygotes: trainer_runs.Zygotes) -> None:
    run = tmp_path / "run"
    trainer_runs.run_and_kill("hf", run, lambda d: baseline.ready(d) and _writing_second(d), *baseline.flags(),
                              zygote=zygotes.killed)
    uninterrupted = baseline.weights()
    # the Trainer's own choice is the half-written directory; ckpt's is the committed one
    assert get_last_checkpoint(str(run)) == str(run / f"checkpoint-{SECOND}")
    with pytest.warns(UserWarning, match=f"checkpoint-{SECOND}"):
        assert last_checkpoint(run) == str(run / f"checkpoint-{trainer_runs.HF_SAVE_EVERY}")
    trainer_runs.run("hf", run, tmp_path / "resumed.pt", "--resume", zygote=zygotes.resumed)
    assert same_weights(torch.load(tmp_path / "resumed.pt"), uninterrupted)
    # save_total_limit=1, applied by ckpt after each commit: only the newest committed remains
    left = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-"))
    assert left == [f"checkpoint-{trainer_runs.HF_STEPS}"]
    verify_directory(run / left[0])


def _checkpoint(root: Path, step: int) -> Path:
    d = root / f"checkpoint-{step}"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(bytes(range(256)) * step)
    (d / "sub" / "x.json").write_text("{}")
    commit_directory(d, {"global_step": step})
    return d


def test_damaged_and_incomplete_directories_are_skipped(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-4" / "checkpoint-is-incomplete.txt").write_text("in progress")
    data = bytearray((tmp_path / "checkpoint-3" / "model.safetensors").read_bytes())
    data[10] ^= 1
    (tmp_path / "checkpoint-3" / "model.safetensors").write_bytes(bytes(data))
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-5")
    (tmp_path / "checkpoint-5" / "sub" / "x.json").unlink()  # a file gone
    with pytest.warns(UserWarning) as seen:
        assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert {w.message.args[0].split(":")[0] for w in seen} >= {f"skipping {tmp_path / n}" for n in
                                                                 ("checkpoint-3", "checkpoint-4", "checkpoint-5")}
    with pytest.raises(CorruptCheckpointError, match="model.safetensors fails its checksum"):
        verify_directory(tmp_path / "checkpoint-3")
    assert last_checkpoint(tmp_path / "absent") is None


@pytest.mark.slow
def test_sigterm_with_jit_checkpoint_is_committed_and_resumes_bit_exact(
        tmp_path: Path, baseline: trainer_runs.Baseline, zygotes: trainer_runs.Zygotes) -> None:
    """transformers' enable_jit_checkpoint saves on SIGTERM without calling on_save: ckpt
    commits that checkpoint at the end of training, and a resume from it is exact."""
    run = tmp_path / "run"
    first = f"checkpoint-{trainer_runs.HF_SAVE_EVERY}"
    trainer_runs.run_and_kill("hf", run, lambda d: baseline.ready(d) and (d / first / MANIFEST).exists(),
                              "--jit", *baseline.flags(), sig=signal.SIGTERM, status=0,  # it stops by itself
                              zygote=zygotes.killed)
    uninterrupted = baseline.weights()
    start = last_checkpoint(run)
    assert start is not None
    step = int(Path(start).name.split("-")[1])
    assert step < trainer_runs.HF_STEPS, "the SIGTERM did not stop the run early"
    assert not (Path(start) / INCOMPLETE).exists()
    # The SIGTERM came after the first scheduled save: the JIT checkpoint is a later one, and
    # ckpt committed it (without the callback's commit there is no manifest saying so).
    assert step > trainer_runs.HF_SAVE_EVERY
    jit = [d.name for d in run.glob("checkpoint-*")
           if (d / MANIFEST).exists() and json.loads((d / MANIFEST).read_text()).get("jit") is True]
    assert jit, f"no committed JIT checkpoint among {sorted(p.name for p in run.glob('checkpoint-*'))}"
    trainer_runs.run("hf", run, tmp_path / "resumed.pt", "--resume", zygote=zygotes.resumed)
    assert same_weights(torch.load(tmp_path / "resumed.pt"), uninterrupted)


def test_last_checkpoint_on_s3(tmp_path: Path, server: Any, bucket: str) -> None:
    """Committed folders copied to an object store: the incomplete and the damaged newest
    are skipped with a warning, the newest intact one is returned as a URL."""
    s3fs = pytest.importorskip("s3fs")
    for step in (1, 2, 3):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-3" / INCOMPLETE).write_text("in progress")
    data = bytearray((tmp_path / "checkpoint-2" / "model.safetensors").read_bytes())
    data[7] ^= 1
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(bytes(data))
    fs = s3fs.S3FileSystem(**server.options())
    url = f"s3://{bucket}/run"
    for step in (1, 2, 3):
        fs.put(str(tmp_path / f"checkpoint-{step}"), f"{bucket}/run/checkpoint-{step}", recursive=True)
    fs.put(str(tmp_path / "checkpoint-1" / "model.safetensors"), f"{bucket}/run/checkpoint-4/model.safetensors")
    with pytest.warns(UserWarning) as seen:
        assert last_checkpoint(url, server.options()) == f"{url}/checkpoint-1"
    assert {w.message.args[0].split(":")[0] + ":" + w.message.args[0].split(":")[1] for w in seen} >= {
        f"skipping {url}/checkpoint-{n}" for n in (2, 3, 4)}
    with pytest.raises(CorruptCheckpointError, match="model.safetensors fails its checksum"):
        verify_directory(f"{url}/checkpoint-2", server.options())
    assert last_checkpoint(f"s3://{bucket}/absent", server.options()) is None
