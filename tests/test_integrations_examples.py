"""The trainer examples run end to end on CPU (short settings), and a second run resumes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CASES = {"lightning_train.py": ("pytorch_lightning", ["--epochs", "2"]),
         "ignite_train.py": ("ignite", ["--epochs", "2"]),
         "accelerate_train.py": ("accelerate", ["--epochs", "1"]),
         "hf_train.py": ("transformers", ["--steps", "10"])}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_and_resumes(tmp_path: Path, name: str) -> None:
    module, flags = CASES[name]
    pytest.importorskip(module)
    cmd = [sys.executable, str(EXAMPLES / name), "--dir", str(tmp_path / "run"), *flags]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert first.returncode == 0 and "fresh run" in first.stdout and "done" in first.stdout, first.stderr[-2000:]
    if name == "accelerate_train.py":  # the cheapest second run: show the resume
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert second.returncode == 0 and "resuming at epoch 1" in second.stdout, second.stderr[-2000:]
