"""CheckpointManager: orchestration only.

Policy lives in :mod:`ckpt.policy`, files in :mod:`ckpt.storage` and :mod:`ckpt.index`,
the schema in :mod:`ckpt.format`, object state in :mod:`ckpt.state`. This module
decides *when* each runs: capture, commit under the lock, index, then retention.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from filelock import Timeout

from . import __version__, commit, data, exporting, fileio, format, index, interop, models, policy, state, storage
from . import async_writer
from . import preemption as preempt
from .errors import (CheckpointNotFoundError, ConfigError,
                     CorruptCheckpointError, StorageError)
from .record import CheckpointRecord

Which = Union[str, int, "os.PathLike[str]", CheckpointRecord]


class CheckpointManager:
    """Tracks training state and writes, rotates and restores checkpoints in a directory.

    Keyword arguments other than the options below are the objects to track, by name:
    anything with ``state_dict()``/``load_state_dict()``. Options:

    keep_last, keep_best, monitor, mode, keep_every
        Retention (see :mod:`ckpt.policy`). With none of them every checkpoint is kept.
    map_location
        Where loaded tensors go before they are copied into your objects; ``"cpu"``
        (default) loads checkpoints written on GPU on any machine.
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
        a background thread commits it (one save in flight; see :mod:`ckpt.async_writer`).
    """

    def __init__(self, directory: Union[str, "os.PathLike[str]"], *,
                 keep_last: Optional[int] = None, keep_best: Optional[int] = None,
                 monitor: Optional[str] = None, mode: str = "min",
                 keep_every: Optional[int] = None, map_location: Any = "cpu",
                 weights_only: bool = True, strict: bool = True,
                 progress: Optional[bool] = None, preemption: preempt.Option = False,
                 async_save: bool = False, **trackables: Any) -> None:
        self.policy = policy.RetentionPolicy(keep_last=keep_last, keep_best=keep_best,
                                             monitor=monitor, mode=mode, keep_every=keep_every)
        for name, obj in trackables.items():
            if name in format.RESERVED:
                raise ConfigError(f"{name!r} is a reserved checkpoint entry, not a trackable name",
                                  hint=f"track it under another name, e.g. my_{name}=...")
            state.check_trackable(name, obj)
        self.directory = storage.prepare_directory(Path(directory))
        self.trackables: Dict[str, Any] = dict(trackables)
        self.map_location = map_location
        self.weights_only = weights_only
        self.strict = strict
        self.progress = progress
        self.epoch = 0
        self.step = 0
        self.resumed: Optional[CheckpointRecord] = None
        self._protected: Optional[Tuple[int, int]] = None
        self._warned_no_metric = False
        self._specs = models.SpecCache()  # each tracked module's architecture, captured once
        self._closed = False
        self._writer = async_writer.create(self.directory, async_save)
        storage.clean_temporaries(self.directory)
        self._records = self._scan(rewrite=True)
        self._preemption = preempt.install(preemption)  # last: nothing after it can fail

    # -- records -------------------------------------------------------------------

    @property
    def checkpoints(self) -> List[CheckpointRecord]:
        """Committed checkpoints, oldest first (by epoch, then step)."""
        return list(self._records)

    @property
    def latest(self) -> Optional[CheckpointRecord]:
        return self._records[-1] if self._records else None

    @property
    def best(self) -> Optional[CheckpointRecord]:
        """The best checkpoint by ``monitor``/``mode`` (None without a monitor or metric)."""
        if not self.policy.monitor:
            return None
        ranked = policy.best(self._records, self.policy.monitor, self.policy.mode, 1)
        return ranked[0] if ranked else None

    def refresh(self) -> List[CheckpointRecord]:
        """Re-read the directory (another process may have committed) and return records."""
        if self._writer is not None:
            self._writer.join()  # our own save in flight first; its error waits for save()/wait()
        self._records = self._scan(rewrite=False)
        return self.checkpoints

    def _scan(self, *, rewrite: bool) -> List[CheckpointRecord]:
        records, changed = index.reconcile(self.directory)
        if changed and rewrite:
            try:
                with storage.lock(self.directory).acquire(timeout=0):
                    listing = index.scan(self.directory, locked=True)  # a writer may have committed
                    records = listing.records
                    if listing.changed:
                        index.write(self.directory, records)
            except Timeout:
                pass  # a writer is committing: it rewrites the index itself
            except OSError as e:
                warnings.warn(f"{self.directory}: could not rewrite the index ({e}); the checkpoint "
                              "files still describe themselves", stacklevel=3)
        return records

    # -- saving --------------------------------------------------------------------

    def save(self, epoch: Optional[int] = None, step: Optional[int] = None, *,
             metrics: Optional[Mapping[str, Any]] = None, extra: Optional[Mapping[str, Any]] = None,
             mid_epoch: bool = False, overwrite: bool = False) -> CheckpointRecord:
        """Write one checkpoint of every tracked object and return its record.

        ``epoch`` and ``step`` default to the last saved or resumed values.
        ``mid_epoch=True`` marks a checkpoint taken inside ``epoch`` (resume continues
        that epoch); by default a checkpoint closes its epoch (resume starts the next).
        Saving an (epoch, step) that exists raises :class:`CheckpointExistsError`
        unless ``overwrite=True``; an end-of-epoch save replaces a mid-epoch
        checkpoint of the same (epoch, step) without asking. With ``async_save`` it returns
        once the state is copied; the record's size and checksum are set at commit.
        """
        self._check_open()
        if self._writer is not None:
            self._writer.ready()  # the save in flight commits (or raises) before this one starts
        epoch = self.epoch if epoch is None else _count("epoch", epoch)
        step = self.step if step is None else _count("step", step)
        metric_values = format.metrics_to_floats(metrics)
        if self.policy.keep_best and self.policy.monitor not in metric_values and not self._warned_no_metric:
            self._warned_no_metric = True
            warnings.warn(f"save(epoch={epoch}, step={step}) has no {self.policy.monitor!r} metric: "
                          "such checkpoints are not eligible for keep_best", stacklevel=2)
        if extra is not None and not isinstance(extra, Mapping):
            raise ConfigError(f"extra must be a dict, got {type(extra).__name__}",
                              hint="pass extra={'lr': lr, 'best_acc': best_acc}")
        commit.check_new((epoch, step), mid_epoch, overwrite, self._records)
        inside = [] if mid_epoch else data.inside_epoch(self.trackables)
        if inside:
            warnings.warn(f"save(epoch={epoch}, step={step}) is an end-of-epoch checkpoint, but "
                          f"{', '.join(map(repr, inside))} is part-way "
                          "through the epoch: resuming from it starts the next epoch and skips the "
                          "rest of this one; pass mid_epoch=True for step checkpoints", stacklevel=2)
        obj, nbytes = format.build(state.capture(self.trackables), epoch=epoch, step=step,
                                   mid_epoch=mid_epoch, metrics=metric_values,
                                   rng=state.capture_rng(), extra=dict(extra or {}),
                                   library_version=__version__,
                                   spec=models.checkpoint_specs(self.trackables, self._specs))
        if self._writer is not None:
            record = self._writer.submit(obj, lambda staged: self._commit(staged, nbytes, overwrite))
        else:
            record = self._commit(obj, nbytes, overwrite)
        self.epoch, self.step = epoch, step
        return record

    def _commit(self, obj: Dict[str, Any], nbytes: int, overwrite: bool) -> CheckpointRecord:
        """Commit ``obj`` (runs on the writer thread with ``async_save``)."""
        newer = self._protected is None or (obj["epoch"], obj["step"]) > self._protected
        record, self._records = commit.commit(
            self.directory, obj, nbytes, retention=self.policy, overwrite=overwrite,
            protected=set() if newer else {self._protected}, progress=self.progress)
        if newer:
            self._protected = None  # a newer checkpoint is committed: the resume source may go
        return record

    # -- restoring -----------------------------------------------------------------

    def resume(self) -> int:
        """Restore the newest checkpoint that verifies; return the epoch to run next.

        Damaged checkpoints are skipped with a warning and renamed ``*.corrupt``. On an
        empty directory nothing is touched and 0 is returned.
        """
        self._check_open()
        self.refresh()
        damaged: List[str] = []
        for record in reversed(self._records):
            try:
                obj = self._load(record)
            except (CorruptCheckpointError, FileNotFoundError) as e:
                damaged.append(str(record.path))
                self._skip(record, e)
                continue
            self._apply(obj, record)
            return record.next_epoch
        if damaged:
            raise CheckpointNotFoundError(
                f"no valid checkpoint to resume from; damaged: {', '.join(damaged)}",
                path=self.directory, hint="the damaged files were kept as *.corrupt; "
                                          "start a fresh run or restore one by path")
        return 0

    def restore(self, which: Which = "latest", *, step: Optional[int] = None) -> CheckpointRecord:
        """Restore a chosen checkpoint (``"latest"``, ``"best"``, an epoch, a path or a
        record; ``step=`` narrows an epoch or picks by step alone) and return its record."""
        self._check_open()
        self.refresh()
        record = self._find(which, step)
        obj = self._load(record)
        self._apply(obj, record)
        return record

    def export_model(self, which: Which, path: Union[str, "os.PathLike[str]"], *, example_inputs: Any,
                     **options: Any) -> Path:
        """Export the tracked model with the weights of checkpoint ``which`` (``"best"``,
        ``"latest"``, an epoch or a path) as a class-free program; the live model is not
        touched. ``options`` as for :func:`ckpt.export` (plus ``object=`` for the module)."""
        self._check_open()
        self.refresh()
        record = self._find(which, None)
        return exporting.export_checkpoint(self.trackables, self._load(record), str(record.path), path,
                                           example_inputs=example_inputs, **options)

    def _find(self, which: Which, step: Optional[int]) -> CheckpointRecord:
        if isinstance(which, CheckpointRecord):
            return which
        found: Optional[CheckpointRecord] = None
        if which == "latest" and step is None:
            found = self.latest
        elif which == "best":
            if not self.policy.monitor:
                raise ConfigError("restore('best') needs a monitored metric",
                                  hint="create the manager with monitor='val_loss' (and mode=)")
            found = self.best
        elif isinstance(which, int) and not isinstance(which, bool) or which == "latest":
            matches = [r for r in self._records
                       if (which == "latest" or r.epoch == which) and (step is None or r.step == step)]
            found = matches[-1] if matches else None
        elif isinstance(which, (str, os.PathLike)):
            path = Path(which)
            known = next((r for r in self._records if r.path.resolve() == path.resolve()), None)
            if known is not None:
                return known
            if not path.is_file():
                raise CheckpointNotFoundError("no such checkpoint file", path=path,
                                              hint="pass 'latest', 'best', an epoch number or an existing path")
            return interop.record_for(path, weights_only=self.weights_only)  # foreign layouts too
        if found is None:
            have = ", ".join(f"e{r.epoch}/s{r.step}" for r in self._records) or "none"
            raise CheckpointNotFoundError(f"no checkpoint matches {which!r}"
                                          + (f" with step {step}" if step is not None else "")
                                          + f" (committed: {have})", path=self.directory,
                                          hint="list them with mgr.checkpoints or `python -m ckpt list DIR`")
        return found

    def _load(self, record: CheckpointRecord) -> Dict[str, Any]:
        obj = fileio.load(record.path, map_location=self.map_location, weights_only=self.weights_only,
                          checksum=record.checksum, progress=self.progress)
        return interop.as_checkpoint(obj, self.trackables, str(record.path))

    def _apply(self, obj: Dict[str, Any], record: CheckpointRecord) -> None:
        state.restore(self.trackables, obj, strict=self.strict, path=str(record.path))
        state.restore_rng(obj.get("rng") or {})
        record._extra = copy.deepcopy(obj.get("extra", {}))  # not tied to the file mapping
        self.epoch, self.step = record.epoch, record.step
        self.resumed = record
        self._protected = record.key

    def _skip(self, record: CheckpointRecord, error: BaseException) -> None:
        """Leave out a checkpoint that failed to load; a damaged one (not a missing one)
        is renamed ``*.corrupt`` and dropped from the index so that no save collides with it."""
        self._records = [r for r in self._records if r.key != record.key]
        where = ""
        if isinstance(error, CorruptCheckpointError):
            try:
                with storage.lock(self.directory):
                    records = [r for r in index.scan(self.directory, locked=True).records if r.key != record.key]
                    where = f"; kept as {storage.quarantine(record.path)}"
                    index.write(self.directory, records)
            except OSError as e:
                where = f"; could not move it aside ({e}), so it will be skipped again"
        warnings.warn(f"skipping damaged checkpoint {record.path}: {error}{where}", stacklevel=3)

    # -- integrity -----------------------------------------------------------------

    def verify(self) -> Dict[str, str]:
        """Check every committed checkpoint against its checksum: file name -> "ok",
        "damaged" or "missing". Reads every file once; loads nothing into your objects."""
        if self._writer is not None:
            self._writer.join()
        report = index.verify_all(self.directory, progress=self.progress)
        return {name: status for name, (status, _) in report.items()}

    # -- lifecycle -----------------------------------------------------------------

    def wait(self) -> None:
        """Block until background writes are committed (a no-op for synchronous saves);
        raise the error of a background save that failed."""
        if self._writer is not None:
            self._writer.wait()

    @property
    def preempted(self) -> bool:
        """True once a preemption signal arrived (always False without ``preemption=``)."""
        return self._preemption is not None and self._preemption.triggered

    def save_if_preempted(self, *, epoch: int, step: int, metrics: Optional[Mapping[str, Any]] = None,
                          extra: Optional[Mapping[str, Any]] = None) -> None:
        """Call after each optimizer step: a no-op until a preemption signal arrived; then
        save a mid-epoch checkpoint, close the manager (restoring the signal handlers) and
        raise :class:`ckpt.Preempted`, a ``SystemExit`` with status 128 + signal number."""
        if self.preempted:
            raise preempt.stop(self, self._preemption, epoch=epoch, step=step,
                                  metrics=metrics, extra=extra)

    def close(self) -> None:
        """Flush pending writes; the manager cannot save afterwards."""
        if self._preemption is not None:
            self._preemption.close()
        if not self._closed:
            try:
                self.wait()
            finally:
                self._closed = True
                if self._writer is not None:
                    self._writer.close()  # frees the staging buffers

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("this CheckpointManager is closed", path=self.directory,
                               hint="create a new CheckpointManager for the directory")

    def __repr__(self) -> str:
        return (f"CheckpointManager({str(self.directory)!r}, tracking={list(self.trackables)}, "
                f"checkpoints={len(self._records)})")


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative int, got {value!r}",
                          hint=f"pass {name}=<loop counter>, e.g. save(epoch=epoch, step=global_step)")
    return value
