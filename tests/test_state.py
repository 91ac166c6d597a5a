"""State capture/restore: trackables, wrapper prefixes, mismatches, RNG states."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import same_weights
from torch.optim import lr_scheduler as L

from ckpt import CheckpointManager, state
from ckpt import schema as format
from ckpt.errors import ConfigError, StateMismatchError
from ckpt.schema import file_name


class Holder(torch.nn.Module):
    """A user model whose only child is named ``module``: not a wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.module = torch.nn.Linear(3, 2)


def linear(seed: int = 0, n_in: int = 3, n_out: int = 2) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(n_in, n_out)


# -- wrappers -------------------------------------------------------------------------

def test_unwrap_finds_the_module_inside_data_parallel():
    inner = linear()
    assert state.unwrap(torch.nn.DataParallel(inner)) is inner
    assert state.unwrap(torch.nn.DataParallel(torch.nn.DataParallel(inner))) is inner
    assert state.unwrap(inner) is inner


def test_unwrap_leaves_user_modules_and_other_objects_alone():
    holder = Holder()
    assert state.unwrap(holder) is holder
    opt = torch.optim.SGD(linear().parameters(), lr=0.1)
    assert state.unwrap(opt) is opt


def test_capture_saves_wrapped_models_under_plain_names():
    inner = linear()
    captured = state.capture({"model": torch.nn.DataParallel(inner)})
    assert list(captured["model"]) == ["weight", "bias"]


@pytest.mark.parametrize("keys, expected", [
    (["module.w", "module.b"], ["w", "b"]),
    (["_orig_mod.w", "_orig_mod.b"], ["w", "b"]),
    (["_orig_mod.module.w"], ["w"]),
    (["module._orig_mod.w"], ["w"]),
    (["module.w", "b"], ["module.w", "b"]),  # not every key: a real child named module
    (["w"], ["w"]),
    ([], []),
])
def test_strip_wrapper_prefix(keys, expected):
    assert list(state.strip_wrapper_prefix({k: 0 for k in keys})) == expected


def test_strip_wrapper_prefix_keeps_keys_that_already_fit():
    saved = Holder().state_dict()
    assert list(state.strip_wrapper_prefix(saved, Holder().state_dict().keys())) == ["module.weight", "module.bias"]


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_prefixed_state_loads_into_a_plain_model(prefix):
    source, target = linear(1), linear(2)
    saved = {prefix + k: v for k, v in source.state_dict().items()}
    state.restore({"model": target}, {"model": saved}, strict=True, path="f.pt")
    assert same_weights(target.state_dict(), source.state_dict())


def test_plain_state_loads_into_a_wrapped_model():
    source, target = linear(1), linear(2)
    state.restore({"model": torch.nn.DataParallel(target)}, {"model": source.state_dict()}, strict=True, path="f")
    assert same_weights(target.state_dict(), source.state_dict())


def test_a_model_with_a_child_named_module_loads_its_own_state():
    source, target = Holder(), Holder()
    state.restore({"model": target}, {"model": source.state_dict()}, strict=True, path="f.pt")
    assert same_weights(target.state_dict(), source.state_dict())


# -- mismatches -----------------------------------------------------------------------

def test_shape_mismatch_names_the_key_and_both_shapes_and_changes_nothing():
    target = linear(2, n_out=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(StateMismatchError) as info:
        state.restore({"model": target}, {"model": linear(1).state_dict()}, strict=True, path="/x/f.pt")
    text = str(info.value)
    assert "weight: checkpoint (2, 3) vs model (5, 3)" in text and "bias: checkpoint (2,) vs model (5,)" in text
    assert "/x/f.pt" in text and "strict=False" in text
    assert isinstance(info.value, RuntimeError)
    assert same_weights(target.state_dict(), before)


def test_missing_and_unexpected_keys_are_named():
    saved = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)).state_dict()
    target = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    with pytest.raises(StateMismatchError) as info:
        state.restore({"model": target}, {"model": saved}, strict=True, path="f")
    text = str(info.value)
    assert "missing keys: 2.weight, 2.bias" in text and "unexpected keys: 1.weight, 1.bias" in text


def test_long_key_lists_are_shortened():
    saved = {f"k{i}": torch.zeros(1) for i in range(20)}
    with pytest.raises(StateMismatchError, match=r"unexpected keys: k0, .*k7, \.\.\. \(12 more\)"):
        state.restore({"model": torch.nn.Sequential()}, {"model": saved}, strict=True, path="f")


def test_strict_false_loads_what_fits_and_warns_about_the_rest():
    source = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 4))
    target = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 7))
    before = target[1].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"strict=False skipped .*1.weight: checkpoint \(4, 2\) vs model \(7, 2\)"):
        state.restore({"model": target}, {"model": source.state_dict()}, strict=False, path="f")
    assert torch.equal(target[0].weight, source[0].weight)
    assert torch.equal(target[1].weight, before)


def test_a_trackable_missing_from_the_checkpoint():
    model = linear()
    with pytest.raises(StateMismatchError, match="no state for ema"):
        state.restore({"model": model, "ema": linear(3)}, {"model": linear(1).state_dict()}, strict=True, path="f")
    with pytest.warns(UserWarning, match="no state for ema"):
        state.restore({"model": model, "ema": linear(3)}, {"model": linear(1).state_dict()}, strict=False, path="f")
    assert torch.equal(model.weight, linear(1).weight)


def test_an_optimizer_that_does_not_fit_raises_state_mismatch():
    saved = torch.optim.SGD(linear().parameters(), lr=0.1).state_dict()
    two_groups = torch.optim.SGD([{"params": [linear().weight]}, {"params": [linear().bias]}], lr=0.1)
    with pytest.raises(StateMismatchError, match="cannot load the checkpoint's 'optimizer' into SGD"):
        state.restore({"optimizer": two_groups}, {"optimizer": saved}, strict=True, path="f")


@pytest.mark.parametrize("obj, missing", [(object(), "state_dict or load_state_dict"),
                                          ({"lr": 0.1}, "state_dict or load_state_dict"),
                                          (type("OnlySave", (), {"state_dict": lambda self: {}})(), "load_state_dict")])
def test_check_trackable_names_the_missing_method(obj, missing):
    with pytest.raises(ConfigError) as info:
        state.check_trackable("thing", obj)
    assert f"'thing' ({type(obj).__name__}) has no {missing}()" in str(info.value)
    assert "extra=" in str(info.value)


# -- wrapped models through a manager -------------------------------------------------------------------

def test_data_parallel_checkpoints_load_into_plain_models_and_back(run_dir, trainables):
    source = trainables(seed=1)
    CheckpointManager(run_dir, model=torch.nn.DataParallel(source["model"])).save(epoch=0)
    assert next(iter(torch.load(run_dir / file_name(0, 0), weights_only=True)["model"])) == "0.weight"
    plain = trainables(seed=2)["model"]
    CheckpointManager(run_dir, model=plain).resume()
    assert same_weights(plain.state_dict(), source.weights())
    plain_source = trainables(seed=3)["model"]
    CheckpointManager(run_dir, model=plain_source).save(epoch=1)
    wrapped = torch.nn.DataParallel(trainables(seed=4)["model"])
    CheckpointManager(run_dir, model=wrapped).resume()
    assert same_weights(wrapped.module.state_dict(), plain_source.state_dict())


@pytest.mark.slow  # imports torch._dynamo (seconds on CPU); the wrapper is built, never run
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_checkpoints_load_into_plain_models_and_back(run_dir, trainables):
    source = trainables(seed=1)["model"]
    CheckpointManager(run_dir, model=torch.compile(source)).save(epoch=0)
    saved = torch.load(run_dir / file_name(0, 0), weights_only=True)["model"]
    assert not any(k.startswith("_orig_mod.") for k in saved)
    plain = trainables(seed=2)["model"]
    CheckpointManager(run_dir, model=plain).resume()
    assert same_weights(plain.state_dict(), source.state_dict())
    compiled = torch.compile(trainables(seed=3)["model"])
    CheckpointManager(run_dir, model=compiled).restore(0)
    assert same_weights(compiled._orig_mod.state_dict(), source.state_dict())


# -- common training objects round-trip through a manager ---------------------------

SCHEDULERS = {
    "step": lambda o: L.StepLR(o, 2),
    "cosine": lambda o: L.CosineAnnealingLR(o, 5),
    "onecycle": lambda o: L.OneCycleLR(o, max_lr=0.1, total_steps=10),
    "lambda": lambda o: L.LambdaLR(o, lambda e: 0.9 ** e),
    "plateau": lambda o: L.ReduceLROnPlateau(o),
    "sequential": lambda o: L.SequentialLR(o, [L.LinearLR(o), L.StepLR(o, 2)], milestones=[2]),
    "cyclic": lambda o: L.CyclicLR(o, 0.01, 0.1),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_optimizer_scheduler_and_grad_scaler_round_trip(tmp_path, kind):
    def build(seed):
        model = linear(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        return dict(model=model, optimizer=opt, scheduler=SCHEDULERS[kind](opt),
                    scaler=torch.amp.GradScaler("cpu", init_scale=1024.0 * (seed + 1)))

    saved = build(1)
    for _ in range(3):
        saved["model"](torch.randn(4, 3)).sum().backward()
        saved["optimizer"].step()
        saved["scheduler"].step(*([1.0] if kind == "plateau" else []))
    CheckpointManager(tmp_path, **saved).save(epoch=0)
    loaded = build(2)
    CheckpointManager(tmp_path, **loaded).resume()
    assert same_weights(loaded["model"].state_dict(), saved["model"].state_dict())
    assert loaded["scheduler"].state_dict().keys() == saved["scheduler"].state_dict().keys()
    assert loaded["scheduler"].state_dict()["last_epoch"] == saved["scheduler"].state_dict()["last_epoch"]
    assert loaded["scaler"].state_dict() == saved["scaler"].state_dict()
    assert [g["lr"] for g in loaded["optimizer"].param_groups] == [g["lr"] for g in saved["optimizer"].param_groups]
    for a, b in zip(loaded["optimizer"].state.values(), saved["optimizer"].state.values()):
        assert all(torch.equal(a[k], b[k]) for k in b)


# -- RNG ------------------------------------------------------------------------------

def draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.normal(),
            torch.rand(3).tolist())


def test_rng_round_trip_python_numpy_torch():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second value in Python's generator
    np.random.normal()
    saved = state.capture_rng()
    expected = draws()
    state.restore_rng(saved)
    assert draws() == expected


def test_captured_rng_is_weights_only_loadable():
    rng = state.capture_rng()
    assert {"python", "torch", "numpy"} <= set(rng)
    format.check_loadable(rng, "rng")


def test_restore_rng_leaves_absent_generators_alone():
    saved = state.capture_rng()
    np.random.seed(7)
    expected_numpy = np.random.rand()
    np.random.seed(7)
    state.restore_rng({"torch": saved["torch"]})
    assert np.random.rand() == expected_numpy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_round_trip():
    torch.cuda.manual_seed_all(5)
    torch.cuda.init()
    saved = state.capture_rng()
    assert "cuda" in saved
    expected = torch.rand(3, device="cuda").tolist()
    state.restore_rng(saved)
    assert torch.rand(3, device="cuda").tolist() == expected


# -- restore is all or nothing (issue 11 item 6) ------------------------------------------

def _weights(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_an_optimizer_that_does_not_fit_leaves_the_model_untouched(tmp_path) -> None:
    model = linear(0)
    with CheckpointManager(tmp_path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)) as mgr:
        mgr.save(epoch=0)
    other = linear(1)
    before = _weights(other)
    two_groups = torch.optim.SGD([{"params": [other.weight]}, {"params": [other.bias]}], lr=0.1)
    mgr = CheckpointManager(tmp_path, model=other, optimizer=two_groups)
    with pytest.raises(StateMismatchError):
        mgr.restore()
    assert same_weights(_weights(other), before), "the model was restored, the optimizer was not"


def test_malformed_rng_states_leave_every_object_untouched(tmp_path) -> None:
    model = linear(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with CheckpointManager(tmp_path, model=model, optimizer=opt) as mgr:
        mgr.save(epoch=0)
    path = tmp_path / "ckpt-e000000-s000000000.pt"
    obj = torch.load(path, weights_only=True)
    obj["rng"] = {"torch": torch.zeros(3, dtype=torch.uint8)}  # not a generator state
    torch.save(obj, path)
    (tmp_path / "ckpt-index.json").unlink()
    other = linear(1)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.5)
    before, rng = _weights(other), torch.get_rng_state()
    mgr = CheckpointManager(tmp_path, model=other, optimizer=other_opt)
    with pytest.raises(StateMismatchError):
        mgr.restore(path)
    assert same_weights(_weights(other), before)
    assert other_opt.param_groups[0]["lr"] == 0.5
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_sampler_that_refuses_its_state_leaves_the_optimizer_untouched(tmp_path: Path) -> None:
    # issue 28: resume at another world size from a mid-epoch checkpoint is refused by the
    # sampler ("nothing was restored"), but the optimizer, listed first, had already loaded
    # the checkpoint's momentum into the fresh run's optimizer
    from ckpt import ResumableSampler

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sampler = ResumableSampler(12, seed=1, num_replicas=2, rank=0)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sampler.set_epoch(0)
    next(iter(sampler))
    CheckpointManager(tmp_path, model=model, optimizer=opt, sampler=sampler).save(epoch=0, step=1, mid_epoch=True)
    fresh = torch.nn.Linear(2, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(StateMismatchError, match="nothing was restored"):
        CheckpointManager(tmp_path, model=fresh, optimizer=fresh_opt, sampler=ResumableSampler(12, seed=1)).resume()
    assert not fresh_opt.state
