"""Checkpoints written by ckpt 0.2.0 (format version 1) restore exactly with this release.

The files under tests/golden/v1/ are never rewritten to make a release pass (see
docs/explanation/format.md): a format change means a new version, a new golden folder,
and a reader that keeps these passing. Every expected value is recomputed from the
formula in tests/golden/make_golden.py, or read from expected.json beside the files.
Each test works on a copy (a manager writes into the directory it opens).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt import CheckpointManager, ResumableSampler

GOLDEN = Path(__file__).resolve().parent / "golden"
V1 = GOLDEN / "v1"
sys.path.insert(0, str(GOLDEN))
import make_golden as gold  # noqa: E402

EXPECTED = json.loads((V1 / "expected.json").read_text())


def formula(epoch: int) -> torch.nn.Module:
    model = gold.small_model()
    gold.weights(model, epoch)
    return model


def assert_params(model: torch.nn.Module, expected: torch.nn.Module, offset: float = 0.0) -> None:
    got, want = model.state_dict(), expected.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name], want[name] + offset), name


def copy_of(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(V1 / name, target)
    return target


def manager(directory: Path) -> tuple:
    model = gold.small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sampler = ResumableSampler(gold.SAMPLES, seed=3)
    mgr = CheckpointManager(directory, model=model, optimizer=opt, sampler=sampler, keep_last=2, keep_best=1,
                            monitor="val_loss", mode="min", keep_every=3)
    return mgr, model, opt, sampler


def test_every_file_loads_with_plain_torch() -> None:
    for path in sorted((V1 / "run").glob("ckpt-*.pt")) + [V1 / "model.pt"]:
        obj = torch.load(path, weights_only=True)
        assert obj["ckpt"]["format"] == 1, path


def test_run_resumes_mid_epoch_exactly(tmp_path: Path) -> None:
    expected = EXPECTED["run"]
    mgr, model, opt, sampler = manager(copy_of("run", tmp_path))
    with mgr:
        assert [[r.epoch, r.step] for r in mgr.checkpoints] == expected["kept"]
        assert set(mgr.verify().values()) == {"ok"}
        assert mgr.resume() == gold.EPOCHS  # a mid-epoch checkpoint: the same epoch again
        drawn = random.random(), torch.rand(3).tolist()  # first: building the expected model draws too
        assert drawn == (expected["after_resume_rng"]["python"], expected["after_resume_rng"]["torch"])
        assert (mgr.step, mgr.resumed.mid_epoch, mgr.resumed.extra) == (gold.MID_STEP, True, {"note": "mid-epoch"})
        assert_params(model, formula(gold.EPOCHS), offset=-0.125)  # one SGD step, lr 0.5, gradient 0.25
        buffers = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
        assert all(torch.equal(b, torch.full_like(b, 0.25)) for b in buffers)
        sampler.set_epoch(gold.EPOCHS)
        assert list(sampler) == expected["rest"]
        assert sorted(expected["served"] + expected["rest"]) == list(range(gold.SAMPLES))


def test_run_restores_best_and_milestone(tmp_path: Path) -> None:
    mgr, model, _, _ = manager(copy_of("run", tmp_path))
    with mgr:
        best = mgr.restore("best")
        assert (best.epoch, best.metrics, best.extra) == (1, {"val_loss": 0.4}, {"note": "epoch 1", "lr": 0.5})
        assert_params(model, formula(1))
        milestone = mgr.restore(2)
        assert milestone.step == 30
        assert_params(model, formula(2))


def test_model_file_rebuilds_its_architecture() -> None:
    model = ckpt.load_model(V1 / "model.pt")
    assert isinstance(model, torch.nn.Sequential) and not model.training
    assert_params(model, formula(EXPECTED["model"]["epoch_formula"]))


@pytest.mark.filterwarnings("ignore:the checkpoint has RNG states of 2 ranks")
def test_sharded_directory_restores_in_one_process(tmp_path: Path) -> None:
    model = gold.small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with CheckpointManager(copy_of("sharded", tmp_path), model=model, optimizer=opt, keep_last=1) as mgr:
        assert set(mgr.verify().values()) == {"ok"}
        assert mgr.resume() == 3
        assert mgr.resumed.extra == {"world": EXPECTED["sharded"]["world"]}
        assert_params(model, formula(EXPECTED["sharded"]["epoch_formula"]))


def test_sharded_directory_exports_to_a_plain_file(tmp_path: Path) -> None:
    source = next((V1 / "sharded").glob("*.dcp"))
    out = tmp_path / "full.pt"
    ckpt.export_sharded(source, out)
    state = torch.load(out, weights_only=True)
    model = gold.small_model()
    model.load_state_dict(state["model"])
    assert_params(model, formula(2))


def diff_formula(epoch: int) -> torch.nn.Module:
    model = gold.diff_model()
    gold.diff_weights(model, epoch)
    return model


def assert_bits(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = model.state_dict(), expected.state_dict()
    assert list(got) == list(want)
    for name in want:
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name


def test_differential_run_restores_every_kept_checkpoint_exactly(tmp_path: Path) -> None:
    expected = EXPECTED["differential"]
    run = copy_of("differential", tmp_path)
    assert not (run / "ckpt-e000000-s000000000.pt").exists()  # the first writer of the table's chunks is gone
    model = gold.diff_model()
    with CheckpointManager(run, model=model, keep_last=2, differential=True, progress=False) as mgr:
        assert [[r.epoch, r.step] for r in mgr.checkpoints] == expected["kept"]
        assert all(expected["first_pack"] in {n for n, _ in r.blobs} for r in mgr.checkpoints)
        assert set(mgr.verify().values()) == {"ok"}
        for epoch, _ in expected["kept"]:
            rec = mgr.restore(epoch)
            assert rec.extra == {"note": f"epoch {epoch}"}
            assert_bits(model, diff_formula(epoch))
        assert mgr.resume() == 4
        # the run goes on: a new differential save on top of the golden files
        with torch.no_grad():
            model[0].weight[7] += 1.0
        mgr.save(epoch=4)
    again = gold.diff_model()
    CheckpointManager(run, model=again).restore(4)
    want = diff_formula(3)
    with torch.no_grad():
        want[0].weight[7] += 1.0
    assert_bits(again, want)


def test_differential_run_exports_standalone_and_verify_checks_every_pack(tmp_path: Path) -> None:
    run = copy_of("differential", tmp_path)
    newest = run / "ckpt-e000003-s000000000.pt"
    out = tmp_path / "plain.pt"
    done = subprocess.run([sys.executable, "-m", "ckpt", "export", str(newest), "--to", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    plain = torch.load(out, weights_only=True)  # no ckpt needed, no reference left
    model = gold.diff_model()
    model.load_state_dict(plain)
    assert_bits(model, diff_formula(3))
    assert subprocess.run([sys.executable, "-m", "ckpt", "verify", str(run)], capture_output=True,
                          timeout=300).returncode == 0
    first = EXPECTED["differential"]["first_pack"]
    (run / first).unlink()  # referenced by both kept checkpoints
    done = subprocess.run([sys.executable, "-m", "ckpt", "verify", str(run)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1 and done.stdout.count(f"{first} is missing") == 2, done.stdout
