"""``python -m ckpt`` list / verify / inspect on a real directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from ckpt import CheckpointManager


def ckpt_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt", *args], capture_output=True, text=True, timeout=120)


def make_run(directory: Path) -> CheckpointManager:
    model = torch.nn.Linear(3, 2)
    mgr = CheckpointManager(directory, model=model)
    for epoch in range(3):
        mgr.save(epoch=epoch, step=10 * epoch, metrics={"val_loss": 1.0 / (epoch + 1)})
    return mgr


def test_list_shows_every_checkpoint(tmp_path: Path) -> None:
    make_run(tmp_path)
    out = ckpt_cli("list", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()] == [
        "ckpt-e000000-s000000000.pt", "ckpt-e000001-s000000010.pt", "ckpt-e000002-s000000020.pt"]
    as_json = json.loads(ckpt_cli("list", "--json", str(tmp_path)).stdout)
    assert [r["epoch"] for r in as_json] == [0, 1, 2]
    assert as_json[2]["metrics"] == {"val_loss": 1.0 / 3}


def test_verify_flags_a_flipped_byte(tmp_path: Path) -> None:
    mgr = make_run(tmp_path)
    assert ckpt_cli("verify", str(tmp_path)).returncode == 0
    victim = mgr.checkpoints[1].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    out = ckpt_cli("verify", str(tmp_path))
    assert out.returncode == 1
    assert f"{victim.name}: damaged" in out.stdout and "2 ok, 1 bad" in out.stdout


def test_inspect_and_bad_arguments(tmp_path: Path) -> None:
    mgr = make_run(tmp_path)
    info = json.loads(ckpt_cli("inspect", str(mgr.latest.path)).stdout)
    assert (info["epoch"], info["step"], info["objects"]) == (2, 20, ["model"])
    missing = ckpt_cli("list", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "not a directory" in missing.stderr
    foreign = tmp_path / "notes.txt"
    foreign.write_text("hello")
    bad = ckpt_cli("inspect", str(foreign))
    assert bad.returncode == 2 and str(foreign) in bad.stderr
