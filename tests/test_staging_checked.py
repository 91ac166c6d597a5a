"""The steady-state walk of an async save is also its weights-only check: whatever a
synchronous save refuses, an async one refuses too, with the same error, before
anything is copied or written; whatever it accepts stages right, and nothing changed
after ``save()`` returns reaches the file."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import torch

from ckpt import CheckpointManager, ConfigError, schema
from ckpt.background.staging import Stager


class Holder:
    """A tracked object whose state dict the test controls."""

    def __init__(self) -> None:
        self.state: Dict[str, Any] = {"w": torch.ones(3, 2), "ids": [0, 1, 2], "lr": 0.1,
                                      "nested": {"step": torch.tensor(4.0), "betas": (0.9, 0.99)}}

    def state_dict(self) -> Dict[str, Any]:
        return self.state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.state = state


Point = collections.namedtuple("Point", "x y")


class MyDict(collections.OrderedDict):  # type: ignore[type-arg]
    pass


REFUSED: List[Callable[[Dict[str, Any]], None]] = [
    lambda s: s.update(lr=np.float64(0.1)),
    lambda s: s.update(blob=b""),
    lambda s: s["nested"].update(p=Point(1, 2)),
    lambda s: s.update(sub=MyDict(a=1)),
    lambda s: s.update(obj=object()),
    lambda s: s["ids"].append(np.int64(3)),
    lambda s: s.update({(1, np.int64(2)): 3}),
    lambda s: s.update(tags={1, np.int64(2)}),
    lambda s: s.update(sub=torch.ones(2).as_subclass(Sub)),
]


class Sub(torch.Tensor):
    pass


def sync_error(tmp: Path, change: Callable[[Dict[str, Any]], None]) -> str:
    holder = Holder()
    change(holder.state)
    with CheckpointManager(tmp / "sync", holder=holder, progress=False) as mgr:
        with pytest.raises(ConfigError) as raised:
            mgr.save(epoch=0)
    return str(raised.value)


@pytest.mark.parametrize("index", range(len(REFUSED)))
def test_an_async_save_in_the_steady_state_refuses_what_a_sync_save_refuses(tmp_path: Path, index: int) -> None:
    change = REFUSED[index]
    expected = sync_error(tmp_path, change)
    holder = Holder()
    with CheckpointManager(tmp_path / "async", holder=holder, async_save=True, progress=False) as mgr:
        for epoch in range(3):  # the first save allocates; the next ones are the steady state
            mgr.save(epoch=epoch)
        mgr.wait()
        before = [r.name for r in mgr.checkpoints]
        good = holder.state
        holder.state = {**good, "nested": dict(good["nested"]), "ids": list(good["ids"])}
        change(holder.state)
        with pytest.raises(ConfigError) as raised:
            mgr.save(epoch=3)
        assert str(raised.value) == expected
        mgr.wait()
        assert [r.name for r in mgr.checkpoints] == before
        assert not list((tmp_path / "async").glob("*.tmp*"))
        holder.state = good
        mgr.save(epoch=4)  # the state fixed, saves go on (and the steady state comes back)
        mgr.save(epoch=5)
        mgr.wait()
        obj = torch.load(mgr.latest.path, weights_only=True)
    assert torch.equal(obj["holder"]["w"], torch.ones(3, 2)) and obj["holder"]["ids"] == [0, 1, 2]


def loadable_values() -> Dict[str, Any]:
    base = torch.arange(6.0).reshape(2, 3)
    return {"f32": base, "i64": base.long(), "t": base.t(), "tied": base, "blob": b"x", "buf": bytearray(b"yz"),
            "tags": {1, 2}, (1, "a"): torch.ones(1), 2.5: [1, 2], "empty": [], "pair": (1, (2, base[0])),
            "meta": {"dtype": torch.float16, "size": torch.Size([2]), "device": torch.device("cpu"),
                     "none": None, "c": 1 + 2j}}


def test_what_the_strict_walk_leaves_to_the_general_one_is_checked_counted_and_staged_right() -> None:
    stager = Stager()
    calls: List[int] = []

    def check(obj: Any) -> Callable[[], int]:
        def run() -> int:
            calls.append(1)
            return schema.check_loadable(obj, "state")
        return run
    for _ in range(3):
        live = loadable_values()
        staged, nbytes = stager.stage_checked(live, check(live))
        assert nbytes == schema.check_loadable(live, "state")
        assert staged.keys() == live.keys()
        assert staged["tied"] is staged["f32"] and torch.equal(staged["t"], live["t"])
        assert (staged["blob"], staged["buf"], staged["tags"], staged[2.5]) == (b"x", bytearray(b"yz"), {1, 2}, [1, 2])
        assert torch.equal(staged["pair"][1][1], live["pair"][1][1]) and staged["meta"] == live["meta"]
    assert len(calls) == 3  # an alias, a set and a tuple key: never the steady state


def test_the_steady_state_is_its_own_check_and_counts_the_bytes_of_every_tensor() -> None:
    stager = Stager()
    calls: List[int] = []
    live = Holder().state

    def check() -> int:
        calls.append(1)
        return schema.check_loadable(live, "state")
    for _ in range(4):
        staged, nbytes = stager.stage_checked(live, check)
        assert nbytes == (6 + 1) * 4 and torch.equal(staged["w"], live["w"])
    assert len(calls) == 1  # the first save only
    staged, _ = stager.stage_checked(live, check)
    live["ids"].append(3)  # a list of plain values is copied, not shared
    live["nested"]["betas"] = (0.5, 0.5)
    live["w"].add_(1)
    assert staged["ids"] == [0, 1, 2] and staged["nested"]["betas"] == (0.9, 0.99)
    assert torch.equal(staged["w"], torch.ones(3, 2))


def test_a_changed_structure_after_the_steady_state_is_checked_and_staged_again() -> None:
    stager = Stager()
    calls: List[int] = []
    holder = Holder()

    def check() -> int:
        calls.append(1)
        return schema.check_loadable(holder.state, "state")
    stager.stage_checked(holder.state, check)
    stager.stage_checked(holder.state, check)
    holder.state["w"] = torch.ones(4, 2, dtype=torch.float64)  # new shape and dtype
    staged, nbytes = stager.stage_checked(holder.state, check)
    assert nbytes == 8 * 8 + 4 and staged["w"].dtype == torch.float64 and staged["w"].shape == (4, 2)
    holder.state["extra"] = torch.zeros(5)  # one tensor more
    staged, nbytes = stager.stage_checked(holder.state, check)
    assert nbytes == 8 * 8 + 4 + 5 * 4 and torch.equal(staged["extra"], torch.zeros(5))
    assert len(calls) == 3
    stager.stage_checked(holder.state, check)
    assert len(calls) == 3  # steady again


def contents(obj: Any) -> Any:
    """A comparable form of a loaded checkpoint (tensors as lists, creation time dropped)."""
    if isinstance(obj, torch.Tensor):
        return (str(obj.dtype), tuple(obj.shape), obj.tolist())
    if isinstance(obj, dict):
        return {k: contents(v) for k, v in obj.items() if k != "created"}
    if isinstance(obj, (list, tuple)):
        return type(obj)(contents(v) for v in obj)
    return obj


def test_an_async_save_writes_what_a_sync_save_writes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    files = {}
    for mode in (False, True):
        with CheckpointManager(tmp_path / str(mode), model=model, optimizer=opt, async_save=mode,
                               progress=False) as mgr:
            for epoch in range(3):
                mgr.save(epoch=epoch, metrics={"loss": 0.5}, extra={"note": "n"})
            mgr.wait()
            assert mgr.latest.size == mgr.latest.path.stat().st_size
            files[mode] = torch.load(mgr.latest.path, weights_only=True)
    assert contents(files[True]) == contents(files[False])
