"""The background writer of asynchronous saves: one thread, at most one save in flight.

With ``CheckpointManager(..., async_save=True)``, ``save()`` snapshots the checkpoint
into staging buffers (:mod:`ckpt.background.staging`) and returns; a ``ckpt-writer`` thread then
runs the same commit as a synchronous save (write, fsync, rename, index, retention),
so the index and retention change only once the file is durable.

* One save in flight: the next ``save()`` first waits for it, and logs that it had to
  (the disk is slower than the save interval).
* An error in the background is kept and raised by the next ``save()``, ``wait()`` or
  ``close()``, once.
* The thread outlives a save (handing a save over does not wait for a new thread to
  be scheduled); it stops at ``close()``, when its writer is garbage-collected, or
  after a failed save (the next save starts another).
* At interpreter exit the save in flight finishes (an exit handler waits for it); an
  error that nobody collected is logged with its traceback, as is one held by a
  writer that is garbage-collected.
"""

from __future__ import annotations

import atexit
import copy
import functools
import logging
import queue
import threading
import time
import weakref
from pathlib import PurePath
from typing import Callable, Optional, Tuple

from .. import record, schema
from ..errors import ConfigError
from ..record import CheckpointRecord
from .staging import Stager

log = logging.getLogger("ckpt")

Commit = Callable[[schema.Checkpoint], CheckpointRecord]


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
        self.idle = threading.Event()  # no save in flight
        self.idle.set()
        self.ended = False  # the thread has stopped taking saves (after an error)


#: A save for the thread: the staged checkpoint and its commit; None: stop.
_Job = Optional[Tuple[schema.Checkpoint, Commit]]


class AsyncWriter:
    """Commits staged checkpoints on a background thread, one at a time.

    The thread lives from the first save to :meth:`close` (or to a save that fails:
    the next one starts another), so that ``save()`` hands a checkpoint over without
    waiting for a new thread to be scheduled. It is a daemon thread; a save in flight
    at interpreter exit is finished by an exit handler (:func:`_finish_at_exit`).
    """

    def __init__(self, where: str) -> None:
        self.directory = where
        self.stager = Stager()
        self._thread: Optional[threading.Thread] = None
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._outcome = _Outcome()
        self._lock = threading.Lock()
        weakref.finalize(self, _report_uncollected, self._outcome, where)
        weakref.finalize(self, self._jobs.put, None)  # an abandoned writer's thread ends
        self._at_exit = functools.partial(_finish_at_exit, self._outcome)
        atexit.register(self._at_exit)  # after finalize's own handler: runs before it
        weakref.finalize(self, atexit.unregister, self._at_exit)

    def ready(self) -> None:
        """Wait for the save in flight, logging the stall, then raise its error if it failed."""
        if not self._outcome.idle.is_set():
            start = time.perf_counter()
            self._outcome.idle.wait()
            log.warning("save() waited %.2f s for the checkpoint of %s to commit in %s "
                        "(one save in flight at most: saves come faster than the disk writes them)",
                        time.perf_counter() - start, self._outcome.what, self.directory)
        self.wait()

    def submit(self, checkpoint: schema.Checkpoint, path: PurePath, commit: Commit) -> CheckpointRecord:
        """Stage ``checkpoint`` and commit it in the background; return its pending record.

        The pending record has no size or checksum yet (0 and None); once the commit is
        done, the manager's :attr:`~ckpt.CheckpointManager.latest` is the committed record.
        """
        with self._lock:
            self.ready()
            obj = checkpoint.obj
            staged = self.stager.stage({k: v for k, v in obj.items() if k != "extra"})
            staged["extra"] = copy.deepcopy(obj["extra"])  # small; kept by the record
            pending = record.make(checkpoint.header, path, size=0, checksum=None,
                                  extra=staged["extra"])
            self._outcome.what = f"epoch {checkpoint.header.epoch}, step {checkpoint.header.step}"
            if self._thread is None:
                self._start()
            self._outcome.idle.clear()
            self._jobs.put((schema.with_states(checkpoint, staged), commit))
        return pending

    def _start(self) -> None:
        outcome, jobs, directory = self._outcome, self._jobs, self.directory
        outcome.ended = False
        thread = threading.Thread(target=_serve, args=(jobs, outcome, directory), name="ckpt-writer", daemon=True)
        thread.start()
        self._thread = thread

    def join(self) -> None:
        """Wait for the save in flight; its error, if any, stays for :meth:`wait`."""
        self._outcome.idle.wait()
        thread = self._thread
        if thread is not None and self._outcome.ended:  # it stopped after a failure: gone now
            thread.join()
            self._thread = None

    def wait(self) -> None:
        """Wait for the save in flight and raise its error (once) if it failed."""
        self.join()
        error, self._outcome.error = self._outcome.error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Flush, stop the thread, release the staging buffers, and raise an uncollected error."""
        try:
            self.wait()
        finally:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._jobs.put(None)
                thread.join()
            atexit.unregister(self._at_exit)
            self.stager.release()


def _serve(jobs: queue.SimpleQueue[_Job], outcome: _Outcome, directory: str) -> None:
    """The writer thread: commit each save handed over, until told to stop or one fails."""
    while True:
        job = jobs.get()
        if job is None:
            return
        staged, commit = job
        try:
            commit(staged)
        except BaseException as e:  # kept for the caller: a thread has no one to raise to
            if hasattr(e, "add_note"):
                e.add_note(f"raised by the background save of {outcome.what} in {directory}")
            outcome.error, outcome.ended = e, True
            return
        finally:
            del job, staged  # the staged dict must not outlive its save
            outcome.idle.set()


def _finish_at_exit(outcome: _Outcome) -> None:
    """At interpreter exit: the save in flight commits before the process ends."""
    outcome.idle.wait()


def _report_uncollected(outcome: _Outcome, directory: str) -> None:
    """At exit or collection: an error nobody received must not vanish."""
    if outcome.error is not None:
        log.error("the background save of %s in %s FAILED and the error was never raised "
                  "(no save(), wait() or close() came after it): that checkpoint was not written",
                  outcome.what, directory, exc_info=outcome.error)
