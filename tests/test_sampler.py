"""ResumableSampler: per-epoch order, mid-epoch restore with cheap skip, RNG continuity,
manager integration, and objects that carry their own state_dict (StatefulDataLoader)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import ckpt
from ckpt import CheckpointManager, ResumableSampler
from ckpt.errors import ConfigError, StateMismatchError


class Counted(Dataset):
    """Sample i is i; records every index that was actually loaded."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.loaded: List[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.loaded.append(i)
        return i


def _batches(loader: DataLoader, limit: Optional[int] = None) -> List[List[int]]:
    out: List[List[int]] = []
    if limit == 0:
        return out
    for batch in loader:
        out.append(batch.tolist() if isinstance(batch, torch.Tensor) else [batch])
        if limit is not None and len(out) == limit:
            break
    return out


def test_order_depends_only_on_seed_and_epoch() -> None:
    a, b = ResumableSampler(10, seed=1), ResumableSampler(10, seed=1)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(123)
    assert list(b) == first and sorted(first) == list(range(10))
    a.set_epoch(1)
    assert list(a) != first and a.order(0) == first
    assert list(ResumableSampler(10, seed=2)) != first
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n, batch_size, drop_last, taken", [
    (10, 3, False, 2), (10, 3, True, 2), (10, 3, True, 3), (10, 3, False, 3), (12, 4, True, 3),
    (7, 1, False, 0), (9, 4, False, 1),
])
def test_restore_yields_exactly_the_rest_without_loading_the_skipped(
        n: int, batch_size: int, drop_last: bool, taken: int) -> None:
    full = _batches(DataLoader(Counted(n), batch_size, sampler=ResumableSampler(n, seed=4),
                               drop_last=drop_last))
    sampler = ResumableSampler(n, seed=4)
    assert _batches(DataLoader(Counted(n), batch_size, sampler=sampler, drop_last=drop_last), taken) \
        == full[:taken]
    assert sampler.position == taken * batch_size and sampler.remaining == n - taken * batch_size
    saved = sampler.state_dict()

    dataset = Counted(n)
    resumed = ResumableSampler(n, seed=4)
    resumed.load_state_dict(saved)
    resumed.set_epoch(0)
    assert _batches(DataLoader(dataset, batch_size, sampler=resumed, drop_last=drop_last)) == full[taken:]
    skipped = {i for batch in full[:taken] for i in batch}
    assert not skipped & set(dataset.loaded)  # cheap skip: skipped samples were never loaded


def test_set_epoch_after_restore_continues_only_the_saved_epoch() -> None:
    sampler = ResumableSampler(6, seed=0)
    sampler.set_epoch(2)
    it = iter(sampler)
    head = [next(it), next(it)]
    saved = sampler.state_dict()

    other = ResumableSampler(6, seed=0)
    other.load_state_dict(saved)
    other.set_epoch(3)  # a different epoch starts from its first sample
    assert list(other) == ResumableSampler(6, seed=0).order(3)

    same = ResumableSampler(6, seed=0)
    same.load_state_dict(saved)
    same.set_epoch(2)
    assert head + list(same) == sampler.order(2)
    same.set_epoch(2)  # not right after a restore: restarts the epoch
    assert list(same) == sampler.order(2)


def test_iterating_again_without_set_epoch_serves_the_epoch_again_like_torch() -> None:
    sampler = ResumableSampler(4, seed=3)
    first = list(sampler)  # a fresh sampler serves epoch 0
    assert list(sampler) == first == sampler.order(0)  # torch's samplers do the same
    restored = ResumableSampler(4, seed=3)
    restored.load_state_dict(sampler.state_dict())  # saved after the epoch's last sample
    assert list(restored) == []  # the rest of the restored epoch: nothing
    assert list(restored) == first  # the restored rest was served: the epoch again


def test_a_new_iterator_starts_the_epoch_from_its_first_sample() -> None:
    sampler = ResumableSampler(5, seed=9)
    it = iter(sampler)
    assert [next(it), next(it)] == sampler.order()[:2] and sampler.position == 2
    assert list(sampler) == sampler.order() and sampler.position == 5


def _epoch_samples(loader: DataLoader) -> List[int]:
    return [i for batch in _batches(loader) for i in batch]


@pytest.mark.parametrize("set_epoch_first", [False, True])
def test_the_ddp_tutorial_peek_skips_nothing_in_any_epoch(set_epoch_first: bool) -> None:
    # pytorch/examples' DDP torchrun tutorial: print len(next(iter(loader))[0]), then set_epoch.
    sampler = ResumableSampler(10, seed=5)
    loader = DataLoader(Counted(10), 3, sampler=sampler)
    for epoch in range(3):
        if set_epoch_first:
            sampler.set_epoch(epoch)
        assert len(next(iter(loader))) == 3
        if not set_epoch_first:
            sampler.set_epoch(epoch)
        assert _epoch_samples(loader) == sampler.order(epoch)


@pytest.mark.parametrize("set_epoch_first", [False, True])
def test_the_peek_after_a_restore_still_continues_the_interrupted_epoch(set_epoch_first: bool) -> None:
    sampler = ResumableSampler(10, seed=5)
    sampler.set_epoch(1)
    head = _epoch_samples_limit(DataLoader(Counted(10), 3, sampler=sampler), 2)
    saved = sampler.state_dict()

    resumed = ResumableSampler(10, seed=5)
    resumed.load_state_dict(saved)
    loader = DataLoader(Counted(10), 3, sampler=resumed)
    for epoch in (1, 2):
        if set_epoch_first:
            resumed.set_epoch(epoch)
        next(iter(loader))  # the peek: served, not trained on
        if not set_epoch_first:
            resumed.set_epoch(epoch)
        served = _epoch_samples(loader)
        if epoch == 1:
            assert head + served == sampler.order(1)
        else:
            assert served == sampler.order(2)


def _epoch_samples_limit(loader: DataLoader, batches: int) -> List[int]:
    return [i for batch in _batches(loader, batches) for i in batch]


def test_checkpoint_after_the_last_batch_resumes_into_an_empty_rest() -> None:
    # Saved inside the loop body of the last batch (no drop_last): the sampler is done, the
    # loop body is not. Continuing the epoch must serve nothing, then the next epoch starts.
    sampler = ResumableSampler(6, seed=0)
    loader = DataLoader(Counted(6), 4, sampler=sampler)
    assert len(_batches(loader)) == 2 and sampler.remaining == 0
    restored = ResumableSampler(6, seed=0)
    restored.load_state_dict(sampler.state_dict())
    restored.set_epoch(0)
    assert _batches(DataLoader(Counted(6), 4, sampler=restored)) == []
    restored.set_epoch(1)
    served = _batches(DataLoader(Counted(6), 4, sampler=restored))
    assert sorted(i for b in served for i in b) == list(range(6))


@pytest.mark.parametrize("batch_size", [None, 3])
def test_mid_epoch_resume_continues_the_random_streams_exactly(tmp_path: Path,
                                                               batch_size: Optional[int]) -> None:
    """Creating the DataLoader iterator draws a seed from torch's RNG; after a mid-epoch
    resume the sampler re-applies the checkpoint's RNG at the first remaining batch."""

    def run(resume: bool) -> List[float]:
        model = torch.nn.Linear(2, 2)
        sampler = ResumableSampler(12, seed=1)
        loader = DataLoader(Counted(12), batch_size, sampler=sampler)
        out = []
        with CheckpointManager(tmp_path, model=model, sampler=sampler) as mgr:
            epoch = mgr.resume() if resume else 0
            sampler.set_epoch(epoch)
            for i, _batch in enumerate(loader):
                out.append(float(torch.rand(1)))
                if not resume and i == 1:
                    mgr.save(epoch=0, step=2, mid_epoch=True)
                    out = []
        return out

    torch.manual_seed(0)
    expected = run(resume=False)
    torch.manual_seed(42)
    assert run(resume=True) == expected and expected


def test_manager_api_for_the_position_in_the_epoch(tmp_path: Path) -> None:
    sampler = ResumableSampler(10, seed=0)
    loader = DataLoader(Counted(10), 2, sampler=sampler)
    with CheckpointManager(tmp_path, sampler=sampler) as mgr:
        sampler.set_epoch(3)
        _batches(loader, 2)
        mgr.save(epoch=3, step=32, mid_epoch=True)
    sampler = ResumableSampler(10, seed=0)
    with CheckpointManager(tmp_path, sampler=sampler) as mgr:
        assert mgr.resume() == 3  # a mid-epoch checkpoint continues its epoch
        assert mgr.resumed.mid_epoch and mgr.step == 32
        assert (sampler.epoch, sampler.position, sampler.remaining) == (3, 4, 6)
        saved = torch.load(mgr.resumed.path, weights_only=True)["sampler"]
        assert (saved["epoch"], saved["position"]) == (3, 4)


def test_end_of_epoch_save_inside_an_epoch_warns(tmp_path: Path) -> None:
    sampler = ResumableSampler(10)
    loader = DataLoader(Counted(10), 2, sampler=sampler)
    with CheckpointManager(tmp_path, sampler=sampler) as mgr:
        _batches(loader, 1)
        with pytest.warns(UserWarning, match=r"'sampler' is part-way through the epoch.*mid_epoch=True"):
            mgr.save(epoch=0, step=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mgr.save(epoch=0, step=2, mid_epoch=True)
            _batches(loader)
            mgr.save(epoch=0, step=5)


@pytest.mark.parametrize("change", [{"data_source": 11}, {"seed": 1}, {"shuffle": False}])
def test_restoring_into_a_differently_configured_sampler_is_refused(tmp_path: Path, change: dict) -> None:
    with CheckpointManager(tmp_path, sampler=ResumableSampler(10)) as mgr:
        mgr.save(epoch=0)
    kwargs = {"data_source": 10, "seed": 0, "shuffle": True, **change}
    with CheckpointManager(tmp_path, sampler=ResumableSampler(**kwargs)) as mgr:
        with pytest.raises(StateMismatchError, match=r"'sampler'.*the remaining order would differ"):
            mgr.resume()


@pytest.mark.parametrize("bad", [dict(data_source=-1), dict(data_source=object()),
                                 dict(data_source=3, seed=1.5)])
def test_invalid_arguments_raise_config_error(bad: dict) -> None:
    with pytest.raises(ConfigError):
        ResumableSampler(**bad)
    with pytest.raises(ConfigError, match="set_epoch"):
        ResumableSampler(3).set_epoch(-1)


def test_public_names() -> None:
    assert ckpt.ResumableSampler is ResumableSampler and "ResumableSampler" in ckpt.__all__


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_is_tracked_like_any_object(tmp_path: Path, workers: int) -> None:
    """torchdata's StatefulDataLoader counts what it delivered, worker prefetch included."""
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def loader() -> DataLoader:
        return stateful.StatefulDataLoader(list(range(20)), batch_size=3, shuffle=True, num_workers=workers,
                                           generator=torch.Generator().manual_seed(0))

    first = loader()
    it = iter(first)
    head = [next(it).tolist() for _ in range(2)]
    with CheckpointManager(tmp_path, loader=first) as mgr:
        mgr.save(epoch=0, step=2, mid_epoch=True)
    rest = [b.tolist() for b in it]
    again = loader()
    with CheckpointManager(tmp_path, loader=again) as mgr:
        assert mgr.resume() == 0
    assert [b.tolist() for b in again] == rest
    assert sorted(i for b in head + rest for i in b) == list(range(20))


_SAVED = {"epoch": 1, "position": 4, "length": 10, "seed": 0, "shuffle": True, "rng": None}


@pytest.mark.parametrize("saved, message", [
    ([1, 4], "must be a dict, got list"),
    (None, "must be a dict, got NoneType"),
    ({k: v for k, v in _SAVED.items() if k != "position"}, "has no 'position' \\(expected a non-negative int\\)"),
    ({k: v for k, v in _SAVED.items() if k != "seed"}, "has no 'seed' \\(expected an int\\)"),
    ({**_SAVED, "position": "4"}, "'position' is '4'; expected a non-negative int"),
    ({**_SAVED, "position": 4.0}, "'position' is 4.0; expected a non-negative int"),
    ({**_SAVED, "position": -1}, "'position' is -1; expected a non-negative int"),
    ({**_SAVED, "epoch": None}, "'epoch' is None; expected a non-negative int"),
    ({**_SAVED, "epoch": True}, "'epoch' is True; expected a non-negative int"),
    ({**_SAVED, "length": "10"}, "'length' is '10'; expected a non-negative int"),
    ({**_SAVED, "shuffle": "yes"}, "'shuffle' is 'yes'; expected True or False"),
    ({**_SAVED, "rng": [1, 2]}, "'rng' is \\[1, 2\\]; expected a dict of RNG states or None"),
    ({**_SAVED, "num_replicas": "2"}, "'num_replicas' is '2'; expected a positive int"),
    ({**_SAVED, "num_replicas": 0}, "'num_replicas' is 0; expected a positive int"),
    ({**_SAVED, "drop_last": 1}, "'drop_last' is 1; expected True or False"),
    ({**_SAVED, "position": 11}, "saved position 11 is outside 0..10"),
    ({**_SAVED, "seed": 3}, "has seed=3, this one seed=0; the remaining order would differ"),
], ids=["list", "none", "no-position", "no-seed", "position-str", "position-float", "position-negative",
        "epoch-none", "epoch-bool", "length-str", "shuffle-str", "rng-list", "replicas-str", "replicas-zero",
        "drop-last-int", "position-too-far", "other-seed"])
def test_a_malformed_state_is_a_typed_error_naming_the_entry_and_changes_nothing(saved: object,
                                                                                message: str) -> None:
    sampler = ResumableSampler(10)
    with pytest.raises(ConfigError, match=message) as info:
        sampler.load_state_dict(saved)  # type: ignore[arg-type]
    assert info.value.hint
    assert (sampler.epoch, sampler.position, list(sampler)) == (0, 0, sampler.order(0))  # unchanged
    sampler.load_state_dict(_SAVED)  # a well-formed state still loads
    assert (sampler.epoch, sampler.position, sampler.remaining) == (1, 4, 6)


def test_a_malformed_sampler_state_in_a_checkpoint_is_refused_by_the_manager(tmp_path: Path) -> None:
    """The manager reports the sampler's own message and hint, under its usual error."""
    with CheckpointManager(tmp_path, sampler=ResumableSampler(10)) as mgr:
        path = mgr.save(epoch=0).path
    obj = torch.load(path, weights_only=True)
    obj["sampler"]["position"] = "4"
    torch.save(obj, tmp_path / "edited.pt")
    with CheckpointManager(tmp_path, sampler=ResumableSampler(10)) as mgr:
        with pytest.raises(StateMismatchError, match=r"'sampler' into ResumableSampler: the sampler state's "
                                                     r"'position' is '4'; expected a non-negative int") as info:
            mgr.restore(tmp_path / "edited.pt")
    assert info.value.hint == "pass what ResumableSampler.state_dict() returned"


@pytest.mark.parametrize("world", [1, 3])
def test_an_end_of_epoch_state_of_2_replicas_loads_at_another_world_size(world: int) -> None:
    # issue 28: the saved position was compared with this sampler's share, so a DDP run's
    # end-of-epoch checkpoint (position 6 of 12 over 2 ranks) was "part-way" at 1 rank and
    # "outside 0..4" at 3: resume at another world size failed whenever a sampler was tracked
    saved = ResumableSampler(12, seed=1, num_replicas=2, rank=1)
    saved.set_epoch(3)
    list(saved)
    state = saved.state_dict()
    fresh = ResumableSampler(12, seed=1, num_replicas=world, rank=0)
    fresh.load_state_dict(state)
    assert fresh.epoch == 3 and fresh.remaining == 0  # the epoch is over, in this split too
    fresh.set_epoch(4)
    assert list(fresh) == ResumableSampler(12, seed=1, num_replicas=world, rank=0).order(4)
    untouched = ResumableSampler(12, seed=1, num_replicas=2, rank=1)
    untouched.set_epoch(3)
    fresh.load_state_dict(untouched.state_dict())  # not begun
    assert fresh.position == 0
    with pytest.raises(ValueError, match="outside 0..6"):
        fresh.load_state_dict({**state, "position": 7})
