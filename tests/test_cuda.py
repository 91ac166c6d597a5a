"""CUDA paths: run only where a GPU exists (CI on this project is CPU-only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckpt import CheckpointManager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_gpu_checkpoint_loads_into_cpu_model(tmp_path: Path) -> None:
    gpu = torch.nn.Linear(8, 4).cuda()
    opt = torch.optim.AdamW(gpu.parameters())
    gpu(torch.randn(2, 8, device="cuda")).sum().backward()
    opt.step()
    CheckpointManager(tmp_path, model=gpu, optimizer=opt).save(epoch=0)

    cpu = torch.nn.Linear(8, 4)
    cpu_opt = torch.optim.AdamW(cpu.parameters())
    assert CheckpointManager(tmp_path, model=cpu, optimizer=cpu_opt).resume() == 1
    assert torch.equal(cpu.weight, gpu.weight.cpu())
    exp_avg = cpu_opt.state_dict()["state"][0]["exp_avg"]
    assert exp_avg.device.type == "cpu"
    assert torch.equal(exp_avg, opt.state_dict()["state"][0]["exp_avg"].cpu())


def test_cuda_rng_is_restored_on_every_device(tmp_path: Path) -> None:
    torch.cuda.manual_seed_all(123)
    torch.rand(1, device="cuda")
    mgr = CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2))
    mgr.save(epoch=0)
    expected = [torch.rand(4, device=f"cuda:{d}") for d in range(torch.cuda.device_count())]
    torch.cuda.manual_seed_all(999)
    mgr.restore("latest")
    again = [torch.rand(4, device=f"cuda:{d}") for d in range(torch.cuda.device_count())]
    assert all(torch.equal(a, b) for a, b in zip(expected, again))


def test_gpu_resume_into_gpu_model_keeps_device(tmp_path: Path) -> None:
    model = torch.nn.Linear(8, 4).cuda()
    CheckpointManager(tmp_path, model=model).save(epoch=3)
    fresh = torch.nn.Linear(8, 4).cuda()
    assert CheckpointManager(tmp_path, model=fresh, map_location="cuda").resume() == 4
    assert fresh.weight.device.type == "cuda" and torch.equal(fresh.weight, model.weight)
