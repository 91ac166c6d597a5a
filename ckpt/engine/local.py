"""The engine of a manager in one process: saves, resumes and restores it itself.

A save is checked, captured and committed here (:mod:`.saving`), synchronously or
through the background writer (``async_save``: :mod:`ckpt.background`); a resume takes
the newest checkpoint that loads (:func:`ckpt.resume.newest_valid`) and applies it
(:mod:`.restoring`). A sharded checkpoint (a directory written under a process group)
is read through ``torch.distributed.checkpoint``, by a collective engine of one rank.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

from .. import resume, schema, state
from ..background import writer as background
from ..catalog import Catalog
from ..options import Options
from ..record import CheckpointRecord
from ..resume import Which
from . import restoring, saving
from .base import Engine, ManagerView, flush, release


class LocalEngine:
    """The :class:`~ckpt.engine.base.Engine` of a manager without a process group."""

    def __init__(self, url: str, options: Options) -> None:
        self.options = options
        self.writer = background.create(url, options.async_save)  # None for synchronous saves

    def open(self, catalog: Catalog) -> None:
        catalog.open()

    def save(self, mgr: ManagerView, epoch: Optional[int], step: Optional[int], *,
             metrics: Optional[Mapping[str, Any]], extra: Optional[Mapping[str, Any]],
             mid_epoch: bool, overwrite: bool) -> CheckpointRecord:
        if self.writer is not None:
            self.writer.ready()  # the save in flight commits (or raises) before this one starts
        args = saving.checked(mgr, epoch, step, metrics, extra, mid_epoch, overwrite)
        def build() -> schema.Checkpoint:  # an async save checks the states as it stages them
            return saving.build(mgr, state.capture(mgr.trackables), args.epoch, args.step, args.mid_epoch,
                                args.metrics, args.extra, [state.capture_rng()], defer_check=self.writer is not None)
        if self.writer is not None:
            record = self.writer.submit(build, mgr.catalog.store.where,
                                        lambda staged: saving.commit(mgr, staged, args.overwrite))
        else:
            record = saving.commit(mgr, build(), args.overwrite)
        mgr.epoch, mgr.step = args.epoch, args.step
        return record

    def resume(self, mgr: ManagerView) -> int:
        sharded = self._sharded(mgr)
        if sharded is not None:
            return sharded.resume(mgr)
        found = resume.newest_valid(mgr.refresh, functools.partial(_load_direct, mgr),
                                    functools.partial(restoring.skip, mgr), mgr.directory)
        if found is None:
            return 0
        record, obj = found
        restoring.apply(mgr, obj, record)
        return record.next_epoch

    def restore(self, mgr: ManagerView, which: Which, step: Optional[int]) -> CheckpointRecord:
        sharded = self._sharded(mgr)
        if sharded is not None:
            return sharded.restore(mgr, which, step)
        mgr.refresh()
        record, obj = restoring.find(mgr, which, step)
        if obj is None:
            obj, _ = restoring.load(mgr, record, direct=True)
        return restoring.apply(mgr, obj, record)

    def settle(self) -> None:
        if self.writer is not None:
            self.writer.join()  # its error waits for save()/wait()

    def wait(self, mgr: ManagerView) -> None:
        if self.writer is not None:
            self.writer.wait()
        flush(mgr.catalog.store)

    def agree_signal(self, received: Optional[int]) -> Optional[int]:
        return received  # one process: its own signal

    def close(self, mgr: ManagerView) -> None:
        try:
            self.wait(mgr)
        finally:
            release(mgr.catalog.store)  # even when the last save failed: nobody else could write
            if self.writer is not None:
                self.writer.close()  # frees the staging buffers

    def _sharded(self, mgr: ManagerView) -> Optional[Engine]:
        """A collective engine of one rank when a sharded checkpoint is committed (it
        loads through ``torch.distributed.checkpoint``), else None."""
        if not any(schema.is_sharded(r.name) for r in mgr.records):
            return None
        from .collective import CollectiveEngine
        return CollectiveEngine.single(self.options.collective_timeout)


def _load_direct(mgr: ManagerView, record: CheckpointRecord) -> Any:
    """What resume() reads of ``record``: its dict, the modules' tensors read straight
    into the tracked modules when it is applied."""
    return restoring.load(mgr, record, direct=True)[0]
