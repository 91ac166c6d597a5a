"""Retention policy (see docs/explanation/retention.md): table-driven rules and hypothesis properties."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.errors import CkptError, ConfigError
from ckpt.policy import RetentionPolicy, is_milestone, select_kept

NAN, INF = float("nan"), float("inf")


@dataclass
class Rec:
    epoch: int
    step: int = 0
    metrics: Dict[str, float] = field(default_factory=dict)
    mid_epoch: bool = False


def recs(*values: Optional[float], metric: str = "loss") -> List[Rec]:
    """One end-of-epoch record per value (epoch = position); None = saved without the metric."""
    return [Rec(e, metrics={} if v is None else {metric: v}) for e, v in enumerate(values)]


def epochs(keys) -> set:
    return {e for e, _ in keys}


# (id, policy options, records, protected keys, expected kept epochs)
TABLE = [
    ("no options keeps all", {}, recs(5, 4, 3, 2, 1), (), {0, 1, 2, 3, 4}),
    ("no options keeps all, no metrics", {}, recs(None, None), (), {0, 1}),
    ("keep_last=2", dict(keep_last=2), recs(1, 1, 1, 1), (), {2, 3}),
    ("keep_last larger than count", dict(keep_last=9), recs(1, 1), (), {0, 1}),
    ("keep_last=0 keeps only the newest", dict(keep_last=0), recs(1, 1, 1), (), {2}),
    ("keep_best min", dict(keep_best=2, monitor="loss"), recs(0.3, 0.1, 0.5, 0.2, 0.9), (), {1, 3, 4}),
    ("keep_best max", dict(keep_best=2, monitor="loss", mode="max"), recs(0.3, 0.1, 0.5, 0.2, 0.9), (), {2, 4}),
    ("tie min: first wins", dict(keep_best=1, monitor="loss"), recs(2, 1, 1, 1, 5), (), {1, 4}),
    ("tie max: first wins", dict(keep_best=2, monitor="loss", mode="max"), recs(1, 7, 7, 7, 0), (), {1, 2, 4}),
    ("tie -0.0 == 0.0: first wins", dict(keep_best=1, monitor="loss"), recs(0.0, -0.0, None), (), {0, 2}),
    ("NaN fills a free slot", dict(keep_best=2, monitor="loss"), recs(NAN, 2.0, None), (), {0, 1, 2}),
    ("NaN never evicts a finite value (min)", dict(keep_best=1, monitor="loss"), recs(5.0, NAN, None), (), {0, 2}),
    ("NaN never evicts a finite value (max)", dict(keep_best=1, monitor="loss", mode="max"),
     recs(-5.0, NAN, None), (), {0, 2}),
    ("finite evicts an earlier NaN", dict(keep_best=1, monitor="loss"), recs(NAN, 9.0, None), (), {1, 2}),
    ("all NaN: the first keeps the slot", dict(keep_best=1, monitor="loss"), recs(NAN, NAN, None), (), {0, 2}),
    ("-inf is the best loss", dict(keep_best=1, monitor="loss"), recs(0.0, -INF, INF, None), (), {1, 3}),
    ("+inf is the best accuracy", dict(keep_best=1, monitor="loss", mode="max"),
     recs(0.0, -INF, INF, None), (), {2, 3}),
    ("+inf beats NaN", dict(keep_best=1, monitor="loss"), recs(NAN, INF, None), (), {1, 2}),
    ("missing metric not eligible", dict(keep_best=1, monitor="loss"),
     [Rec(0, metrics={"acc": 0.0}), Rec(1, metrics={"loss": 9.0}), Rec(2)], (), {1, 2}),
    ("newest always kept (keep_best only)", dict(keep_best=1, monitor="loss"), recs(0.1, 0.5, 0.9), (), {0, 2}),
    ("newest kept without the metric", dict(keep_best=1, monitor="loss"), recs(0.1, 0.5, None), (), {0, 2}),
    ("keep_every=3 milestones", dict(keep_every=3), recs(*[None] * 8), (), {2, 5, 7}),
    ("keep_every=1 keeps every epoch end", dict(keep_every=1), recs(*[None] * 3), (), {0, 1, 2}),
    ("protected kept", dict(keep_last=1), recs(1, 1, 1, 1), [(1, 0)], {1, 3}),
    ("protected key not present is ignored", dict(keep_last=1), recs(1, 1), [(7, 0)], {1}),
    ("union of all rules", dict(keep_last=1, keep_best=1, monitor="loss", keep_every=4),
     recs(0.5, 0.1, 0.7, 0.6, 0.8, 0.9), [(2, 0)], {1, 2, 3, 5}),
]


@pytest.mark.parametrize("options, records, protected, expected",
                         [case[1:] for case in TABLE], ids=[case[0] for case in TABLE])
def test_retention_table(options, records, protected, expected):
    kept = select_kept(records, RetentionPolicy(**options), protected)
    assert epochs(kept) == expected


@pytest.mark.parametrize("options, records, protected, expected",
                         [case[1:] for case in TABLE], ids=[case[0] for case in TABLE])
def test_input_order_does_not_matter(options, records, protected, expected):
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    assert epochs(select_kept(shuffled, RetentionPolicy(**options), protected)) == expected


def test_order_is_by_numbers_not_names_or_list_position():
    records = [Rec(10, 0), Rec(9, 500), Rec(2, 10**6)]
    assert select_kept(records, RetentionPolicy(keep_last=1)) == {(10, 0)}


def test_step_orders_checkpoints_within_an_epoch():
    records = [Rec(3, 100, mid_epoch=True), Rec(3, 50, mid_epoch=True), Rec(2, 900)]
    assert select_kept(records, RetentionPolicy(keep_last=1)) == {(3, 100)}


def test_keep_every_counts_end_of_epoch_checkpoints_only():
    records = [Rec(2, 10, mid_epoch=True), Rec(2, 20), Rec(5, 50, mid_epoch=True), Rec(6, 60, mid_epoch=True)]
    assert select_kept(records, RetentionPolicy(keep_every=3)) == {(2, 20), (6, 60)}
    assert not is_milestone(Rec(2, 10, mid_epoch=True), 3)
    assert is_milestone(Rec(2, 20), 3) and not is_milestone(Rec(3, 0), 3)


def test_empty_record_list():
    assert select_kept([], RetentionPolicy(keep_last=1)) == set()


INVALID = [
    (dict(keep_last=-1), "keep_last", "keep_last=None"),
    (dict(keep_best=-2, monitor="loss"), "keep_best", "keep_best=None"),
    (dict(keep_every=0), "keep_every", "keep_every=None"),
    (dict(keep_last="3"), "keep_last", "keep_last=3"),
    (dict(keep_last=2.0), "keep_last", "keep_last=3"),
    (dict(keep_last=True), "keep_last", "keep_last=3"),
    (dict(mode="avg"), "'min' or 'max'", "mode='max'"),
    (dict(mode="MIN"), "'min' or 'max'", "mode='min'"),
    (dict(keep_best=2), "monitor", "monitor='val_loss'"),
    (dict(keep_best=2, monitor=""), "monitor", "monitor='val_loss'"),
    (dict(monitor=3), "monitor", "monitor='val_loss'"),
]


@pytest.mark.parametrize("options, names, fix", INVALID, ids=[str(o) for o, _, _ in INVALID])
def test_invalid_options_raise_config_error_with_the_fix(options, names, fix):
    with pytest.raises(ConfigError) as info:
        RetentionPolicy(**options)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CkptError)
    assert names in str(info.value)
    assert "hint:" in str(info.value) and fix in str(info.value).split("hint:")[1]


# -- properties -----------------------------------------------------------------------

VALUES = st.one_of(st.sampled_from([0.0, 1.0, 2.0, -1.0, INF, -INF, NAN]),
                   st.floats(allow_nan=True, allow_infinity=True))
METRICS = st.one_of(st.just({}), VALUES.map(lambda v: {"m": v}), VALUES.map(lambda v: {"other": v}))
SAVES = st.lists(st.tuples(st.booleans(), st.booleans(), METRICS), min_size=1, max_size=25)
POLICIES = st.builds(
    lambda last, best, mode, every: RetentionPolicy(keep_last=last, keep_best=best, monitor="m" if best else None,
                                                    mode=mode, keep_every=every),
    st.none() | st.integers(0, 4), st.none() | st.integers(1, 3), st.sampled_from(["min", "max"]),
    st.none() | st.integers(1, 4))


def history(saves) -> List[Rec]:
    """Records in save order with strictly increasing (epoch, step): a run's history."""
    out, epoch = [], 0
    for step, (next_epoch, mid, metrics) in enumerate(saves):
        epoch += next_epoch
        out.append(Rec(epoch, step, dict(metrics), mid))
    return out


def incremental(records: List[Rec], policy: RetentionPolicy, on_evict=None) -> set:
    """What a manager does: apply the policy after each save, delete what it evicts."""
    kept: List[Rec] = []
    for record in records:
        kept.append(record)
        keys = select_kept(kept, policy, {(record.epoch, record.step)})  # the one just written
        if on_evict is not None:
            on_evict(kept, [r for r in kept if (r.epoch, r.step) not in keys])
        kept = [r for r in kept if (r.epoch, r.step) in keys]
    return {(r.epoch, r.step) for r in kept}


def finite(record: Rec) -> bool:
    return "m" in record.metrics and not math.isnan(record.metrics["m"])


def is_nan(record: Rec) -> bool:
    return "m" in record.metrics and math.isnan(record.metrics["m"])


@settings(max_examples=300, deadline=None)
@given(SAVES, POLICIES)
def test_incremental_equals_policy_over_all_saves(saves, policy):
    records = history(saves)
    assert incremental(records, policy) == select_kept(records, policy)


@settings(max_examples=200, deadline=None)
@given(SAVES, POLICIES)
def test_newest_is_always_kept(saves, policy):
    records = history(saves)
    newest = (records[-1].epoch, records[-1].step)
    assert newest in select_kept(records, policy)
    assert newest in incremental(records, policy)


@settings(max_examples=300, deadline=None)
@given(SAVES, st.integers(1, 3), st.sampled_from(["min", "max"]))
def test_nan_never_evicts_a_finite_value(saves, k, mode):
    policy = RetentionPolicy(keep_best=k, monitor="m", mode=mode)

    def check(kept, evicted):
        newest = max(kept, key=lambda r: (r.epoch, r.step))
        if any(finite(r) for r in evicted):
            assert not any(is_nan(r) and r is not newest for r in kept if r not in evicted)

    incremental(history(saves), policy, on_evict=check)


@settings(max_examples=200, deadline=None)
@given(SAVES, POLICIES, st.lists(st.integers(0, 30), max_size=3))
def test_kept_set_bounds(saves, policy, protected_steps):
    records = history(saves)
    protected = {(r.epoch, r.step) for r in records if r.step in protected_steps}
    kept = select_kept(records, policy, protected)
    keys = {(r.epoch, r.step) for r in records}
    assert protected <= kept <= keys
    if not policy.deletes:
        assert kept == keys
        return
    milestones = sum(is_milestone(r, policy.keep_every) for r in records) if policy.keep_every else 0
    assert len(kept) <= (policy.keep_last or 0) + (policy.keep_best or 0) + milestones + 1 + len(protected)
    ordered = sorted(keys)
    if policy.keep_last:
        assert set(ordered[-policy.keep_last:]) <= kept
    if policy.keep_best:
        eligible = [r for r in records if "m" in r.metrics]
        assert sum((r.epoch, r.step) in kept for r in eligible) >= min(policy.keep_best, len(eligible))


def test_the_policy_round_trips_through_json() -> None:
    pol = RetentionPolicy(keep_last=2, keep_best=1, monitor="loss", mode="max", keep_every=3)
    assert pol.to_json() == {"keep_last": 2, "keep_best": 1, "monitor": "loss", "mode": "max", "keep_every": 3}
    assert RetentionPolicy.from_json(pol.to_json()) == pol
    assert RetentionPolicy.from_json({}) == RetentionPolicy()
