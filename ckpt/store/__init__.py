"""Storage: where a run's checkpoints live, and the catalog of what is committed there.

:mod:`.base` is the seam (:class:`Store`); :mod:`.local` a directory on disk;
:mod:`.remote` an object store through fsspec (commit-last); :mod:`.tiered` a local
directory in front of a remote store; the catalog (:mod:`.catalog`, :mod:`.index`,
:mod:`.commit`) works over any store; :mod:`.torchfile` reads and writes one
checkpoint file; :mod:`.checksum` the CRC-32.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .base import Store, Written
from .catalog import Catalog
from .local import LocalStore

__all__ = ["Store", "Written", "Catalog", "LocalStore", "open_store", "open_existing", "is_url"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(location: object) -> bool:
    """A location with a scheme (``s3://``, ``memory://``; not ``file://`` or a Windows drive)."""
    return isinstance(location, str) and bool(_URL.match(location)) and not location.startswith("file://")


def open_store(location: Union[str, os.PathLike[str]], storage_options: Optional[Mapping[str, Any]] = None,
               cache_dir: Optional[Union[str, os.PathLike[str]]] = None) -> Store:
    """The store for a run directory: a local path (created if missing), or a URL
    through fsspec (with ``cache_dir``: a local tier in front of it)."""
    if not is_url(location):
        path = str(location)[len("file://"):] if str(location).startswith("file://") else location
        return LocalStore(Path(path))
    from .remote import FsspecStore  # fsspec is an extra: imported only for URLs
    remote = FsspecStore(str(location), storage_options)
    if cache_dir is None:
        return remote
    from .tiered import TieredStore
    return TieredStore(LocalStore(Path(cache_dir)), remote)


def open_existing(location: Union[str, os.PathLike[str]],
                  storage_options: Optional[Mapping[str, Any]] = None) -> Store:
    """The store of an existing run directory, for reading (the CLI): never created."""
    if is_url(location):
        return open_store(location, storage_options)
    return LocalStore(Path(location), create=False)
