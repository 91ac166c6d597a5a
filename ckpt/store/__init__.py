"""Storage: where a run's checkpoints live, and the catalog of what is committed there.

:mod:`.base` is the seam (:class:`Store`); :mod:`.local` a directory on disk; the
catalog (:mod:`.catalog`, :mod:`.index`, :mod:`.commit`) works over any store;
:mod:`.torchfile` reads and writes one checkpoint file; :mod:`.checksum` the CRC-32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .base import Store, Written
from .catalog import Catalog
from .local import LocalStore

__all__ = ["Store", "Written", "Catalog", "LocalStore", "open_store"]


def open_store(location: Union[str, os.PathLike[str]]) -> Store:
    """The store for a run directory: a local path (created if missing)."""
    return LocalStore(Path(location))
