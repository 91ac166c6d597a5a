"""Storage back-ends: where a run's checkpoints live (atomic write, listing, deletion, lock).

:mod:`.base` is the seam (:class:`Store`); :mod:`.local` a directory on disk;
:mod:`.remote` an object store through fsspec (commit-last); :mod:`.tiered` a local
directory in front of a remote store; :mod:`.retry` retries a remote store's transient
errors; :mod:`.claim` the writer claim of a remote run directory. Knows nothing of torch,
of the checkpoint file's format (:mod:`ckpt.format`) or of the catalog (:mod:`ckpt.catalog`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..errors import ConfigError
from .base import Store, Written
from .local import LocalStore

__all__ = ["Store", "Written", "LocalStore", "open_store", "open_existing", "is_url", "check_location"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters or more: not a Windows drive


def is_url(location: object) -> bool:
    """A location with a scheme (``s3://``, ``memory://``; not ``file://`` or a Windows drive)."""
    return isinstance(location, str) and bool(_URL.match(location)) and not location.startswith("file://")


def open_store(location: Union[str, os.PathLike[str]], storage_options: Optional[Mapping[str, Any]] = None,
               cache_dir: Optional[Union[str, os.PathLike[str]]] = None) -> Store:
    """The store for a run directory: a local path (created if missing), or a URL
    through fsspec (with ``cache_dir``: a local tier in front of it)."""
    check_location(location)
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
    check_location(location)
    if is_url(location):  # a tool's store: it never takes a run over from its writer
        from .remote import FsspecStore
        return FsspecStore(str(location), storage_options, writer=False)
    return LocalStore(Path(location), create=False)


def check_location(location: Union[str, os.PathLike[str]]) -> None:
    """Refuse a run directory string that would silently land somewhere else: empty
    (the current directory), a URL with nothing after ``scheme://`` (what
    ``f"s3://{os.environ.get('BUCKET', '')}"`` gives with the variable unset), or a
    ``scheme:`` without ``//``, which a local path must not turn into ``./s3:``."""
    text = os.fspath(location)
    if not isinstance(text, str):
        return  # bytes paths: the caller's type check says what to pass
    url = is_url(text) or text.startswith("file://")
    rest = text.split("://", 1)[1] if url else text
    if not rest.strip().strip("/"):
        what = f"the URL {text!r} names no bucket or path" if url else "the run directory is empty"
        example = f"{text.split('://')[0]}://bucket/runs/exp1" if url else "runs/exp1"
        raise ConfigError(what + "; nothing was written",
                          hint=f"pass a full location such as {example!r} (is an environment variable unset?)")
    scheme = _SCHEME.match(text)
    if not url and scheme is not None and not os.path.exists(text):
        name = scheme.group(1)
        raise ConfigError(f"{text!r} looks like a URL without '//' after {name + ':'!r}; it is not taken "
                          "for a local directory, and nothing was written",
                          hint=f"write {name}://{text[len(name) + 1:].lstrip('/')} for remote storage, or "
                               f"./{text} for a local directory with that name")
