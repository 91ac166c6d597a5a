"""The CLI says only what is true: foreign files' missing counters, weights that are not
metrics, files that are not torch files, nested tensor counts, unimportable model classes,
and foreign counters that would name a save with a negative epoch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Tuple

import pytest
import torch

from ckpt import CheckpointManager
from ckpt.cli import main


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> Tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_show_of_a_bare_state_dict_invents_no_epoch_step_or_metric(tmp_path: Path, capsys) -> None:
    path = tmp_path / "plain.pt"
    torch.save(torch.nn.Linear(3, 1).state_dict(), path)  # its bias is a one-element float tensor
    code, out, _ = run_main(capsys, "show", str(path))
    assert code == 0
    rows = dict(line.split(None, 1) for line in out.splitlines()[:5] if line.strip())
    assert rows["epoch"].startswith("- (not recorded")
    assert rows["step"].strip() == "-"
    assert rows["metrics"].strip() == "-"  # the bias is a weight


def test_show_of_a_foreign_dict_with_counters_shows_them(tmp_path: Path, capsys) -> None:
    path = tmp_path / "old.pt"
    torch.save({"model_state_dict": torch.nn.Linear(3, 1).state_dict(), "epoch": 4, "loss": 0.5}, path)
    code, out, _ = run_main(capsys, "show", str(path))
    assert code == 0 and "epoch       4 (complete)" in out and "loss=0.5" in out


def test_show_of_a_png_says_it_is_not_a_torch_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "curve.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    code, _, err = run_main(capsys, "show", str(path))
    assert code == 1 and "is not a file torch.save writes" in err
    assert "weights_only" not in err and "truncated" not in err


def test_export_of_an_optimizer_counts_its_nested_tensors(tmp_path: Path, capsys) -> None:
    model = torch.nn.Linear(30, 20)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 30)).sum().backward()
    opt.step()
    with CheckpointManager(tmp_path / "run", model=model, optimizer=opt) as mgr:
        rec = mgr.save(epoch=0)
    code, out, _ = run_main(capsys, "export", str(rec.path), "--object", "optimizer", "--to", str(tmp_path / "o.pt"))
    assert code == 0
    assert "wrote" in out and " 6 tensors" in out and "0 B" not in out  # 2 x (step, exp_avg, exp_avg_sq)


def test_show_says_a_class_defined_in_a_script_cannot_be_rebuilt(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import torch, ckpt
        @ckpt.rebuildable
        class Net(torch.nn.Module):
            def __init__(self, n=3):
                super().__init__()
                self.l = torch.nn.Linear(n, 1)
        with ckpt.CheckpointManager("run", model=Net()) as m:
            print(m.save(epoch=0).path)
    """))
    made = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    shown = subprocess.run([sys.executable, "-m", "ckpt", "show", made.stdout.strip()], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "load_model cannot import it" in shown.stdout and "load_model can rebuild it" not in shown.stdout


def test_negative_foreign_counters_never_name_a_save_with_a_negative_epoch(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 1)
    foreign = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": -7, "global_step": -3,
                "loops": {"fit_loop": {"epoch_progress": {"current": {"started": -5, "processed": -6}}}}}, foreign)
    run = tmp_path / "run"
    with CheckpointManager(run, model=model) as mgr:
        rec = mgr.restore(foreign)
        assert rec.epoch >= 0 and rec.step >= 0
        mgr.save(epoch=rec.epoch + 1)
    assert not list(run.glob("ckpt-e-*"))
    assert len(CheckpointManager(run, model=model).checkpoints) == 1
