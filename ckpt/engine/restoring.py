"""What a restore is made of: which checkpoint, its dict read, applied to the objects.

Both engines restore through these steps over the manager's
:class:`~ckpt.engine.base.ManagerView`; which checkpoint a name means and the resume
loop itself are :mod:`ckpt.resume`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .. import resume, schema, state
from ..record import CheckpointRecord
from ..resume import Which
from .base import ManagerView


def load(mgr: ManagerView, record: CheckpointRecord, direct: bool = False) -> Tuple[Dict[str, Any], schema.Header]:
    """``record``'s dict, verified; ``direct``: the modules' tensors are read straight into
    the tracked modules when the dict is applied (:func:`state.restore` fills them after
    its checks)."""
    return mgr.catalog.load(record, map_location=mgr.options.map_location,
                            weights_only=mgr.options.weights_only, progress=mgr.options.progress,
                            targets=state.direct_targets(mgr.trackables) if direct else None)


def apply(mgr: ManagerView, obj: Dict[str, Any], record: CheckpointRecord) -> CheckpointRecord:
    """Restore every tracked object (and this process's RNG states) from ``obj``."""
    state.restore(mgr.trackables, obj, strict=mgr.options.strict, path=str(record.path), rng=obj.get("rng") or {})
    return applied(mgr, obj, record)


def applied(mgr: ManagerView, obj: Dict[str, Any], record: CheckpointRecord) -> CheckpointRecord:
    """Note that ``record`` (whose dict is ``obj``) was restored: counters, cadence, and
    the resume source that retention keeps until a newer checkpoint is committed."""
    mgr.resumed, mgr.cadence = resume.applied(obj, record, mgr.cadence)
    mgr.epoch, mgr.step = record.epoch, record.step
    mgr.protected = record.key
    return mgr.resumed


def find(mgr: ManagerView, which: Which, step: Optional[int]) -> Tuple[CheckpointRecord, Optional[Dict[str, Any]]]:
    """The record ``which`` names, and the checkpoint dict when it had to be read to
    tell (a file outside the index, possibly in a foreign layout): see :mod:`ckpt.resume`."""
    found = resume.find(mgr.records, which, step, retention=mgr.policy, url=mgr.url, directory=mgr.directory)
    return (found, None) if isinstance(found, CheckpointRecord) else foreign(mgr, found)


def foreign(mgr: ManagerView, path: Path) -> Tuple[CheckpointRecord, Dict[str, Any]]:
    """A file outside the index, read once: ckpt's own layout or a foreign one."""
    return resume.read_file(path, mgr.trackables, map_location=mgr.options.map_location,
                            weights_only=mgr.options.weights_only)


def skip(mgr: ManagerView, record: CheckpointRecord, error: BaseException) -> bool:
    """Leave out a checkpoint that failed to load; a damaged one (not a missing one)
    is renamed ``*.corrupt`` and dropped from the index so that no save collides with it.
    True if it was moved aside; False if it is gone, or was replaced meanwhile."""
    mgr.catalog.forget(record)
    return resume.skip(mgr.catalog, record, error)
