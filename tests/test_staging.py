"""ckpt.staging: snapshots are independent of the live state; buffers are reused and released."""

from __future__ import annotations

import collections

import pytest
import torch

from ckpt.background.staging import Stager


def state(scale: float = 1.0) -> dict:
    return {"model": collections.OrderedDict(w=torch.ones(4, 3) * scale, b=torch.arange(3.0) * scale),
            "optimizer": {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.full((4, 3), scale)}},
                          "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "epoch": 3, "name": "run", "shape": torch.Size([2, 2])}


def pointers(obj: dict) -> dict:
    return {"w": obj["model"]["w"].data_ptr(), "b": obj["model"]["b"].data_ptr(),
            "exp_avg": obj["optimizer"]["state"][0]["exp_avg"].data_ptr()}


def test_snapshot_equals_the_state_and_is_independent_of_it() -> None:
    live = state()
    staged = Stager().stage(live)
    assert type(staged["model"]) is collections.OrderedDict
    assert torch.equal(staged["model"]["w"], live["model"]["w"])
    assert staged["optimizer"]["param_groups"] == live["optimizer"]["param_groups"]
    assert (staged["epoch"], staged["name"], staged["shape"]) == (3, "run", torch.Size([2, 2]))
    live["model"]["w"].add_(5)  # training goes on...
    live["optimizer"]["param_groups"][0]["lr"] = 0.5
    live["optimizer"]["param_groups"][0]["params"].append(2)
    assert torch.equal(staged["model"]["w"], torch.ones(4, 3))  # ...the snapshot does not move
    assert staged["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0, 1]}]


def test_buffers_are_reused_when_shapes_match_and_hold_the_new_values() -> None:
    stager = Stager()
    first = pointers(stager.stage(state(1.0)))
    second_obj = stager.stage(state(2.0))
    assert pointers(second_obj) == first
    assert torch.equal(second_obj["model"]["w"], torch.full((4, 3), 2.0))
    assert stager.nbytes == (12 + 3 + 1 + 12) * 4


def test_changed_shapes_get_new_buffers_and_vanished_entries_are_freed() -> None:
    stager = Stager()
    stager.stage(state())
    grown = state()
    grown["model"]["w"] = torch.ones(8, 3)
    del grown["optimizer"]["state"][0]
    staged = stager.stage(grown)
    assert staged["model"]["w"].shape == (8, 3)
    assert stager.nbytes == (24 + 3) * 4


def test_release_frees_every_buffer() -> None:
    stager = Stager()
    stager.stage(state())
    assert stager.nbytes > 0
    stager.release()
    assert stager.nbytes == 0


def test_a_tensor_that_appears_twice_is_staged_once() -> None:
    shared = torch.randn(5, 5)
    staged = Stager().stage({"encoder.weight": shared, "decoder.weight": shared})
    assert staged["encoder.weight"] is staged["decoder.weight"]
    assert torch.equal(staged["encoder.weight"], shared)


def test_parameters_requiring_grad_stage_as_plain_tensors() -> None:
    param = torch.nn.Parameter(torch.randn(3))
    staged = Stager().stage({"p": param, "view": param[1:]})
    assert not staged["p"].requires_grad and staged["p"].grad_fn is None
    assert torch.equal(staged["view"], param.detach()[1:]) and staged["view"].is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_stage_into_pinned_host_memory() -> None:
    live = {"w": torch.randn(256, 256, device="cuda")}
    stager = Stager()
    staged = stager.stage(live)
    assert staged["w"].device.type == "cpu" and staged["w"].is_pinned()
    assert torch.equal(staged["w"], live["w"].cpu())
    pointer = staged["w"].data_ptr()
    live["w"].mul_(2)
    again = stager.stage(live)
    assert again["w"].data_ptr() == pointer and torch.equal(again["w"], live["w"].cpu())


# -- the steady state: one lean walk, checks in batch, one batched copy -------------------

def mixed(scale: float) -> dict:
    base = torch.arange(12.0).reshape(3, 4) * scale
    return {"f32": base, "f64": base.double() + 1, "i64": (base * 10).long(), "half": base.half(),
            "flag": torch.tensor([True, False]), "t": (base + 5).t(), "strided": (base + 7)[:, ::2],
            "nested": [{"step": torch.tensor(scale)}, ((base + 9)[1],)], "lr": 0.1, "none": None}


def assert_same(staged: dict, live: dict) -> None:
    for key in ("f32", "f64", "i64", "half", "flag", "t", "strided"):
        assert staged[key].dtype == live[key].dtype and torch.equal(staged[key], live[key]), key
    assert torch.equal(staged["nested"][0]["step"], live["nested"][0]["step"])
    assert torch.equal(staged["nested"][1][0], live["nested"][1][0])
    assert (staged["lr"], staged["none"]) == (0.1, None)


def test_the_steady_state_reuses_every_buffer_with_mixed_dtypes_and_non_contiguous_tensors() -> None:
    stager = Stager()
    first = stager.stage(mixed(1.0))
    buffers = {k: b.data_ptr() for k, b in stager._buffers.items()}
    live = mixed(2.0)
    assert stager._steady(live) is not None  # the lean path takes it (and copies)
    second = stager.stage(live)
    assert {k: b.data_ptr() for k, b in stager._buffers.items()} == buffers
    assert second["f32"].data_ptr() == first["f32"].data_ptr()
    assert_same(second, live)
    assert second["t"].is_contiguous() and second["strided"].shape == (3, 2)


def test_a_tensor_changed_right_after_a_steady_stage_does_not_reach_the_snapshot() -> None:
    stager = Stager()
    stager.stage(mixed(1.0))
    live = mixed(2.0)
    staged = stager.stage(live)
    expected = mixed(2.0)
    for t in (live["f32"], live["f64"], live["i64"], live["half"], live["nested"][0]["step"]):
        t.add_(100)  # training goes on
    assert_same(staged, expected)


def test_aliases_leave_the_steady_state_to_the_general_walk() -> None:
    shared = torch.randn(5, 5)
    stager = Stager()
    stager.stage({"a": shared, "b": shared})
    assert stager._steady({"a": shared, "b": shared}) is None  # one address twice
    staged = stager.stage({"a": shared, "b": shared})
    assert staged["a"] is staged["b"] and torch.equal(staged["a"], shared)
    stager.stage({"a": shared, "b": shared * 2})  # no longer tied: two buffers
    staged = stager.stage({"a": shared, "b": shared * 2})
    assert staged["a"] is not staged["b"] and torch.equal(staged["b"], shared * 2)


def test_views_of_one_storage_at_different_offsets_stage_apart() -> None:
    storage = torch.arange(10.0)
    live = {"all": storage, "tail": storage[4:], "head": storage[:3]}
    stager = Stager()
    stager.stage(live)
    staged = stager.stage(live)
    assert all(torch.equal(staged[k], v) for k, v in live.items())
    storage.mul_(-1)
    assert torch.equal(staged["tail"], torch.arange(4.0, 10.0))


def test_zero_size_tensors_stage_with_their_shapes() -> None:
    live = {"a": torch.empty(0), "b": torch.empty(0, 3), "c": torch.ones(2), "d": torch.empty(0, dtype=torch.int64)}
    stager = Stager()
    for _ in range(3):
        staged = stager.stage(live)
        assert [(staged[k].shape, staged[k].dtype) for k in live] == [(v.shape, v.dtype) for v in live.values()]
        assert torch.equal(staged["c"], torch.ones(2))


def test_a_change_of_shape_dtype_count_or_kind_after_the_steady_state_is_staged_right() -> None:
    stager = Stager()
    stager.stage(mixed(1.0))
    stager.stage(mixed(1.0))
    changes = [lambda s: s.update(f32=torch.ones(4, 3)), lambda s: s.update(i64=s["i64"].int()),
               lambda s: s.update(extra=torch.zeros(2)), lambda s: s.pop("half"),
               lambda s: s.update(f32=torch.nn.Parameter(s["f32"])),
               lambda s: s.update(sub=torch.ones(2).as_subclass(Sub)),
               lambda s: s.update(sparse=torch.ones(2).to_sparse()),
               lambda s: s.update(meta=torch.empty(2, device="meta"))]
    for change in changes:
        live = mixed(3.0)
        change(live)
        for _ in range(2):  # the change, then the same state again (the steady state once more)
            staged = stager.stage(live)
            assert set(staged) == set(live)
            for key, value in live.items():
                if isinstance(value, torch.Tensor) and value.is_meta:
                    assert staged[key].is_meta and staged[key].shape == value.shape
                elif isinstance(value, torch.Tensor):
                    value = value.detach().to_dense()
                    assert staged[key].dtype == value.dtype and torch.equal(staged[key].to_dense(), value), key


class Sub(torch.Tensor):
    pass
