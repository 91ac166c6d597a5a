"""The background writer of asynchronous saves: one thread, at most one save in flight.

With ``CheckpointManager(..., async_save=True)``, ``save()`` snapshots the checkpoint
into staging buffers (:mod:`ckpt.background.staging`) and returns; a ``ckpt-writer`` thread then
runs the same commit as a synchronous save (write, fsync, rename, index, retention),
so the index and retention change only once the file is durable.

* One save in flight: the next ``save()`` first waits for it, and logs that it had to
  (the disk is slower than the save interval).
* An error in the background is kept and raised by the next ``save()``, ``wait()`` or
  ``close()``, once.
* At interpreter exit the save in flight finishes (its thread is not a daemon); an
  error that nobody collected is logged with its traceback, as is one held by a
  writer that is garbage-collected.
"""

from __future__ import annotations

import copy
import logging
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
        self._thread: Optional[threading.Thread] = None
        self._outcome = _Outcome()
        self._lock = threading.Lock()
        weakref.finalize(self, _report_uncollected, self._outcome, where)

    def ready(self) -> None:
        """Wait for the save in flight, logging the stall, then raise its error if it failed."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            start = time.perf_counter()
            thread.join()
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
        """Run ``work`` (a save: ``what``) on a new writer thread; call :meth:`ready` first."""
        self._outcome.what = what
        go = threading.Event()
        thread = threading.Thread(target=self._run, args=(work, go), name="ckpt-writer")
        thread.start()
        self._thread = thread  # visible to join() only once it has started
        go.set()  # only now: a writer pickling at once would hold the GIL the caller needs to return

    def _run(self, work: Callable[[], object], go: threading.Event) -> None:
        go.wait()
        try:
            work()
        except BaseException as e:  # kept for the caller: a thread has no one to raise to
            if hasattr(e, "add_note"):
                e.add_note(f"raised by the background save of {self._outcome.what} in {self.directory}")
            self._outcome.error = e

    def join(self) -> None:
        """Wait for the save in flight; its error, if any, stays for :meth:`wait`."""
        thread = self._thread
        if thread is not None:
            thread.join()

    def wait(self) -> None:
        """Wait for the save in flight and raise its error (once) if it failed."""
        self.join()
        error, self._outcome.error = self._outcome.error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Flush, release the staging buffers, and raise an uncollected error."""
        try:
            self.wait()
        finally:
            self.stager.release()


def _report_uncollected(outcome: _Outcome, directory: str) -> None:
    """At exit or collection: an error nobody received must not vanish."""
    if outcome.error is not None:
        log.error("the background save of %s in %s FAILED and the error was never raised "
                  "(no save(), wait() or close() came after it): that checkpoint was not written",
                  outcome.what, directory, exc_info=outcome.error)
