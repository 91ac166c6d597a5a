"""CheckpointManager: the public object, over an engine.

The manager holds the options (:mod:`ckpt.options`, :mod:`ckpt.policy`), the tracked
objects and the counters, and the run directory's catalog (:mod:`ckpt.catalog`); it hands
each ``save``, ``resume``, ``restore``, ``wait`` and ``close`` to its engine
(:mod:`ckpt.engine`: the local one in one process, the collective one under a process
group), which sees the manager as a :class:`~ckpt.engine.base.ManagerView`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path, PurePath
from typing import Any, Dict, List, Mapping, Optional, Tuple

from . import engine, policy, resume, spec
from . import options as opts
from . import preemption as preempt
from .cadence import Cadence
from .catalog import Catalog
from .engine import restoring
from .errors import PathLike, StorageError
from .record import CheckpointRecord
from .resume import Which
from .storage import is_url, open_store
from .storage.remote import ObjectPath


class CheckpointManager:
    """Tracks training state and writes, rotates and restores checkpoints in a directory.

    Keyword arguments other than the options below are the objects to track, by name:
    anything with ``state_dict()``/``load_state_dict()``. Options:

    keep_last, keep_best, monitor, mode, keep_every
        Retention (see :mod:`ckpt.policy`). With none of them every checkpoint is kept.
    map_location
        Where loaded tensors go before they are copied into your objects; ``"cpu"``
        (default) loads checkpoints written on GPU on any machine. Checked when the
        manager is created: a device this machine lacks is a :class:`ConfigError`.
    weights_only
        ``True`` (default) refuses files whose pickle names anything but plain data
        and tensors. ``False`` trusts the files: only for files you wrote yourself.
    strict
        Key and shape mismatches raise :class:`StateMismatchError` (default); with
        ``False`` matching entries load and the rest are skipped with a warning.
    progress
        Byte progress bars: ``None`` (default) on a terminal for large files only,
        ``True`` always, ``False`` never.
    preemption
        ``True`` handles SIGTERM and SIGUSR1 (or pass a list of signals): the handler
        only sets :attr:`preempted`; call :meth:`save_if_preempted` after each step.
    async_save
        ``True``: :meth:`save` copies the state into reused host buffers and returns;
        a background thread commits it (one save in flight; see :mod:`ckpt.background`;
        under a process group every rank's, :mod:`ckpt.engine.collective_async`).
    differential
        ``True``: a tensor whose bytes equal those of the same entry in the previous
        checkpoint is stored once and referenced (a frozen backbone is written once;
        see :mod:`ckpt.catalog.differential`). Every checkpoint still restores on its own.
    every_steps, every_seconds, max_overhead
        Save cadence for :meth:`should_save` (see :mod:`ckpt.cadence`): every N steps,
        every T seconds, or as often as keeps the loop's checkpoint stall at or under
        the fraction ``max_overhead`` (then the other two are a floor).
    storage_options, cache_dir
        For a URL run directory (``s3://bucket/run``, any fsspec URL): the fsspec
        filesystem's options, and a local directory committed first and uploaded in
        the background (see :mod:`ckpt.storage.remote`, :mod:`ckpt.storage.tiered`).
    collective_timeout
        With a process group of 2+ ranks (see :mod:`ckpt.engine.collective`):
        seconds a rank waits for the others at ``save``/``resume``/``restore``/``wait``/
        ``close`` before every rank raises :class:`CollectiveTimeoutError`; by default
        the process group's own timeout (``init_process_group(timeout=...)``) plus 5 s.
        A rank whose process dies is noticed sooner (:class:`ckpt.RankLostError`).

    The methods may be called from several threads; they run one at a time.
    """

    def __init__(self, directory: PathLike, *,
                 keep_last: Optional[int] = None, keep_best: Optional[int] = None,
                 monitor: Optional[str] = None, mode: str = "min",
                 keep_every: Optional[int] = None, map_location: Any = "cpu",
                 weights_only: bool = True, strict: bool = True,
                 progress: Optional[bool] = None, preemption: preempt.Option = False,
                 async_save: bool = False, every_steps: Optional[int] = None,
                 every_seconds: Optional[float] = None, max_overhead: Optional[float] = None,
                 differential: bool = False, storage_options: Optional[Mapping[str, Any]] = None,
                 cache_dir: Optional[PathLike] = None, collective_timeout: Optional[float] = None,
                 **trackables: Any) -> None:
        self.policy = policy.RetentionPolicy(keep_last=keep_last, keep_best=keep_best,
                                             monitor=monitor, mode=mode, keep_every=keep_every)
        self.options = opts.Options.check(map_location=map_location, weights_only=weights_only,
                                          strict=strict, progress=progress, async_save=async_save,
                                          differential=differential, collective_timeout=collective_timeout)
        self.cadence = Cadence(every_steps=every_steps, every_seconds=every_seconds, max_overhead=max_overhead)
        opts.check_trackables(trackables)
        opts.check_location(directory, storage_options, cache_dir)
        #: The run directory's committed checkpoints (for the engines: see ckpt.engine.base.ManagerView).
        self.catalog = Catalog(open_store(directory, storage_options, cache_dir))
        #: The run directory as given: a local path, or the URL of a remote one.
        self.url = self.catalog.store.url
        #: A local Path, or for a URL a pure path that prints as the URL (see ckpt.storage.remote).
        self.directory: PurePath = ObjectPath(self.url) if is_url(self.url) else Path(self.url)
        self.trackables: Dict[str, Any] = dict(trackables)
        self.epoch = 0
        self.step = 0
        self.resumed: Optional[CheckpointRecord] = None
        self.protected: Optional[Tuple[int, int]] = None  # the resume source: retention keeps it for now
        self.specs = spec.SpecCache()  # each tracked module's architecture, captured once
        self._closed = False
        self._stop_after_save = False  # should_save() said yes to a preemption: save() then ends the run
        self._lock = threading.RLock()
        self._engine = engine.select(self.options, self.url)  # the collective one under a process group
        self._engine.open(self.catalog)
        self._preempted_agreed = False  # with a process group: every rank learned of the signal
        self._preemption = preempt.install(preemption)  # last: nothing after it can fail

    # option values, read by users and by the tests of earlier versions
    map_location = property(lambda self: self.options.map_location)
    weights_only = property(lambda self: self.options.weights_only)
    strict = property(lambda self: self.options.strict)
    progress = property(lambda self: self.options.progress)

    # -- records -------------------------------------------------------------------

    @property
    def records(self) -> List[CheckpointRecord]:
        """The committed checkpoints, oldest first: the catalog's list (a copy; the
        manager keeps none of its own, see :attr:`ckpt.catalog.Catalog.records`)."""
        return self.catalog.records

    @property
    def checkpoints(self) -> List[CheckpointRecord]:
        """Committed checkpoints, oldest first (by epoch, then step)."""
        return self.catalog.records

    @property
    def latest(self) -> Optional[CheckpointRecord]:
        """The newest committed checkpoint (None before the first)."""
        records = self.catalog.records
        return records[-1] if records else None

    @property
    def best(self) -> Optional[CheckpointRecord]:
        """The best checkpoint by ``monitor``/``mode`` (None without a monitor or metric)."""
        return resume.best(self.catalog.records, self.policy)

    def refresh(self) -> List[CheckpointRecord]:
        """Re-read the directory (another process may have committed) and return records."""
        with self._lock:
            self._engine.settle()  # our own save in flight first; its error waits for save()/wait()
            return self.catalog.refresh()

    # -- saving --------------------------------------------------------------------

    def should_save(self, *, step: int) -> bool:
        """True when a step checkpoint is due at ``step`` (the cadence options) or a
        preemption signal arrived; call it once per training step::

            if mgr.should_save(step=global_step):
                mgr.save(epoch=epoch, step=global_step, mid_epoch=True)

        True at most once per step: asked again after the save at ``step`` (per
        micro-batch, say) it is False. When it is True because of a preemption signal,
        the next :meth:`save` commits, closes the manager and raises
        :class:`ckpt.Preempted` (exit status 128 + signal), as :meth:`save_if_preempted`
        does, so the loop above ends the run instead of saving at every later step. Under
        a process group ranks see signals at different steps: agree on the flag yourself
        (see the README's distributed section); save() then does not end the run.
        """
        preempted = self._preempted_everywhere()  # with a process group: the same on every rank
        due = self.cadence.due(opts.count("step", step), preempted=preempted)
        if due and preempted:
            self._stop_after_save = True  # the save this asks for ends the run (see save()), on every rank
        return due

    @property
    def save_interval(self) -> Optional[int]:
        """The interval in steps that ``max_overhead`` chose (None until measured, or without it)."""
        return self.cadence.interval_steps

    def save(self, epoch: Optional[int] = None, step: Optional[int] = None, *,
             metrics: Optional[Mapping[str, Any]] = None, extra: Optional[Mapping[str, Any]] = None,
             mid_epoch: bool = False, overwrite: bool = False) -> CheckpointRecord:
        """Write one checkpoint of every tracked object and return its record.

        ``epoch`` and ``step`` default to the last saved or restored values.
        ``mid_epoch=True`` marks a checkpoint taken inside ``epoch`` (resume continues
        that epoch); by default a checkpoint closes its epoch (resume starts the next).
        Saving an (epoch, step) that exists raises :class:`CheckpointExistsError`
        unless ``overwrite=True``; an end-of-epoch save replaces a mid-epoch
        checkpoint of the same (epoch, step) without asking. With ``async_save`` it
        returns the pending record (size 0, no checksum) once the state is copied;
        :attr:`latest` is the committed record after :meth:`wait`. After
        :meth:`should_save` said yes to a preemption signal, it commits, closes the
        manager and raises :class:`ckpt.Preempted`.
        """
        started = time.perf_counter()
        with self._lock:
            self._check_open()
            record = self._engine.save(self, epoch, step, metrics=metrics, extra=extra, mid_epoch=mid_epoch,
                                       overwrite=overwrite)
            self.cadence.saved(record.step, stall=time.perf_counter() - started)  # what the loop paid
        if self._stop_after_save and self._preemption is not None:
            self._stop_after_save = False
            raise preempt.stop(self, self._preemption, epoch=record.epoch, step=record.step)
        return record

    # -- restoring -----------------------------------------------------------------

    def resume(self) -> int:
        """Restore the newest checkpoint that verifies; return the epoch to run next.

        Damaged checkpoints are skipped with a warning and renamed ``*.corrupt``; a
        checkpoint replaced or deleted meanwhile (a concurrent writer) is looked up again
        (a few times, then skipped). On an empty directory nothing is touched and 0 is
        returned.
        """
        with self._lock:
            self._check_open()
            return self._engine.resume(self)

    def restore(self, which: Which = "latest", *, step: Optional[int] = None) -> CheckpointRecord:
        """Restore a chosen checkpoint (``"latest"``, ``"best"``, an epoch, a path or a
        record; ``step=`` narrows an epoch or picks by step alone) and return its record.

        Like :meth:`resume`, it restores the counters too: ``mgr.epoch``/``mgr.step`` are
        the restored checkpoint's, so a later ``save()`` without ``epoch=`` of an older
        checkpoint collides with the newer ones; pass the numbers to save under.
        """
        with self._lock:
            self._check_open()
            return self._engine.restore(self, which, step)

    def export_model(self, which: Which, path: PathLike, *, example_inputs: Any, **options: Any) -> Path:
        """Export the tracked model with the weights of checkpoint ``which`` (``"best"``,
        ``"latest"``, an epoch or a path) as a class-free program; the live model is not
        touched. ``options`` as for :func:`ckpt.export` (plus ``object=`` for the module)."""
        from .models.export import export_checkpoint  # model portability: loaded on use only
        with self._lock:
            self._check_open()
            self.refresh()
            record, obj = restoring.find(self, which, None)
            if obj is None:
                obj, _ = restoring.load(self, record)
            return export_checkpoint(self.trackables, obj, str(record.path), path,
                                     example_inputs=example_inputs, **options)

    # -- integrity -----------------------------------------------------------------

    def verify(self) -> Dict[str, str]:
        """Check every committed checkpoint against its checksum: file name -> "ok",
        "damaged" or "missing". Reads every file once; loads nothing into your objects."""
        with self._lock:
            self._engine.settle()
            report = self.catalog.verify(progress=self.options.progress)
            return {name: verdict.status.value for name, verdict in report.items()}

    # -- lifecycle -----------------------------------------------------------------

    def wait(self) -> None:
        """Block until background writes are committed (a no-op for synchronous saves);
        raise the error of a background save that failed."""
        with self._lock:
            self._engine.wait(self)

    @property
    def preempted(self) -> bool:
        """True once a preemption signal arrived (always False without ``preemption=``)."""
        return self._preemption is not None and self._preemption.triggered

    def save_if_preempted(self, *, epoch: int, step: int, metrics: Optional[Mapping[str, Any]] = None,
                          extra: Optional[Mapping[str, Any]] = None) -> None:
        """Call after each optimizer step: a no-op until a preemption signal arrived; then
        save a mid-epoch checkpoint, close the manager (restoring the signal handlers) and
        raise :class:`ckpt.Preempted`, a ``SystemExit`` with status 128 + signal number."""
        if self._preemption is not None and self._preempted_everywhere():
            raise preempt.stop(self, self._preemption, epoch=epoch, step=step,
                               metrics=metrics, extra=extra)

    def _preempted_everywhere(self) -> bool:
        """This process's preemption flag; with a process group, the same on every rank:
        one small collective per call (every rank calls should_save/save_if_preempted at
        the same points), until a signal reached any rank -- then it is every rank's."""
        handler = self._preemption
        if handler is None or self._preempted_agreed:
            return handler is not None and handler.triggered
        signum = self._engine.agree_signal(handler.received)
        if signum is not None:
            handler.received, self._preempted_agreed = signum, True  # every rank exits 128 + this one
        return signum is not None

    def close(self) -> None:
        """Flush pending writes; the manager cannot save afterwards."""
        if self._preemption is not None:
            self._preemption.close()
        with self._lock:
            if not self._closed:
                try:
                    self._engine.close(self)
                finally:
                    self._closed = True

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("this CheckpointManager is closed", path=self.directory,
                               hint="create a new CheckpointManager for the directory")

    def __repr__(self) -> str:
        return (f"CheckpointManager({str(self.directory)!r}, tracking={list(self.trackables)}, "
                f"checkpoints={len(self.catalog.records)})")

