"""Cadence (see docs/howto/mid-epoch.md): when a step checkpoint is due. A fake clock, never a real one."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt.cadence import WARMUP_STEPS, Cadence
from ckpt.errors import ConfigError, StateMismatchError

NAN, INF = float("nan"), float("inf")
Rate = float | Callable[[int], float]


class Clock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(cad: Cadence, clock: Clock, steps: Iterable[int], *, t_step: Rate = 0.0, cost: Rate = 0.0) -> list[int]:
    """A training loop: each step takes ``t_step`` seconds, then asks; a due save takes
    ``cost`` seconds and is reported with that stall. Returns the steps saved at."""
    saves = []
    for step in steps:
        clock.now += t_step(step) if callable(t_step) else t_step
        if cad.due(step):
            stall = cost(step) if callable(cost) else cost
            clock.now += stall
            cad.saved(step, stall=stall)
            saves.append(step)
    return saves


def gaps(saves: list[int]) -> list[int]:
    return [b - a for a, b in itertools.pairwise(saves)]


def expected_interval(t_step: float, cost: float, f: float) -> int:
    return max(1, math.ceil(cost / (f * t_step) - 1e-6))


# -- every_steps -------------------------------------------------------------------------

# (id, every_steps, steps the loop asks at, expected saves)
STEPS_TABLE = [
    ("N=5 from 1", 5, range(1, 21), [5, 10, 15, 20]),
    ("N=1 saves every step", 1, range(1, 5), [1, 2, 3, 4]),
    ("step 0 is never due", 3, range(10), [3, 6, 9]),
    ("first call on a multiple", 5, range(5, 16), [5, 10, 15]),
    ("earlier steps are not made up", 5, range(7, 17), [10, 15]),
    ("a skipped multiple is due at the next call", 5, [1, 2, 3, 4, 6, 7, 8, 11, 12, 15], [6, 11, 15]),
    ("several skipped multiples: one save", 5, [1, 2, 23, 24, 25, 26], [23, 25]),
    ("asked every 4 steps", 10, range(4, 60, 4), [12, 20, 32, 40, 52]),
]


@pytest.mark.parametrize("every, steps, expected", [t[1:] for t in STEPS_TABLE], ids=[t[0] for t in STEPS_TABLE])
def test_every_steps_table(every: int, steps: Iterable[int], expected: list[int]) -> None:
    clock = Clock()
    assert run(Cadence(every_steps=every, clock=clock), clock, steps, t_step=1.0) == expected


def test_due_stays_due_until_saved() -> None:
    cad = Cadence(every_steps=5, clock=Clock())
    assert [cad.due(s) for s in range(1, 7)] == [False] * 4 + [True, True]
    cad.saved(6, stall=0.0)
    assert [cad.due(s) for s in range(7, 11)] == [False, False, False, True]


def test_an_off_grid_save_covers_the_multiples_before_it_only() -> None:
    cad = Cadence(every_steps=5, clock=Clock())
    assert not any(cad.due(s) for s in range(1, 5))
    cad.saved(7, stall=0.0)  # steps 5 and 6 never asked about; an explicit save at 7
    assert [cad.due(s) for s in range(8, 11)] == [False, False, True]


@settings(max_examples=60, deadline=None)
@given(every=st.integers(1, 20), resume_at=st.integers(1, 80), after=st.sampled_from(["load step=", "saved first"]))
def test_every_steps_resume_matches_an_uninterrupted_run(every: int, resume_at: int, after: str) -> None:
    end = resume_at + 60
    # uninterrupted: the checkpoint at resume_at is made (due, or an extra save there) and the run goes on
    clock = Clock()
    whole = Cadence(every_steps=every, clock=clock)
    run(whole, clock, range(1, resume_at))
    whole.due(resume_at)
    whole.saved(resume_at, stall=0.0)
    expected = run(whole, clock, range(resume_at + 1, end))

    clock = Clock()
    first = Cadence(every_steps=every, clock=clock)
    run(first, clock, range(1, resume_at))
    first.due(resume_at)
    if after == "saved first":  # state captured after saved()
        first.saved(resume_at, stall=0.0)
        resumed = Cadence(every_steps=every, clock=Clock())
        resumed.load_state_dict(first.state_dict())
    else:  # state captured into the checkpoint before its own saved() call
        state = first.state_dict()
        resumed = Cadence(every_steps=every, clock=Clock())
        resumed.load_state_dict(state, step=resume_at)
    assert run(resumed, Clock(), range(resume_at + 1, end)) == expected
    fresh = Cadence(every_steps=every, clock=Clock())  # no state at all: counting is by step number
    assert run(fresh, Clock(), range(resume_at + 1, end)) == expected
    assert expected == [s for s in range(resume_at + 1, end) if s % every == 0]


def test_load_step_counts_the_resumed_checkpoint_as_saved() -> None:
    cad = Cadence(every_steps=5, clock=Clock())
    run(cad, Clock(), range(1, 10))
    assert cad.due(10)
    state = cad.state_dict()  # captured into the checkpoint of step 10, before its saved() call
    assert state["last_saved_step"] == 5
    told, untold = Cadence(every_steps=5, clock=Clock()), Cadence(every_steps=5, clock=Clock())
    told.load_state_dict(state, step=10)
    untold.load_state_dict(state)
    assert not told.due(10)  # a loop that asks again at the resumed step does not save it twice
    assert untold.due(10)


# -- every_seconds, preemption, disabled ---------------------------------------------------

# (id, every_seconds, seconds per step, seconds per save, steps, expected saves)
SECONDS_TABLE = [
    ("T=10, 3 s steps", 10.0, 3.0, 0.0, 14, [5, 9, 13]),
    ("T=10, 2.5 s steps", 10, 2.5, 0.0, 12, [5, 9]),
    ("clock restarts after the save ends", 10.0, 3.0, 4.0, 14, [5, 9, 13]),
    ("step longer than T: every step after the first", 1.0, 5.0, 0.0, 4, [2, 3, 4]),
]


@pytest.mark.parametrize("every, t_step, cost, n, expected", [t[1:] for t in SECONDS_TABLE],
                         ids=[t[0] for t in SECONDS_TABLE])
def test_every_seconds_table(every: float, t_step: float, cost: float, n: int, expected: list[int]) -> None:
    clock = Clock()
    assert run(Cadence(every_seconds=every, clock=clock), clock, range(1, n + 1), t_step=t_step, cost=cost) == expected


def test_every_seconds_clock_starts_at_the_first_call_not_construction() -> None:
    clock = Clock()
    cad = Cadence(every_seconds=10, clock=clock)
    clock.now += 3600  # model loading, data setup
    assert not cad.due(1)
    clock.now += 9.5
    assert not cad.due(2)
    clock.now += 0.5
    assert cad.due(3)


def test_steps_and_seconds_combined_is_a_union() -> None:
    clock = Clock()
    cad = Cadence(every_steps=10, every_seconds=35, clock=clock)
    assert run(cad, clock, range(1, 41), t_step=1.0) == [10, 20, 30, 40]
    clock = Clock()
    cad = Cadence(every_steps=10, every_seconds=35, clock=clock)
    # the clock starts at step 1, so 35 s have passed at step 10 (36 s) and then 9 steps after each save
    assert run(cad, clock, range(1, 31), t_step=4.0) == [10, 19, 20, 29, 30]


CONFIGS = [{}, {"every_steps": 1000}, {"every_seconds": 1e6}, {"max_overhead": 0.01},
           {"max_overhead": 0.5, "every_steps": 3, "every_seconds": 7.0}]


@pytest.mark.parametrize("options", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_preemption_is_always_due(options: dict[str, float]) -> None:
    clock = Clock()
    cad = Cadence(clock=clock, **options)
    for step in range(1, 50):
        clock.now += 0.01
        preempted = step % 7 == 0
        due = cad.due(step, preempted=preempted)
        assert due or not preempted
    assert cad.due(50, preempted=True)


def test_disabled_is_never_due_unless_preempted() -> None:
    clock = Clock()
    cad = Cadence(clock=clock)
    assert not cad.enabled
    assert run(cad, clock, range(2000), t_step=3600.0, cost=5.0) == []
    assert cad.due(2000, preempted=True)
    assert cad.interval_steps is None
    assert Cadence(every_steps=1).enabled and Cadence(every_seconds=1).enabled and Cadence(max_overhead=0.1).enabled


# -- max_overhead --------------------------------------------------------------------------

# (t_step, cost, f): the interval k = ceil(cost / (f * t_step))
OVERHEAD_TABLE = [(0.1, 1.0, 0.05), (0.5, 0.01, 0.02), (0.25, 2.0, 0.1), (1.0, 30.0, 0.01), (0.02, 0.3, 0.3),
                  (2.0, 0.0, 0.02), (0.125, 4.0, 0.5)]


@pytest.mark.parametrize("t_step, cost, f", OVERHEAD_TABLE)
def test_max_overhead_keeps_overhead_under_budget(t_step: float, cost: float, f: float) -> None:
    clock = Clock()
    cad = Cadence(max_overhead=f, clock=clock)
    k = expected_interval(t_step, cost, f)
    start = clock.now
    saves = run(cad, clock, range(1, 10 * k + 50), t_step=t_step, cost=cost)
    total = clock.now - start
    assert saves[0] == 1 + WARMUP_STEPS  # warm-up save measures the cost early
    assert cad.interval_steps == k
    assert set(gaps(saves)) == {k}
    assert len(saves) * cost / total <= f + cost / total  # one save (the warm-up's) of slack
    assert cad.step_time == pytest.approx(t_step) and cad.save_cost == pytest.approx(cost)


def test_interval_unknown_until_the_first_save() -> None:
    clock = Clock()
    cad = Cadence(max_overhead=0.1, clock=clock)
    for step in range(1, WARMUP_STEPS + 1):
        clock.now += 1.0
        assert not cad.due(step) and cad.interval_steps is None
    clock.now += 1.0
    assert cad.due(WARMUP_STEPS + 1)
    cad.saved(WARMUP_STEPS + 1, stall=2.0)
    assert cad.interval_steps == 20


def test_save_time_is_not_taken_for_step_time() -> None:
    clock = Clock()
    cad = Cadence(max_overhead=0.02, clock=clock)  # the cost fits the budget: a save after every step
    saves = run(cad, clock, range(1, 100), t_step=0.25, cost=0.004)
    assert saves == list(range(1 + WARMUP_STEPS, 100))
    assert cad.step_time == pytest.approx(0.25, rel=1e-9) and cad.interval_steps == 1


def test_one_slow_step_does_not_move_the_interval() -> None:
    clock = Clock()
    cad = Cadence(max_overhead=0.05, clock=clock)
    run(cad, clock, range(1, 300), t_step=0.1, cost=1.0)
    assert cad.interval_steps == 200
    run(cad, clock, [300], t_step=50.0)  # an eval pass inside the loop
    assert cad.interval_steps == 200 and cad.step_time == pytest.approx(0.1)


ADAPT_TABLE = [  # (id, loop, interval before step 2000, interval long after)
    ("step time x4", {"t_step": lambda s: 0.1 if s < 2000 else 0.4, "cost": 1.0}, 200, 50),
    ("step time /2", {"t_step": lambda s: 0.1 if s < 2000 else 0.05, "cost": 1.0}, 200, 400),
    ("cost x4", {"t_step": 0.1, "cost": lambda s: 1.0 if s < 2000 else 4.0}, 200, 800),
    ("cost /5", {"t_step": 0.1, "cost": lambda s: 1.0 if s < 2000 else 0.2}, 200, 40),
]


@pytest.mark.parametrize("loop, before, after", [t[1:] for t in ADAPT_TABLE], ids=[t[0] for t in ADAPT_TABLE])
def test_interval_adapts_when_step_time_or_cost_changes(loop: dict[str, Rate], before: int, after: int) -> None:
    clock = Clock()
    cad = Cadence(max_overhead=0.05, clock=clock)
    saves = run(cad, clock, range(1, 2000), **loop)
    assert cad.interval_steps == before
    saves += run(cad, clock, range(2000, 9000), **loop)
    assert cad.interval_steps == after
    assert gaps(saves)[-2:] == [after] * 2


def test_interval_changes_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    cad = Cadence(max_overhead=0.05, clock=clock)
    with caplog.at_level(logging.INFO, logger="ckpt"):
        run(cad, clock, range(1, 1000), t_step=0.1, cost=1.0)
        run(cad, clock, range(1000, 3000), t_step=0.4, cost=1.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "ckpt"]
    assert len(lines) == 2 and lines[0].startswith("checkpoint every 200 steps") and "every 50 steps" in lines[1]


@pytest.mark.parametrize("floor, t_step, max_gap, interval", [
    ({"every_steps": 50}, 0.1, 50, 50),
    ({"every_seconds": 5.0}, 0.125, 40, 160),
    ({"every_steps": 500, "every_seconds": 5.0}, 0.125, 40, 160),
])
def test_floor_saves_at_least_that_often(floor: dict[str, float], t_step: float, max_gap: int, interval: int) -> None:
    clock = Clock()
    cad = Cadence(max_overhead=0.05, clock=clock, **floor)
    saves = run(cad, clock, range(1, 2000), t_step=t_step, cost=1.0)  # the bound alone: every 160 or 200 steps
    assert max(gaps(saves)) == max_gap and saves[-1] >= 2000 - max_gap
    assert cad.interval_steps == interval  # the step floor caps the reported interval; the time floor does not


def test_floor_wider_than_the_bound_changes_nothing() -> None:
    clock = Clock()
    cad = Cadence(max_overhead=0.05, every_steps=1000, every_seconds=1e6, clock=clock)
    saves = run(cad, clock, range(1, 2000), t_step=0.1, cost=1.0)
    assert set(gaps(saves)) == {200} and cad.interval_steps == 200


def test_max_overhead_resume_keeps_the_estimates_and_the_schedule() -> None:
    clock = Clock()
    cad = Cadence(max_overhead=0.05, clock=clock)
    saves = run(cad, clock, range(1, 1000), t_step=0.1, cost=1.0)
    state = cad.state_dict()
    assert state["last_saved_step"] == saves[-1] and len(state["save_costs"]) == 5

    clock = Clock()
    resumed = Cadence(max_overhead=0.05, clock=clock)
    resumed.load_state_dict(state)
    assert resumed.interval_steps == 200  # known at once: no warm-up save after a resume
    assert run(resumed, clock, range(saves[-1] + 1, saves[-1] + 500), t_step=0.1, cost=1.0) == \
        [saves[-1] + 200, saves[-1] + 400]


# -- the property: overhead within the budget, and saving as often as the budget allows ----

@settings(max_examples=40, deadline=None)
@given(t_step=st.floats(0.01, 10.0), f=st.floats(0.005, 0.5), ratio=st.floats(0.0, 300.0))
def test_overhead_bound_holds_with_the_smallest_interval(t_step: float, f: float, ratio: float) -> None:
    cost = ratio * f * t_step  # the ratio is the ideal (fractional) interval, kept small to simulate fast
    clock = Clock()
    cad = Cadence(max_overhead=f, clock=clock)
    assert run(cad, clock, range(1, WARMUP_STEPS + 2), t_step=t_step, cost=cost) == [WARMUP_STEPS + 1]
    begin = clock.now  # steady state: from the end of the warm-up save
    first = WARMUP_STEPS + 2
    saves = run(cad, clock, range(first, first + 6 * (int(ratio) + 1) + 20), t_step=t_step, cost=cost)
    k = cad.interval_steps
    assert k is not None and len(saves) >= 5 and set(gaps(saves)) == {k}
    assert len(saves) * cost / (clock.now - begin) <= f * (1 + 1e-9)  # long-run overhead
    assert cost <= f * k * t_step * (1 + 1e-9)  # k satisfies the bound ...
    assert k == 1 or cost > f * (k - 1) * t_step * (1 - 1e-9)  # ... and k - 1 would not


# -- options and state ---------------------------------------------------------------------

BAD_OPTIONS = [
    {"every_steps": 0}, {"every_steps": -5}, {"every_steps": True}, {"every_steps": 2.0}, {"every_steps": "10"},
    {"every_seconds": 0}, {"every_seconds": -1.0}, {"every_seconds": NAN}, {"every_seconds": INF},
    {"every_seconds": True}, {"every_seconds": "60"},
    {"max_overhead": 0}, {"max_overhead": 1}, {"max_overhead": 1.5}, {"max_overhead": -0.1},
    {"max_overhead": NAN}, {"max_overhead": INF}, {"max_overhead": True}, {"clock": 3.0},
]


@pytest.mark.parametrize("options", BAD_OPTIONS, ids=[repr(o) for o in BAD_OPTIONS])
def test_invalid_options_raise_config_error(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        Cadence(**options)
    assert isinstance(info.value, ValueError) and info.value.hint and "hint:" in str(info.value)
    assert next(iter(options)) in str(info.value)


@pytest.mark.parametrize("call", [
    lambda c: c.due(-1), lambda c: c.due(True), lambda c: c.due(1.5), lambda c: c.saved(-1, stall=0.0),
    lambda c: c.saved(3, stall=-1.0), lambda c: c.saved(3, stall=NAN), lambda c: c.saved(3, stall=INF),
])
def test_invalid_calls_raise_config_error(call: Callable[[Cadence], object]) -> None:
    with pytest.raises(ConfigError):
        call(Cadence(every_steps=2, clock=Clock()))


@pytest.mark.parametrize("state", [
    None, {}, {"version": 2, "last_saved_step": 1, "step_times": [], "save_costs": []},
    {"version": 1, "last_saved_step": -1, "step_times": [], "save_costs": []},
    {"version": 1, "last_saved_step": None, "step_times": [NAN], "save_costs": []},
    {"version": 1, "last_saved_step": None, "step_times": [], "save_costs": "1.0"},
    {"version": 1, "last_saved_step": None, "step_times": []},
])
def test_invalid_state_is_refused(state: object) -> None:
    with pytest.raises(StateMismatchError):
        Cadence(max_overhead=0.1).load_state_dict(state)


def test_state_round_trips() -> None:
    clock = Clock()
    cad = Cadence(max_overhead=0.1, clock=clock)
    run(cad, clock, range(1, 100), t_step=0.5, cost=3.0)
    copy = Cadence(max_overhead=0.1)
    copy.load_state_dict(cad.state_dict())
    assert copy.state_dict() == cad.state_dict()
    assert (copy.interval_steps, copy.step_time, copy.save_cost) == (cad.interval_steps, 0.5, 3.0)
    with pytest.raises(StateMismatchError):
        copy.load_state_dict({**cad.state_dict(), "last_saved_step": True})
