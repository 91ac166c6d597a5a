"""Which engine does a manager's work: the manager itself, or the collective one.

In one process the manager saves and resumes itself. With a process group of several
ranks (or, in one process, to read a sharded checkpoint, which loads through
``torch.distributed.checkpoint``) it hands save, resume, restore, wait and close to a
:class:`~ckpt.distributed.coordinator.Coordinator`. A process that never imported
``torch.distributed`` imports nothing of it here.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional, Sequence

from .. import options as opts
from .. import schema
from ..record import CheckpointRecord

if TYPE_CHECKING:
    from ..distributed.coordinator import Coordinator


def collective(options: opts.Options) -> Optional[Coordinator]:
    """A Coordinator when a default process group is initialised (collective: every rank
    builds its manager), else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return None
    from ..distributed import coordinator
    if options.async_save:
        coordinator.warn_async()
    return coordinator.Coordinator.create(options.collective_timeout)


def for_restore(current: Optional[Coordinator], records: Sequence[CheckpointRecord],
                options: opts.Options) -> Optional[Coordinator]:
    """The engine for resume/restore: ``current`` (the process group's), or in a single
    process a local Coordinator when a sharded checkpoint is committed, else None."""
    if current is None and any(schema.is_sharded(r.name) for r in records):
        from ..distributed import collective as cl
        from ..distributed import coordinator
        return coordinator.Coordinator(cl.Group(), options.collective_timeout or 600.0)
    return current
