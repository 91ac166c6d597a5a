"""The catalog: a run directory's committed checkpoints, over any store.

:mod:`.catalog` is the front (:class:`Catalog`: list, load, commit, quarantine, verify);
:mod:`.commit` the one commit-and-retention transaction; :mod:`.index` and :mod:`.book`
the index and its journal; :mod:`.history` the metrics history; :mod:`.differential`
and :mod:`.sharddir` the bookkeeping of differential and sharded checkpoints;
:mod:`.namespace` which names belong to a run directory.
"""

from __future__ import annotations

from .catalog import Catalog

__all__ = ["Catalog"]
