"""The engines a manager hands its work to (:mod:`.base` says what they are).

In one process the manager's engine is :class:`~ckpt.engine.local.LocalEngine`; with a
process group of several ranks it is :class:`~ckpt.engine.collective.CollectiveEngine`,
chosen once, when the manager is created. A process that never imported
``torch.distributed`` imports nothing of it here.
"""

from __future__ import annotations

import sys

from ..options import Options
from .base import Engine
from .local import LocalEngine


def select(options: Options, url: str) -> Engine:
    """The collective engine when a default process group is initialised (collective:
    every rank builds its manager), else the local one."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return LocalEngine(url, options)
    from . import collective
    return collective.CollectiveEngine.create(options.collective_timeout, url if options.async_save else None)
