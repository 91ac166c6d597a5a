"""Exact resume: interrupted and resumed runs end bit-identical to the uninterrupted run.

The four-way proof runs this file as a training script in real subprocesses: a small
transformer with dropout, AdamW, a warmup schedule, an EMA, CPU autocast (bfloat16)
with a GradScaler, a shuffled DataLoader over a ResumableSampler, random augmentation
in the dataset, and Python/NumPy/torch/Generator randomness in the loop. Runs:
(a) uninterrupted; (b) SIGKILL after an epoch-end checkpoint; (c) SIGKILL mid-epoch
after a step checkpoint; (d) SIGTERM mid-epoch (clean exit); (b)-(d) are resumed and
must end with every parameter, optimizer, scheduler, scaler, EMA and RNG state equal
to (a). A control run that draws one extra random number after resuming must differ.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytest
import torch

import ckpt
from ckpt import state

EPOCHS, SAMPLES, BATCH, SAVE_EVERY = 3, 42, 4, 4  # 10 batches per epoch (drop_last), 30 steps
CHILD_DEADLINE = 300.0  # seconds: generous on a loaded machine; a run that needs more has hung


# -- the training script -------------------------------------------------------------

class Tokens(torch.utils.data.Dataset):
    """Fixed random sequences; __getitem__ masks tokens with the global torch RNG."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randint(1, 16, (SAMPLES, 8), generator=g)
        self.y = torch.randint(0, 4, (SAMPLES,), generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        keep = torch.rand(8) > 0.1  # augmentation drawn while the batch is fetched
        return self.x[i] * keep, self.y[i]


class TinyTransformer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 16)
        self.encoder = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1,
                                                        batch_first=True)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x) + noise).mean(dim=1))


def train(directory: str, out: str, pause_at: int, perturb: bool) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dataset = Tokens()
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    noise = torch.Generator().manual_seed(7)
    sampler = ckpt.ResumableSampler(dataset, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=sampler, drop_last=True)
    mgr = ckpt.CheckpointManager(directory, model=model, optimizer=opt, scheduler=sched,
                                 scaler=scaler, ema=ema, sampler=sampler, noise=noise,
                                 keep_last=3, preemption=True)
    start = mgr.resume()
    step = mgr.step
    if mgr.resumed:
        print("RESUMED", json.dumps({"epoch": mgr.resumed.epoch, "step": step,
                                     "mid_epoch": mgr.resumed.mid_epoch, "start": start}), flush=True)
        if perturb:
            sampler._resume_rng = None  # the control: skip the RNG re-application
    for epoch in range(start, EPOCHS):
        sampler.set_epoch(epoch)
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(x, 0.01 * torch.randn(x.shape[0], 8, 16, generator=noise))
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
            loss = loss * (1 + 0.1 * random.random()) + 0.01 * float(np.random.rand())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            ema.update_parameters(model)
            step += 1
            print(f"STEP {epoch} {step} {loss.item().hex()}", flush=True)
            if step == pause_at:
                _pause(mgr)
            mgr.save_if_preempted(epoch=epoch, step=step)
            if step % SAVE_EVERY == 0:
                mgr.save(epoch=epoch, step=step, mid_epoch=True)
        mgr.save(epoch=epoch, step=step)
    mgr.close()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.state_dict(), "noise": noise.get_state(), "rng": state.capture_rng()}, out)


def _pause(mgr: ckpt.CheckpointManager) -> None:
    """Wait here for the parent's signal (SIGKILL ends the process, SIGTERM sets the flag)."""
    print("PAUSED", flush=True)
    deadline = time.monotonic() + CHILD_DEADLINE
    while not mgr.preempted and time.monotonic() < deadline:
        time.sleep(0.01)


# -- the parent side -----------------------------------------------------------------

class Run:
    """One training process; ``lines`` holds its stdout."""

    def __init__(self, directory: Path, out: Path, pause_at: int = 0, perturb: bool = False) -> None:
        args = [sys.executable, __file__, str(directory), str(out), str(pause_at), str(int(perturb))]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: List[str] = []

    def read_until(self, marker: str) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())
            if line.strip() == marker:
                return
        raise AssertionError(f"process ended before {marker!r}: {self.proc.stderr.read()}")

    def finish(self, sig: Optional[int] = None) -> Tuple[int, str]:
        if sig is not None:
            self.proc.send_signal(sig)
        stdout, stderr = self.proc.communicate(timeout=CHILD_DEADLINE)
        self.lines += [line.strip() for line in stdout.splitlines()]
        return self.proc.returncode, stderr

    def reap(self) -> None:
        """Kill the process if it still runs and collect it (a failed assertion leaves none behind)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def steps(self) -> Dict[int, str]:
        return {int(line.split()[2]): line for line in self.lines if line.startswith("STEP")}

    def resumed(self) -> Dict[str, Any]:
        found = [json.loads(line[len("RESUMED "):]) for line in self.lines if line.startswith("RESUMED")]
        assert len(found) == 1, self.lines
        return found[0]


@pytest.fixture
def start() -> Iterator[Callable[..., Run]]:
    """``start(directory, out, ...)`` starts a :class:`Run`; every run is reaped at teardown."""
    started: List[Run] = []

    def make(*args: Any, **kwargs: Any) -> Run:
        started.append(Run(*args, **kwargs))
        return started[-1]

    yield make
    for run in started:
        run.reap()


def _resume(run: Run) -> Run:
    code, err = run.finish()
    assert code == 0, err
    return run


def _assert_same(a: Any, b: Any, where: str = "final") -> None:
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_four_way_resume_is_bit_exact(tmp_path: Path, start: Callable[..., Run]) -> None:
    # Phase 1, in parallel: (a) whole; (b), (c), (d) up to the step where they are stopped:
    # (b) step 12, after the checkpoint closing epoch 0 (step 10); (c) step 18, mid-epoch 1,
    # after the step-16 checkpoint; (d) step 23, mid-epoch 2, no checkpoint since step 20.
    baseline = start(tmp_path / "a", tmp_path / "a.pt")
    stops = {"b": (12, signal.SIGKILL), "c": (18, signal.SIGKILL), "d": (23, signal.SIGTERM)}
    first = {name: start(tmp_path / name, tmp_path / f"{name}.pt", pause_at)
             for name, (pause_at, _) in stops.items()}
    for name, run in first.items():
        run.read_until("PAUSED")
        code, err = run.finish(stops[name][1])
        if name == "d":  # saved at the step boundary, clean exit
            assert code == 128 + signal.SIGTERM, err
            assert "received SIGTERM" in err and "Traceback" not in err, err
        else:
            assert code == -signal.SIGKILL
    shutil.copytree(tmp_path / "c", tmp_path / "control")
    code, err = baseline.finish()
    assert code == 0, err
    lines = baseline.steps()
    assert sorted(lines) == list(range(1, EPOCHS * (SAMPLES // BATCH) + 1))

    # Phase 2, in parallel: resume (b), (c), (d), and the control.
    second = {name: start(tmp_path / name, tmp_path / f"{name}.pt") for name in stops}
    control = start(tmp_path / "control", tmp_path / "control.pt", perturb=True)
    expected = {"b": {"epoch": 0, "step": 10, "mid_epoch": False, "start": 1},
                "c": {"epoch": 1, "step": 16, "mid_epoch": True, "start": 1},
                "d": {"epoch": 2, "step": 23, "mid_epoch": True, "start": 2}}
    reference = torch.load(tmp_path / "a.pt", weights_only=True)
    for name, run in second.items():
        _resume(run)
        assert run.resumed() == expected[name]
        for step, line in run.steps().items():  # the same batches, losses to the last bit
            assert line == lines[step], f"run {name}, step {step}"
        _assert_same(reference, torch.load(tmp_path / f"{name}.pt", weights_only=True), name)

    # Control: without re-applying the checkpoint's RNG at the first remaining batch, the
    # DataLoader's seed draw shifts torch's RNG by one number, and the result differs.
    _resume(control)
    result = torch.load(tmp_path / "control.pt", weights_only=True)
    assert not all(torch.equal(reference["model"][k], result["model"][k]) for k in reference["model"])


# -- in-process: RNG states and tracked generators ------------------------------------

def _draws(gen: torch.Generator) -> List[Any]:
    return [random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()),
            torch.rand(3).tolist(), torch.rand(2, generator=gen).tolist()]


def test_rng_and_generator_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    model = torch.nn.Linear(2, 2)
    random.gauss(0, 1)  # leaves Python's gauss_next cached
    np.random.randn()   # leaves NumPy's cached gaussian
    with ckpt.CheckpointManager(tmp_path, model=model, loader_generator=gen) as mgr:
        mgr.save(epoch=0, step=1)
        expected = _draws(gen)
    _draws(gen)
    gen.manual_seed(99)
    with ckpt.CheckpointManager(tmp_path, model=model, loader_generator=gen) as mgr:
        mgr.resume()
        assert _draws(gen) == expected


def test_checkpoint_with_generator_loads_with_plain_torch_load(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    with ckpt.CheckpointManager(tmp_path, generator=gen) as mgr:
        record = mgr.save(epoch=0)
    saved = torch.load(record.path, weights_only=True)["generator"]
    assert torch.equal(saved["generator_state"], gen.get_state()) and saved["device"] == "cpu"


def test_disabled_grad_scaler_and_ema_resume(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    ema = torch.optim.swa_utils.AveragedModel(model)
    ema.update_parameters(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # AMP off: its state is {}
    with ckpt.CheckpointManager(tmp_path, model=model, ema=ema, scaler=scaler) as mgr:
        mgr.save(epoch=0)
    ema2 = torch.optim.swa_utils.AveragedModel(torch.nn.Linear(2, 2))
    with ckpt.CheckpointManager(tmp_path, model=torch.nn.Linear(2, 2), ema=ema2,
                                scaler=torch.amp.GradScaler("cpu", enabled=False)) as mgr:
        assert mgr.resume() == 1
    _assert_same(ema.state_dict(), ema2.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_and_generator_restored_with_cuda_map_location(tmp_path: Path) -> None:
    gen = torch.Generator(device="cuda").manual_seed(3)
    torch.cuda.manual_seed_all(1)
    torch.rand(1, device="cuda")  # initialises CUDA, so its RNG is captured
    with ckpt.CheckpointManager(tmp_path, gen=gen, map_location="cuda") as mgr:
        mgr.save(epoch=0)
        expected = (torch.rand(4, device="cuda").tolist(),
                    torch.rand(4, device="cuda", generator=gen).tolist())
    torch.rand(4, device="cuda")
    with ckpt.CheckpointManager(tmp_path, gen=gen, map_location="cuda") as mgr:
        mgr.resume()
        assert (torch.rand(4, device="cuda").tolist(),
                torch.rand(4, device="cuda", generator=gen).tolist()) == expected


if __name__ == "__main__":
    train(sys.argv[1], sys.argv[2], int(sys.argv[3]), bool(int(sys.argv[4])))
