"""The README's main example: kill it with SIGKILL after a checkpoint, run it again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_and_resume.py"


def run_until_saved(directory: Path, epochs: int, saves: int) -> str:
    """Start the example, SIGKILL it once ``saves`` checkpoints were reported; its output."""
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--dir", str(directory), "--epochs", str(epochs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if sum("saved ckpt-" in seen for seen in lines) >= saves:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    return "".join(lines)


def committed_epochs(directory: Path) -> list:
    index = json.loads((directory / "ckpt-index.json").read_text())
    return [entry["epoch"] for entry in index["checkpoints"]]


@pytest.mark.slow
def test_killed_example_resumes_at_next_epoch(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = run_until_saved(run, epochs=12, saves=2)
    assert "fresh run" in first
    last = max(committed_epochs(run))
    assert last >= 1  # at least the two reported saves are committed

    second = subprocess.run([sys.executable, str(EXAMPLE), "--dir", str(run), "--epochs", "12"],
                            capture_output=True, text=True, timeout=300, check=True).stdout
    resumed = re.search(r"continuing at epoch (\d+)", second)
    assert resumed, second
    assert int(resumed.group(1)) == last + 1
    assert f"epoch {last}:" not in second  # no epoch is trained twice
    assert "epoch 11:" in second and "done; kept epochs" in second
    # retention: the 3 newest, the 2 best and every 5th epoch; nothing else remains
    kept = committed_epochs(run)
    assert {9, 10, 11} <= set(kept) and {4, 9} <= set(kept)
    assert len(kept) <= 3 + 2 + 2
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".ckpt-tmp-")) == []


def _default_sigint() -> None:
    """In the child: Ctrl-C's default, even when this runner was started with SIGINT ignored
    (a background job), which the child would inherit and never see a KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("example, saved", [("train_and_resume.py", "saved ckpt-"), ("train_mid_epoch.py", "epoch 0:")])
def test_ctrl_c_ends_the_examples_cleanly_and_keeps_their_checkpoints(tmp_path: Path, example: str, saved: str) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(EXAMPLE.parent / example), "--dir", str(run), "--epochs", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(EXAMPLE.parents[1])},
                            preexec_fn=_default_sigint)
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if saved in line:
                proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
                break
        lines.append(proc.communicate(timeout=300)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    output = "".join(lines)
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "run the same command again" in output
    assert committed_epochs(run) and not [p for p in run.iterdir() if p.name.startswith(".ckpt-tmp-")]
