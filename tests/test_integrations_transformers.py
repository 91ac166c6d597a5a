"""ckpt's CheckpointCallback with the real Hugging Face Trainer (tiny BERT from a config, CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import trainer_runs  # noqa: E402
from helpers import same_weights  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from ckpt.errors import CorruptCheckpointError  # noqa: E402
from ckpt.integrations.transformers import MANIFEST, commit_directory, last_checkpoint, verify_directory  # noqa: E402

SECOND = 2 * trainer_runs.HF_SAVE_EVERY


def _writing_second(d: Path) -> bool:
    """The Trainer is inside its second save: model and optimizer written, no manifest."""
    half = d / f"checkpoint-{SECOND}"
    return (half / "optimizer.pt").exists() and (d / f"checkpoint-{trainer_runs.HF_SAVE_EVERY}" / MANIFEST).exists()


@pytest.mark.slow
def test_kill_during_save_never_resumes_from_it_and_resume_is_bit_exact(tmp_path: Path) -> None:
    trainer_runs.run("hf", tmp_path / "full", tmp_path / "full.pt")
    run = tmp_path / "run"
    trainer_runs.run_and_kill("hf", run, _writing_second)
    # the Trainer's own choice is the half-written directory; ckpt's is the committed one
    assert get_last_checkpoint(str(run)) == str(run / f"checkpoint-{SECOND}")
    with pytest.warns(UserWarning, match=f"checkpoint-{SECOND}"):
        assert last_checkpoint(run) == str(run / f"checkpoint-{trainer_runs.HF_SAVE_EVERY}")
    trainer_runs.run("hf", run, tmp_path / "resumed.pt", "--resume")
    assert same_weights(torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "full.pt"))
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
