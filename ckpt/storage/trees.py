"""Sharded checkpoints as directories of files in any store: local, object store, tiered.

A sharded checkpoint (``ckpt-e<epoch>-s<step>.dcp/``) is a directory of files. Each
store hands out a ``Tree`` for one: the reads the catalog needs (manifest, plain
entries, verification) and what the distributed layer needs to write and load it.

- :class:`LocalTree`: a directory on a local (or shared POSIX) disk.
- :class:`ObjectTree`: objects ``<run>/<name>/<file>`` on an object store. There is no
  rename: the files are written under their final keys, and the checkpoint exists
  once its commit record ``<name>.ckpt-commit`` (size, checksum) is written, last, by
  rank 0 -- the same commit-last rule as a single file (see docs/howto/remote.md).
- :class:`TieredTree`: a node's local cache in front of an object tree; each file is
  read from the cache when it holds it, else from the store (after the cache was
  lost, or for files another node wrote).

The same trees serve a folder of files in a trainer's own layout (a Hugging Face
``checkpoint-N``): :func:`open_tree` gives the local directory or objects under a URL,
read-only, and :func:`checksum` sums one of its files, streamed.

Callers never tell them apart by class: each says what it is made of,
:meth:`capabilities` (:class:`TreeCapabilities`: a local directory, objects of a
filesystem, background uploads), as a store does (:func:`ckpt.storage.base.capabilities`).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Union

from ..io.checksum import file_checksum, format_checksum, stream_crc
from ..io.posix import open_regular, read_regular

#: Queues a job for a tiered store's upload thread: (name, job, as_writer).
Later = Callable[[str, Callable[[Any], int], bool], None]


@dataclass(frozen=True)
class TreeCapabilities:
    """What a sharded checkpoint's tree is made of, each None where it is not."""

    #: Its files are (or, for a cache, may be) in this local directory: written there and
    #: renamed into place by the commit.
    directory: Optional[Path] = None
    #: Its files are objects of an fsspec filesystem, under their final keys, committed by
    #: a record written last (a tiered tree: the copy uploaded from the cache).
    objects: Optional[ObjectTree] = None
    #: Uploads the cache's files to ``objects`` in the background (a tiered store's queue).
    upload: Optional[Later] = None

    @property
    def local_only(self) -> Optional[Path]:
        """The local directory when that is all the tree is (a directory may be renamed)."""
        return self.directory if self.objects is None else None


class Tree(Protocol):
    """A sharded checkpoint in some store: its files, read by name, and what it is made of."""

    def where(self, rel: str = "") -> PurePath:
        """The checkpoint (or its file ``rel``) as shown to users."""

    def read_bytes(self, rel: str) -> bytes:
        """The whole file ``rel``; :class:`FileNotFoundError` when absent."""

    def open(self, rel: str) -> AbstractContextManager[BinaryIO]:
        """The file ``rel``, open for reading."""

    def size(self, rel: str) -> Optional[int]:
        """The size of the file ``rel``; None when there is no such file."""

    def capabilities(self) -> TreeCapabilities:
        """What this tree is made of (see :class:`TreeCapabilities`)."""


def as_tree(where: Union[str, os.PathLike[str], Tree]) -> Tree:
    """A tree as given, or a local directory's for a path."""
    return LocalTree(Path(where)) if isinstance(where, (str, os.PathLike)) else where


def _read_only(size: int, checksum: str) -> None:
    raise PermissionError("a tree opened with open_tree is read-only: it commits nothing")


def open_tree(location: Union[str, os.PathLike[str]],
              storage_options: Optional[Mapping[str, Any]] = None) -> Union[LocalTree, ObjectTree]:
    """The folder at a local path or an fsspec URL, to read (fsspec imported for URLs only)."""
    from . import is_url
    text = os.fspath(location)
    if not is_url(text):
        return LocalTree(Path(text))
    from .remote_fs import filesystem
    url = text.rstrip("/")
    fs, key = filesystem(url, storage_options)
    return ObjectTree(fs, key, url, commit=_read_only)


def checksum(tree: Tree, rel: str) -> str:
    """``crc32:...`` of the file ``rel``: read from the local directory where that is all
    the tree is, else streamed, one chunk in memory at a time."""
    local = tree.capabilities().local_only
    if local is not None:
        return file_checksum(local / rel)
    with tree.open(rel) as f:
        return format_checksum(stream_crc(f)[1])


@dataclass
class LocalTree:
    """A sharded checkpoint directory on a local disk."""

    path: Path

    def capabilities(self) -> TreeCapabilities:
        return TreeCapabilities(directory=self.path)

    def where(self, rel: str = "") -> PurePath:
        return self.path / rel if rel else self.path

    def read_bytes(self, rel: str) -> bytes:
        return read_regular(self.path / rel)  # a FIFO in a file's place must not block

    def open(self, rel: str) -> AbstractContextManager[BinaryIO]:
        return open_regular(self.path / rel)

    def size(self, rel: str) -> Optional[int]:
        path = self.path / rel
        return path.stat().st_size if path.is_file() else None

    def sub(self, name: str) -> LocalTree:
        """The folder ``name`` inside this one."""
        return LocalTree(self.path / name)

    def folders(self) -> List[str]:
        """The names of the folders inside this one ([] when it is not there)."""
        try:
            return [p.name for p in self.path.iterdir() if p.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []


@dataclass
class ObjectTree:
    """A sharded checkpoint as objects under ``key`` of the fsspec filesystem ``fs``;
    ``url`` is ``key``'s URL (messages), ``commit(size, checksum)`` writes its commit record."""

    fs: Any
    key: str
    url: str
    commit: Callable[[int, str], None] = field(repr=False)
    retry: Callable[[Callable[[], Any]], Any] = field(repr=False, default=lambda fn: fn())

    def capabilities(self) -> TreeCapabilities:
        return TreeCapabilities(objects=self)

    def where(self, rel: str = "") -> PurePath:
        from .remote import ObjectPath
        return ObjectPath(f"{self.url}/{rel}" if rel else self.url)

    def file_key(self, rel: str) -> str:
        return f"{self.key}/{rel}"

    def read_bytes(self, rel: str) -> bytes:
        data: bytes = self.retry(lambda: self.fs.cat_file(self.file_key(rel)))
        return data

    @contextmanager
    def open(self, rel: str) -> Iterator[BinaryIO]:
        with self.fs.open(self.file_key(rel), "rb", block_size=8 << 20) as f:
            yield f

    def size(self, rel: str) -> Optional[int]:
        try:
            info: Dict[str, Any] = self.retry(lambda: self.fs.info(self.file_key(rel)))
        except (FileNotFoundError, OSError):
            return None
        return int(info["size"]) if info.get("type", "file") == "file" else None

    def sub(self, name: str) -> ObjectTree:
        """The folder ``name`` inside this one (its commit: this one's)."""
        return ObjectTree(self.fs, self.file_key(name), f"{self.url}/{name}", self.commit, self.retry)

    def folders(self) -> List[str]:
        """The names of the folders inside this one ([] when it is not there)."""
        try:
            listed = self.retry(lambda: self.fs.ls(self.key, detail=True, refresh=True))
        except (FileNotFoundError, OSError):
            return []
        return [str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in listed if e.get("type") == "directory"]


@dataclass
class TieredTree:
    """A node's cached copy (``local``) in front of the uploaded one (``remote``);
    ``later`` queues an upload job on the tiered store's upload thread."""

    local: LocalTree
    remote: ObjectTree
    later: Later = field(repr=False)

    def capabilities(self) -> TreeCapabilities:
        return TreeCapabilities(directory=self.local.path, objects=self.remote, upload=self.later)

    def where(self, rel: str = "") -> PurePath:
        return self.remote.where(rel)

    def _here(self, rel: str) -> Optional[Path]:
        path = self.local.path / rel
        return path if path.is_file() else None

    def read_bytes(self, rel: str) -> bytes:
        return self.local.read_bytes(rel) if self._here(rel) else self.remote.read_bytes(rel)

    def open(self, rel: str) -> AbstractContextManager[BinaryIO]:
        return self.local.open(rel) if self._here(rel) else self.remote.open(rel)

    def size(self, rel: str) -> Optional[int]:
        return self.local.size(rel) if self._here(rel) else self.remote.size(rel)


