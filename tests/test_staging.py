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
