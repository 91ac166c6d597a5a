"""Cadence: when a step checkpoint is due (see docs/howto/mid-epoch.md).

A pure policy object: no I/O, no torch; time comes from an injected clock. The manager
calls :meth:`Cadence.due` once per training step (``mgr.should_save(step=...)``) and
:meth:`Cadence.saved` after every save with the seconds the loop was blocked. A save is
due when any configured rule says so:

* at most once per step: never at the step of the last save (a loop that asks per
  micro-batch saves a step once), preemption included.
* ``preempted=True``: always, even with no option set (then nothing else is ever due).
* ``every_steps=N``: at the multiples of N. Counting is by step number, so a resumed run
  saves at the same steps as an uninterrupted one. A multiple that was skipped (no due()
  call for it, or no save made) stays due until a save at or after it.
* ``every_seconds=T``: once T seconds have passed since the last save, or since this
  process's first due() call (clock readings do not survive a restart).
* ``max_overhead=f``: the interval is chosen to keep the stall at or under f of the
  training time (below). ``every_steps``/``every_seconds`` are then a floor: a save at
  least every N steps or T seconds, the step floor counted from the last save.

Steps before the first due() call of a process are never made up: they count as saved,
so a restart or a late first call does not trigger an immediate save.

Adaptive interval (CheckFreq-style, Mohan et al., FAST '21):

* step time t: median of the last 16 per-step times between consecutive due() calls.
  saved() restarts that stopwatch, so an interval containing a save is never measured
  and its stall is never taken for step time.
* save cost c: median of the last 5 stalls passed to saved().
* interval k = max(1, ceil(c / (f * t))): overhead c / (k * t) <= f, and k - 1 would
  exceed f. In other words, save as often as the bound allows.
* no cost known yet: the first due() after WARMUP_STEPS timed steps saves, so that the
  cost is measured early rather than guessed. That single save may exceed the budget.
* medians, not EWMAs: one outlier (an eval pass, a GC pause, a slow first save) leaves
  the interval alone, and a lasting change moves it once it fills half the window (9
  steps, 3 saves). The interval is logged at INFO on ``ckpt``, at most once per save,
  whenever it has changed.
"""

from __future__ import annotations

import logging
import math
import numbers
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigError, StateMismatchError

log = logging.getLogger("ckpt")

WARMUP_STEPS = 3
STEP_WINDOW = 16
COST_WINDOW = 5
STATE_VERSION = 1
_REL_TOL = 1e-9  # absorbs float noise so an exact ratio c / (f * t) does not round up
MIN_OVERHEAD = 1e-6  #: a smaller max_overhead would mean "never save": refused
MAX_STEPS = 10 ** 12  #: every_steps beyond this never triggers in any real run: refused
MAX_SECONDS = 10 * 365 * 86400.0  #: every_seconds beyond ten years likewise; also the bound of saved timings
MAX_INTERVAL = 10 ** 12  #: the adaptive interval is clamped here (no overflow on odd measurements)


class Cadence:
    """Decides when a step checkpoint is due; see the module docstring for the rules."""

    def __init__(self, *, every_steps: int | None = None, every_seconds: float | None = None,
                 max_overhead: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_steps = _positive_int("every_steps", every_steps)
        self.every_seconds = _positive_seconds(every_seconds)
        self.max_overhead = _fraction(max_overhead)
        if not callable(clock):
            raise ConfigError(f"clock must be a callable returning seconds, got {clock!r}",
                              hint="leave clock out to use time.monotonic")
        self._clock = clock
        self._step_times: deque[float] = deque(maxlen=STEP_WINDOW)
        self._costs: deque[float] = deque(maxlen=COST_WINDOW)
        self._last_saved: int | None = None
        self._interval: int | None = None  # c / (f * t) rounded up, before any floor
        self._logged: int | None = None
        self._restart()

    def fresh(self) -> Cadence:
        """A cadence with the same options and nothing measured (after damaged saved state)."""
        return Cadence(every_steps=self.every_steps, every_seconds=self.every_seconds,
                       max_overhead=self.max_overhead, clock=self._clock)

    def _restart(self) -> None:
        """Forget what belongs to this process only: the first step seen and clock readings."""
        self._first_step: int | None = None
        self._tick: tuple[int, float] | None = None  # (step, clock) the step stopwatch runs from
        self._since: float | None = None  # clock of the last save, or of the first due() call

    # -- reporting ------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when some option is set; otherwise only preemption makes a save due."""
        return any(v is not None for v in (self.every_steps, self.every_seconds, self.max_overhead))

    @property
    def interval_steps(self) -> int | None:
        """The adaptive interval in steps, floor applied; None until measured or without max_overhead."""
        if self.max_overhead is None or self._interval is None:
            return None
        return self._interval if self.every_steps is None else min(self._interval, self.every_steps)

    @property
    def step_time(self) -> float | None:
        """Seconds per training step (robust estimate), or None before two due() calls."""
        return statistics.median(self._step_times) if self._step_times else None

    @property
    def save_cost(self) -> float | None:
        """Seconds a save blocks the loop (robust estimate), or None before the first save."""
        return statistics.median(self._costs) if self._costs else None

    # -- the loop's calls -----------------------------------------------------------

    def due(self, step: int, *, preempted: bool = False) -> bool:
        """True when a save is due at ``step``; call once per training step."""
        step = _step(step)
        now = self._clock()
        first, since = self._observe(step, now)
        if step == self._last_saved:
            return False  # once per step: asked again (per micro-batch) after the save at this step
        if preempted:
            return True
        anchor = first - 1 if self._last_saved is None else max(self._last_saved, first - 1)
        if self.max_overhead is not None:
            if not self._costs and len(self._step_times) >= WARMUP_STEPS:
                return True  # warm-up save: measure the cost early
            every = self.interval_steps if self.interval_steps is not None else self.every_steps
            if every is not None and step - anchor >= every:
                return True
        elif self.every_steps is not None:
            multiple = step // self.every_steps * self.every_steps
            if multiple > max(anchor, 0):
                return True
        return self.every_seconds is not None and now - since >= self.every_seconds

    def saved(self, step: int, *, stall: float) -> None:
        """Record a save at ``step`` that blocked the loop for ``stall`` seconds.

        Sync saves pass the whole save time, async saves the staging stall. Call it right
        after the save so the next step is timed from here, without the stall.
        """
        step = _step(step)
        if isinstance(stall, bool) or not isinstance(stall, (int, float)) or not 0 <= stall < math.inf:
            raise ConfigError(f"stall must be a finite number of seconds >= 0, got {stall!r}",
                              hint="pass the seconds the training loop waited for the save")
        now = self._clock()
        self._last_saved = step
        self._since = now
        self._tick = (step if self._tick is None else max(step, self._tick[0]), now)
        self._costs.append(float(stall))
        self._update_interval()
        interval = self.interval_steps
        if interval is not None and interval != self._logged:
            log.info("checkpoint every %d steps: step %.3gs, save %.3gs, max_overhead %.3g",
                     interval, self.step_time, self.save_cost, self.max_overhead)
            self._logged = interval

    def _observe(self, step: int, now: float) -> tuple[int, float]:
        """Time the steps since the previous call; return this process's first step and the
        clock of the last save (both start at the first call)."""
        if self._first_step is None:
            self._first_step = step
        if self._since is None:
            self._since = now
        if self._tick is None or step < self._tick[0]:
            self._tick = (step, now)
        elif step > self._tick[0]:
            last_step, last_time = self._tick
            self._step_times.append(max(0.0, now - last_time) / (step - last_step))
            self._tick = (step, now)
            self._update_interval()
        return self._first_step, self._since

    def _update_interval(self) -> None:
        if self.max_overhead is None or not self._costs or not self._step_times:
            return
        t = max(statistics.median(self._step_times), 1e-12)
        c = statistics.median(self._costs)
        ratio = c / (self.max_overhead * t) * (1 - _REL_TOL)
        self._interval = MAX_INTERVAL if not ratio < MAX_INTERVAL else max(1, math.ceil(ratio))

    # -- resume ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What survives a resume: the last saved step and the measured step times and costs."""
        return {"version": STATE_VERSION, "last_saved_step": self._last_saved,
                "step_times": list(self._step_times), "save_costs": list(self._costs)}

    def load_state_dict(self, state: Mapping[str, Any], *, step: int | None = None) -> None:
        """Restore :meth:`state_dict` output. ``step`` is the step of the checkpoint resumed
        from: it counts as saved (its state was captured before its own saved() call)."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise StateMismatchError(f"not a cadence state of version {STATE_VERSION}: {state!r}",
                                     hint="pass what Cadence.state_dict() returned")
        last = state.get("last_saved_step")
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise StateMismatchError(f"cadence state 'last_saved_step' must be an int >= 0 or None, got {last!r}",
                                     hint="pass what Cadence.state_dict() returned")
        times, costs = (_seconds_list(state, key) for key in ("step_times", "save_costs"))
        self._last_saved = last if step is None else _step(step)
        self._step_times = deque(times, maxlen=STEP_WINDOW)
        self._costs = deque(costs, maxlen=COST_WINDOW)
        self._interval = None
        self._update_interval()
        self._restart()


def _step(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"step must be an int >= 0, got {value!r}",
                          hint="pass the global optimizer step, e.g. should_save(step=global_step)")
    return value


def _number(value: Any) -> bool:
    """A real number that is not a bool (numpy scalars included; strings are not)."""
    return not isinstance(value, (bool, str, bytes)) and isinstance(value, numbers.Real)


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not (_number(value) and isinstance(value, numbers.Integral)) or not 0 < int(value) <= MAX_STEPS:
        raise ConfigError(f"{name} must be an int in 1..{MAX_STEPS} or None, got {value!r}",
                          hint=f"pass {name}=1000, for example, or leave it out")
    return int(value)


def _positive_seconds(value: Any) -> float | None:
    if value is None:
        return None
    if not _number(value) or not 0 < value <= MAX_SECONDS:  # NaN fails both comparisons
        raise ConfigError(f"every_seconds must be a number of seconds in (0, {MAX_SECONDS:.0f}] (ten years) or "
                          f"None, got {value!r}",
                          hint="pass every_seconds=1800 for a save each half hour, or leave it out")
    return float(value)


def _fraction(value: Any) -> float | None:
    if value is None:
        return None
    if not _number(value) or not MIN_OVERHEAD <= value < 1:
        raise ConfigError(f"max_overhead must be a fraction in [{MIN_OVERHEAD:g}, 1) or None, got {value!r}",
                          hint="pass max_overhead=0.02 to spend at most 2% of training time on saves")
    return float(value)


def _seconds_list(state: Mapping[str, Any], key: str) -> list[float]:
    values = state.get(key)
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= MAX_SECONDS for v in values):
        raise StateMismatchError(f"cadence state {key!r} must be a list of seconds in [0, {MAX_SECONDS:.0f}], "
                                 f"got {str(values)[:200]}",
                                 hint="pass what Cadence.state_dict() returned")
    return [float(v) for v in values]
