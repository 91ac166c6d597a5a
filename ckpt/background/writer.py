"""The background writer of asynchronous saves: one thread, at most one save in flight.

With ``CheckpointManager(..., async_save=True)``, ``save()`` snapshots the checkpoint
into staging buffers (:mod:`ckpt.background.staging`) and returns; a ``ckpt-writer`` thread then
runs the same commit as a synchronous save (write, fsync, rename, index, retention),
so the index and retention change only once the file is durable.

* One save in flight: the next ``save()`` first waits for it, and logs that it had to
  (the disk is slower than the save interval).
* An error in the background is kept and raised by the next ``save()``, ``wait()`` or
  ``close()``, once.
* The thread is started by the first save and then waits for the next one: a thread
  started per save made ``save()`` wait until the new thread was scheduled (the
  handshake of ``Thread.start``), milliseconds of the loop's stall on a loaded machine.
  It is named ``ckpt-writer`` while it writes, ``ckpt-writer (idle)`` between saves,
  and ends when the writer is closed or collected.
* At interpreter exit the save in flight finishes (the exit waits for it before daemon
  threads stop); an error that nobody collected is logged with its traceback, as is
  one held by a writer that is garbage-collected.
"""

from __future__ import annotations

import atexit
import copy
import functools
import logging
import os
import queue
import threading
import time
import weakref
from pathlib import PurePath
from typing import Callable, Optional

from .. import record, schema
from ..errors import ConfigError
from ..record import CheckpointRecord
from .staging import Stager

log = logging.getLogger("ckpt")

#: Entries of the checkpoint dict that staging does not walk: ``extra`` is deep-copied
#: (the record keeps it), ``ckpt`` (the metadata) is ckpt's own, fresh for each save.
_UNSTAGED = frozenset(("extra", "ckpt"))

Commit = Callable[[schema.Checkpoint], CheckpointRecord]
NAME, IDLE_NAME = "ckpt-writer", "ckpt-writer (idle)"


def create(where: str, async_save: bool) -> Optional[AsyncWriter]:
    """The writer for ``CheckpointManager(async_save=...)``: None for synchronous saves."""
    if not isinstance(async_save, bool):
        raise ConfigError(f"async_save must be True or False, got {async_save!r}",
                          hint="pass async_save=True to write checkpoints in the background")
    return AsyncWriter(where) if async_save else None


class _Outcome:
    """What the background thread leaves behind (shared with the exit/GC report)."""

    def __init__(self) -> None:
        self.error: Optional[BaseException] = None
        self.what = ""


class AsyncWriter:
    """Commits staged checkpoints on a background thread, one at a time."""

    def __init__(self, where: str) -> None:
        self.directory = where
        self.stager = Stager()
        self._worker: Optional[_Worker] = None  # started by the first save
        self._outcome = _Outcome()
        self._lock = threading.Lock()
        weakref.finalize(self, _report_uncollected, self._outcome, where)

    def ready(self) -> None:
        """Wait for the save in flight, logging the stall, then raise its error if it failed."""
        if self.busy():
            start = time.perf_counter()
            self.join()
            log.warning("save() waited %.2f s for the checkpoint of %s to commit in %s "
                        "(one save in flight at most: saves come faster than the disk writes them)",
                        time.perf_counter() - start, self._outcome.what, self.directory)
        self.wait()

    def submit(self, build: Callable[[], schema.Checkpoint], where: Callable[[str], PurePath],
               commit: Commit) -> CheckpointRecord:
        """Build the checkpoint, stage it and commit it in the background; return its
        pending record.

        The pending record has no size or checksum yet (0 and None); once the commit is
        done, the manager's :attr:`~ckpt.CheckpointManager.latest` is the committed record.
        ``build`` is called here so that the live checkpoint dict (views of the training
        tensors) is freed before the writer starts: freeing thousands of tensors lets go
        of the GIL, and a started writer would take it each time, for a switch interval.
        """
        with self._lock:
            self.ready()
            staged, pending = self._stage_built(build, where)
            self.start(f"epoch {pending.epoch}, step {pending.step}", lambda: commit(staged))
        return pending

    def _stage_built(self, build: Callable[[], schema.Checkpoint],
                     where: Callable[[str], PurePath]) -> tuple[schema.Checkpoint, CheckpointRecord]:
        checkpoint = build()
        return self.stage(checkpoint, where(checkpoint.name))  # the live dict dies with this frame

    def stage(self, checkpoint: schema.Checkpoint, path: PurePath) -> tuple[schema.Checkpoint, CheckpointRecord]:
        """``checkpoint`` copied into the staging buffers (valid until the next stage), and
        its pending record; call :meth:`ready` first (the save in flight reads the buffers).

        A checkpoint whose states are not checked yet (``checked`` False) is checked here,
        by the walk that stages it (:meth:`Stager.stage_checked`): the same
        :class:`~ckpt.errors.ConfigError` as a synchronous save's, raised by ``save()``
        before anything is copied or written. The ``ckpt`` metadata is not walked: it is
        built afresh for each save from values ckpt owns and never changes afterwards.
        """
        obj = checkpoint.obj
        live = {k: v for k, v in obj.items() if k not in _UNSTAGED}
        if checkpoint.checked:
            staged, nbytes = self.stager.stage(live), checkpoint.nbytes
        else:
            staged, nbytes = self.stager.stage_checked(live, lambda: schema.check_states(checkpoint))
            nbytes += checkpoint.nbytes  # extra's tensors, checked by schema.build
        staged["ckpt"] = dict(obj["ckpt"])
        staged["extra"] = copy.deepcopy(obj["extra"])  # small; kept by the record
        pending = record.make(checkpoint.header, path, size=0, checksum=None, extra=staged["extra"])
        return schema.with_states(checkpoint, staged, nbytes), pending

    def start(self, what: str, work: Callable[[], object]) -> None:
        """Run ``work`` (a save: ``what``) on the writer thread; call :meth:`ready` first."""
        self._outcome.what = what
        worker = self._worker
        if worker is None or worker.pid != os.getpid():  # none yet, or this is a forked child
            worker = self._worker = _Worker()
            weakref.finalize(self, worker.stop)  # a writer collected unclosed: its thread ends
        worker.run(functools.partial(_run, work, self._outcome, self.directory))

    def busy(self) -> bool:
        """A save is in flight."""
        return self._worker is not None and self._worker.busy()

    def join(self) -> None:
        """Wait for the save in flight; its error, if any, stays for :meth:`wait`."""
        if self._worker is not None:
            self._worker.join()

    def wait(self) -> None:
        """Wait for the save in flight and raise its error (once) if it failed."""
        self.join()
        error, self._outcome.error = self._outcome.error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Flush, end the thread, release the staging buffers, and raise an uncollected error."""
        try:
            self.wait()
        finally:
            if self._worker is not None:
                self._worker.stop()
                self._worker = None
            self.stager.release()


def _run(work: Callable[[], object], outcome: _Outcome, directory: str) -> None:
    try:
        work()
    except BaseException as e:  # kept for the caller: a thread has no one to raise to
        if hasattr(e, "add_note"):
            e.add_note(f"raised by the background save of {outcome.what} in {directory}")
        outcome.error = e


class _Worker:
    """The writer's thread and the one job it runs at a time. A daemon, so that an idle
    one never holds up the exit; the exit waits for its job first (:func:`_drain`). It
    holds no reference to its writer, which can then be collected (and stop it)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._jobs: queue.SimpleQueue[Optional[Callable[[], None]]] = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=_loop, args=(self._jobs, self._idle), name=IDLE_NAME, daemon=True)
        self._thread.start()
        _LIVE.add(self._idle)

    def run(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (the previous one is done: the caller waited for it)."""
        self._idle.clear()
        self._thread.name = NAME
        self._jobs.put(job)  # only now can the thread take the GIL the caller needs to return

    def busy(self) -> bool:
        """In a forked child, never: its parent's job runs on a thread the child lacks."""
        return self.pid == os.getpid() and not self._idle.is_set()

    def join(self) -> None:
        if self.busy():
            self._idle.wait()

    def stop(self) -> None:
        """End the thread once its job is done (not waited for)."""
        self._jobs.put(None)


def _loop(jobs: queue.SimpleQueue[Optional[Callable[[], None]]], idle: threading.Event) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        try:
            job()
        finally:
            del job  # the staged checkpoint it holds goes before the next save's
            threading.current_thread().name = IDLE_NAME
            idle.set()


#: The idle events of the live writer threads, waited for at exit.
_LIVE: weakref.WeakSet[threading.Event] = weakref.WeakSet()


def _drain() -> None:
    """At interpreter exit, before daemon threads stop: every save in flight finishes."""
    for idle in list(_LIVE):
        idle.wait()


# Before daemon threads stop, as concurrent.futures does (3.9+); a Python without the
# private hook runs it with the atexit handlers, while daemon threads still run.
getattr(threading, "_register_atexit", atexit.register)(_drain)
# A forked child has none of its parent's threads: an event cleared by a save in flight
# at the fork would never be set there, and the child's exit would wait for it forever.
os.register_at_fork(after_in_child=_LIVE.clear)


def _report_uncollected(outcome: _Outcome, directory: str) -> None:
    """At exit or collection: an error nobody received must not vanish."""
    if outcome.error is not None:
        log.error("the background save of %s in %s FAILED and the error was never raised "
                  "(no save(), wait() or close() came after it): that checkpoint was not written",
                  outcome.what, directory, exc_info=outcome.error)
