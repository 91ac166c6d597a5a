"""A misplaced output path or a bad run directory string never replaces a checkpoint
and never becomes a stray local directory (attacks of the hardening round)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckpt
from ckpt import CheckpointExistsError, CheckpointManager, ConfigError
from ckpt.cli import main


def make_run(directory: Path) -> CheckpointManager:
    mgr = CheckpointManager(directory, model=torch.nn.Linear(3, 2))
    for epoch in range(3):
        mgr.save(epoch=epoch, step=epoch + 1, metrics={"val_loss": 1.0 / (epoch + 1)})
    return mgr


@pytest.fixture
def run(tmp_path: Path) -> Path:
    make_run(tmp_path / "run").close()
    return tmp_path / "run"


def test_cli_export_onto_a_committed_checkpoint_refuses(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = sorted(run.glob("ckpt-e*.pt"))[:2]
    before = b.read_bytes()
    code = main(["export", str(a), "--to", str(b)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ckpt: error: ") and len(err.splitlines()) == 1, err
    assert str(b) in err and "committed checkpoint (epoch 1, step 2)" in err and "hint:" in err
    assert b.read_bytes() == before
    mgr = CheckpointManager(run, model=torch.nn.Linear(3, 2))
    assert mgr.resume() == 3 and len(mgr.checkpoints) == 3 and not list(run.glob("*.corrupt"))


@pytest.mark.parametrize("writer", ["save_model", "save_safetensors", "export"])
def test_library_writers_refuse_a_committed_checkpoint(run: Path, writer: str) -> None:
    target = sorted(run.glob("ckpt-e*.pt"))[-1]
    before = target.read_bytes()
    model = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointExistsError) as e:
        if writer == "save_model":
            ckpt.save_model(model, target)
        elif writer == "save_safetensors":
            ckpt.save_safetensors(model, target)
        else:
            ckpt.export(model, target, torch.randn(2, 3), method="trace")
    assert str(target) in str(e.value) and "nothing was written" in str(e.value) and "hint:" in str(e.value)
    assert target.read_bytes() == before


def test_reserved_names_in_a_run_directory_refuse_and_other_names_write(run: Path) -> None:
    model = torch.nn.Linear(3, 2)
    for name in ("ckpt-e000009-s000000009.pt", "ckpt-index.json", "ckpt-blob-0123456789abcdef.pt"):
        with pytest.raises((ConfigError, CheckpointExistsError)):
            ckpt.save_model(model, run / name)
        if name != "ckpt-index.json":
            assert not (run / name).exists()
    assert ckpt.save_model(model, run / "model.pt").exists()  # an ordinary name beside the checkpoints
    assert ckpt.save_safetensors(model, run / "model.safetensors").exists()
    elsewhere = run.parent / "plain" / "ckpt-e000001-s000000002.pt"  # not a run directory: any name
    assert ckpt.save_model(model, elsewhere).exists()
    mgr = CheckpointManager(run, model=torch.nn.Linear(3, 2))
    assert len(mgr.checkpoints) == 3 and mgr.resume() == 3


BAD_LOCATIONS = ["s3://", "s3:///", "gs://", "az://", "memory://", "file://", "", "  ", "s3:bucket/run", "gs:/b/run"]


@pytest.mark.parametrize("location", BAD_LOCATIONS)
def test_a_location_with_no_bucket_or_path_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             location: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        CheckpointManager(location, model=torch.nn.Linear(2, 2))
    assert "nothing was written" in str(e.value) and "hint:" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no ./s3: directory, nothing in the cwd


@pytest.mark.parametrize("command", ["ls", "prune", "verify"])
@pytest.mark.parametrize("location", ["s3://", "s3:///", "memory://", "gs://"])
def test_cli_refuses_a_url_with_no_bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], command: str, location: str) -> None:
    monkeypatch.chdir(tmp_path)
    args = [command, location] + (["--keep-last", "1", "--yes"] if command == "prune" else [])
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ckpt: error: ") and "names no bucket or path" in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_local_directory_with_a_colon_still_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ab:cd").mkdir()
    with CheckpointManager("ab:cd", model=torch.nn.Linear(2, 2)) as mgr:
        mgr.save(epoch=0)
    assert len(list((tmp_path / "ab:cd").glob("ckpt-e*.pt"))) == 1
