"""Opt-in preemption handling: a signal sets a flag, the loop saves at the next step.

Clusters announce preemption with a signal and a grace period (Slurm: SIGTERM, or
SIGUSR1 with ``--signal=USR1@90``; Kubernetes: SIGTERM). Writing a checkpoint from
inside a signal handler would interrupt the training step at an arbitrary bytecode and
save a half-updated state, so the handler only records the signal; the loop calls
``mgr.save_if_preempted(epoch=..., step=...)`` after each optimizer step, which saves a
mid-epoch checkpoint and raises :class:`Preempted` (a ``SystemExit``).

Handlers are installed from the main thread only (Python runs handlers there), a
previous Python handler is still called (chained), and the previous handlers are put
back on close, in whatever order several managers close: each handler remembers its
predecessor, and one closed while another sits above it only marks itself closed, so
the handlers above skip past it (and restore past it when they close).

A second delivery of the same signal before the save is done gives up on the graceful
path: the previous handler (or the default action) is put back and the signal raised
again, so a second Ctrl+C or SIGTERM always ends the job. A repeat within
:data:`REPEAT_WINDOW_S` of the first is the same notice delivered twice, not a second
request, and is ignored: Slurm signals every process of a job step and ``torchrun``
forwards the signal it got to its workers, so a worker under both sees SIGTERM twice
within milliseconds. Ctrl+C (SIGINT) is a person at a terminal: its second press always
ends the job at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any, Dict, Iterable, Optional, Tuple, Union

from .errors import ConfigError

log = logging.getLogger("ckpt")

#: Signals handled by ``CheckpointManager(..., preemption=True)``.
DEFAULT_SIGNALS: Tuple[int, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)

Option = Union[bool, None, Iterable[int]]

#: Seconds after a signal during which the same signal again is taken as a duplicate
#: delivery (launcher and scheduler both signalling a worker), not as the escape hatch
#: (SIGINT excepted: a second Ctrl+C always ends the job).
REPEAT_WINDOW_S = 1.0


class Preempted(SystemExit):
    """Raised by ``save_if_preempted`` once the checkpoint is committed.

    A ``SystemExit``, so the run ends without a traceback, ``finally`` blocks and
    context managers still run, and the exit status is ``128 + signal number`` (143
    for SIGTERM) as for a process ended by that signal, so a scheduler does not mistake
    the run for a completed one. Catch it to choose another status.
    """

    def __init__(self, signum: int, record: Any) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.record = record

    def __str__(self) -> str:
        return (f"received {signal_name(self.signum)}: saved {self.record.path} (epoch "
                f"{self.record.epoch}, step {self.record.step}); run the script again to resume")


class PreemptionHandler:
    """Installs flag-setting handlers for ``signals``; :meth:`close` puts the old ones back."""

    def __init__(self, signals: Iterable[int]) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError("preemption handling can only be enabled from the main thread",
                              hint="create the CheckpointManager in the main thread, or pass "
                                   "preemption=False and check for preemption yourself")
        self.signals = tuple(_signal(s) for s in signals)
        self.received: Optional[int] = None
        self.closed = False
        self._seen: Dict[int, float] = {}  # signal -> when it first arrived (monotonic)
        self._previous: Dict[int, Any] = {}  # kept after close: handlers above skip past it
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (OSError, ValueError, RuntimeError) as e:
                self.close()
                raise ConfigError(f"cannot handle {signal_name(sig)}: {e}",
                                  hint="pass catchable signals such as signal.SIGTERM or "
                                       "signal.SIGUSR1") from e

    @property
    def triggered(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        first = self._seen.get(signum)
        repeat = first is not None and (signum == signal.SIGINT or time.monotonic() - first >= REPEAT_WINDOW_S)
        if self.closed or repeat:  # closed, or a second request: the escape hatch
            self._pass_on(signum, frame)
            return
        if first is None:  # else the same notice delivered twice (scheduler and launcher)
            # Only a flag: no I/O here, the loop saves at its next step boundary.
            self._seen[signum] = time.monotonic()
            if self.received is None:
                self.received = signum
        previous = _live(self._previous.get(signum), signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)  # chained; SIG_DFL/SIG_IGN and Ctrl+C's KeyboardInterrupt are not

    def _pass_on(self, signum: int, frame: Optional[FrameType]) -> None:
        """Hand the signal to what was installed before us, as if we had never been."""
        previous = _live(self._previous.get(signum), signum)
        if signal.getsignal(signum) == self._handle:
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
            signal.raise_signal(signum)  # the default action ends the process here
        elif callable(previous):  # a handler above called us: let it reach the one below
            previous(signum, frame)

    def close(self) -> None:
        """Put back the previous handlers where ours is the installed one; elsewhere a
        handler installed later sits above ours and skips past it from now on."""
        self.closed = True
        if threading.current_thread() is not threading.main_thread():
            log.warning("ckpt: signal handlers can only be restored from the main thread; "
                        "left in place (the next signal is handed to the previous handler)")
            return
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                previous = _live(previous, sig)
                signal.signal(sig, signal.SIG_DFL if previous is None else previous)


def install(option: Option) -> Optional[PreemptionHandler]:
    """A handler for ``preemption=``: True (SIGTERM and SIGUSR1), signals, or False/None."""
    if option is None or option is False:
        return None
    if option is True:
        return PreemptionHandler(DEFAULT_SIGNALS)
    if isinstance(option, (str, bytes)) or not isinstance(option, Iterable):
        raise ConfigError(f"preemption must be True, False or a list of signals, got {option!r}",
                          hint="pass preemption=True, or preemption=[signal.SIGTERM, signal.SIGUSR1]")
    return PreemptionHandler(option)


def stop(mgr: Any, handler: PreemptionHandler, *, epoch: int, step: int,
         metrics: Any = None, extra: Any = None) -> Preempted:
    """Commit a mid-epoch checkpoint (unless ``(epoch, step)`` already is one), close the
    manager, log why, and return the :class:`Preempted` to raise."""
    mgr.wait()
    record = next((r for r in mgr.checkpoints if r.key == (epoch, step)), None)
    if record is None:
        record = mgr.save(epoch=epoch, step=step, metrics=metrics, extra=extra, mid_epoch=True)
    mgr.close()
    exit_ = Preempted(handler.received or signal.SIGTERM, record)
    log.warning("ckpt: %s; exiting with status %d", exit_, exit_.code)
    return exit_


def _live(previous: Any, signum: int) -> Any:
    """``previous``, or if it is a closed :class:`PreemptionHandler`'s, the first open one
    (or foreign handler) below it: closing out of order leaves no dead link in the chain."""
    owner = getattr(previous, "__self__", None)
    while isinstance(owner, PreemptionHandler) and owner.closed:
        previous = owner._previous.get(signum)
        owner = getattr(previous, "__self__", None)
    return previous


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _signal(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"not a signal: {value!r}",
                          hint="pass signal numbers such as signal.SIGTERM or signal.SIGUSR1")
    try:
        return signal.Signals(value)
    except ValueError as e:
        raise ConfigError(f"not a signal on this platform: {value!r}",
                          hint="pass signal.SIGTERM, or signal.SIGUSR1 on POSIX") from e
