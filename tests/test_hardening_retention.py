"""A typo or a renamed metric never lets retention delete the best checkpoint: the
``ckpt prune`` flags and a restarted manager's ``monitor`` are checked against the
metrics the run's checkpoints record (attacks of the hardening round, each a test that
failed before its fix)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest
import torch

from ckpt import CheckpointManager, ConfigError
from ckpt.cli import main
from ckpt.policy import unknown_monitor

VALS = [0.9, 0.2, 0.5, 0.6, 0.7]  # best: epoch 1


def make_run(directory: Path) -> None:
    model = torch.nn.Linear(2, 2)
    with CheckpointManager(directory, model=model) as mgr:  # no retention: all five kept
        for epoch, v in enumerate(VALS):
            mgr.save(epoch=epoch, step=10 * (epoch + 1), metrics={"val_loss": v, "acc": 1 - v})


def files(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.glob("ckpt-e*.pt"))


def snapshot(directory: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if not p.name.endswith(".lock")}


@pytest.mark.parametrize("yes", [False, True])
@pytest.mark.parametrize("typo,closest", [("val_los", "val_loss"), ("Val_loss", "val_loss"), ("loss", "val_loss"),
                                          ("accuracy", "acc")])
def test_prune_refuses_a_monitor_no_checkpoint_records(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       yes: bool, typo: str, closest: str) -> None:
    make_run(tmp_path)
    before = snapshot(tmp_path)
    code = main(["prune", str(tmp_path), "--keep-best", "1", "--monitor", typo] + (["--yes"] if yes else []))
    out = capsys.readouterr()
    assert code == 2, out
    lines = out.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: error: "), out.err
    assert repr(typo) in lines[0] and "'acc', 'val_loss'" in lines[0] and f"closest: {closest!r}" in lines[0]
    assert "nothing deleted" in lines[0] and f"--monitor {closest}" in lines[0]
    assert out.out == "" and snapshot(tmp_path) == before


def test_prune_with_the_right_monitor_still_prunes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path)
    assert main(["prune", str(tmp_path), "--keep-best", "1", "--monitor", "val_loss", "--yes"]) == 0
    capsys.readouterr()
    assert files(tmp_path) == ["ckpt-e000001-s000000020.pt", "ckpt-e000004-s000000050.pt"]  # best + newest


def test_prune_keep_last_0_says_what_it_keeps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path)
    assert main(["prune", str(tmp_path), "--keep-last", "0"]) == 0
    out = capsys.readouterr().out
    assert "would delete 4 of 5" in out and "keep everything" not in out, out
    assert "keeping 1 by keep_last=0 (the newest and the resume source are always kept)" in out, out
    assert len(files(tmp_path)) == 5


def test_prune_keep_best_on_a_run_without_metrics_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2)) as mgr:
        for epoch in range(3):
            mgr.save(epoch=epoch)
    code = main(["prune", str(tmp_path), "--keep-best", "1", "--monitor", "val_loss", "--yes"])
    err = capsys.readouterr().err
    assert code == 2 and "metrics recorded: none" in err and len(files(tmp_path)) == 3, err


@pytest.mark.parametrize("monitor", ["val_los", "loss", "Val_loss"])
@pytest.mark.parametrize("how", ["mid_epoch", "empty_metrics", "train_metrics"])
def test_a_restarted_manager_with_a_wrong_monitor_deletes_nothing(tmp_path: Path, monitor: str, how: str) -> None:
    make_run(tmp_path)
    before = snapshot(tmp_path)
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2), keep_last=1, keep_best=2, monitor=monitor)
    assert mgr.resume() == 5
    kwargs = {"mid_epoch": {"mid_epoch": True}, "empty_metrics": {"metrics": {}},
              "train_metrics": {"mid_epoch": True, "metrics": {"train_loss": 0.1}}}[how]
    with pytest.raises(ConfigError) as e:
        mgr.save(epoch=5, step=55, **kwargs)  # type: ignore[arg-type]
    text = str(e.value)
    assert repr(monitor) in text and "'acc'" in text and "'val_loss'" in text and "closest: 'val_loss'" in text
    assert "nothing was written or deleted" in text and "monitor='val_loss'" in text
    assert snapshot(tmp_path) == before
    mgr.close()


def test_a_restarted_manager_with_the_right_monitor_keeps_the_best(tmp_path: Path) -> None:
    make_run(tmp_path)
    with CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2), keep_last=1, keep_best=1,
                           monitor="val_loss") as mgr:
        mgr.resume()
        mgr.save(epoch=5, step=55, mid_epoch=True)
    assert files(tmp_path) == ["ckpt-e000001-s000000020.pt", "ckpt-e000005-s000000055.pt"]


def test_a_new_run_may_save_step_checkpoints_before_its_first_metric(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2), keep_last=1, keep_best=1,
                           monitor="val_loss") as mgr:
        mgr.save(epoch=0, step=5, mid_epoch=True, metrics={"train_loss": 1.0})  # normal: no val yet
        mgr.save(epoch=0, step=10, metrics={"val_loss": 0.5})
        mgr.save(epoch=1, step=15, mid_epoch=True)
    assert len(files(tmp_path)) == 2


def test_a_metric_new_to_the_run_is_accepted_when_this_save_carries_it(tmp_path: Path) -> None:
    make_run(tmp_path)
    with CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2), keep_best=1, monitor="val_f1") as mgr:
        mgr.resume()
        mgr.save(epoch=5, step=60, metrics={"val_f1": 0.3})


def test_unknown_monitor_is_a_typed_value() -> None:
    class R:
        def __init__(self, metrics: Dict[str, float], mid_epoch: bool = False) -> None:
            self.epoch, self.step, self.mid_epoch, self.metrics = 0, 0, mid_epoch, metrics
    assert unknown_monitor("val_loss", [R({"val_loss": 1.0})]) is None
    assert unknown_monitor("val_loss", [R({"loss": 1.0}, mid_epoch=True)]) is None  # nothing ranked yet
    got = unknown_monitor("val_loss", [R({"loss": 1.0})])
    assert got is not None and got.seen == ("loss",) and got.closest == "loss"
    assert unknown_monitor("x", [], require=True) is not None
