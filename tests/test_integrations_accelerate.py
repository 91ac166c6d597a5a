"""Accelerate-prepared model, optimizer, scheduler and data loader tracked by CheckpointManager
(CPU): a run stopped mid-epoch and resumed by fresh objects equals the uninterrupted run; a
real fit SIGKILLed from outside, on one process and on two (torchrun, gloo), resumes bit-exact."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("torchdata.stateful_dataloader")

import trainer_runs  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DataLoaderConfiguration  # noqa: E402
from helpers import same_weights  # noqa: E402

from ckpt import CheckpointManager  # noqa: E402


def fit(directory: Path, log: List[Any], stop: Optional[int] = None, resume: bool = False) -> Dict[str, Any]:
    torch.manual_seed(0)
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_stateful_dataloader=True,
                                                                          use_seedable_sampler=True))
    model = trainer_runs.net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4)
    loader = torch.utils.data.DataLoader(trainer_runs.data(), batch_size=8, shuffle=True)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    with CheckpointManager(directory, model=model, optimizer=opt, scheduler=sched, loader=loader) as mgr:
        start = mgr.resume() if resume else 0
        step = mgr.step if resume else 0
        for epoch in range(start, 2):
            for x, y in loader:
                log.append(x.sum().item())
                opt.zero_grad()
                acc.backward(torch.nn.functional.mse_loss(model(x), y))
                opt.step()
                sched.step()
                step += 1
                if step == stop:
                    mgr.save(epoch=epoch, step=step, mid_epoch=True)
                    return {}
    return {k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()}


@pytest.mark.parametrize("stop", [3, 6, 8], ids=["epoch-0", "end-of-epoch-0", "epoch-1"])
def test_prepared_objects_resume_mid_epoch_exactly(tmp_path: Path, stop: int) -> None:
    """6 batches an epoch: inside epoch 0, at its last batch, inside epoch 1 (the seedable
    sampler's epoch count must come back too, or epoch 1 is shuffled as epoch 0)."""
    full_log: List[Any] = []
    full = fit(tmp_path / "full", full_log)
    log: List[Any] = []
    fit(tmp_path / "run", log, stop=stop)
    resumed = fit(tmp_path / "run", log, resume=True)
    assert log == full_log  # same batches, none repeated or skipped
    assert same_weights(resumed, full)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2], ids=["1-process", "2-processes"])
def test_killed_fit_resumes_bit_exact(tmp_path: Path, ranks: int) -> None:
    """One launch runs the uninterrupted fit, then the fit that is SIGKILLed (every rank, by
    PID) after its mid-epoch save at step 8 of 12; a second launch resumes it."""
    launcher = trainer_runs.TORCHRUN_2 if ranks == 2 else (sys.executable,)
    run, full = tmp_path / "run", tmp_path / "full.pt"
    trainer_runs.run_and_kill("accelerate", run, lambda d: full.exists() and trainer_runs.saves(d) >= 2,
                              "--full", str(full), out=tmp_path / "killed.pt", ranks=ranks, launcher=launcher)
    assert not (tmp_path / "killed.pt").exists(), "the kill came too late to test a resume"
    trainer_runs.run("accelerate", run, tmp_path / "resumed.pt", "--resume", launcher=launcher)
    assert same_weights(torch.load(tmp_path / "resumed.pt"), torch.load(full))
