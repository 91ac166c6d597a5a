"""A checkpoint folder tree, local or behind an fsspec URL, as the Hugging Face door reads it.

:func:`tree` gives the same few read operations over a local directory and over an
object store (``s3://``, ``memory://``, ...): list the sub-folders, read a small file,
and the size and CRC-32 of a file (streamed, never held whole in memory).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from ..io.checksum import READ_CHUNK, file_checksum, format_checksum, stream_crc
from ..storage import is_url

Location = Union[str, "os.PathLike[str]"]


class LocalTree:
    """A local directory."""

    def __init__(self, root: Location) -> None:
        self.root = Path(root)

    def where(self, rel: str = "") -> str:
        return str(self.root / rel) if rel else str(self.root)

    def sub(self, name: str) -> LocalTree:
        return LocalTree(self.root / name)

    def folders(self) -> List[str]:
        try:
            return [p.name for p in self.root.iterdir() if p.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def read_bytes(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def size(self, rel: str) -> Optional[int]:
        path = self.root / rel
        return path.stat().st_size if path.is_file() else None

    def checksum(self, rel: str) -> str:
        return file_checksum(self.root / rel)


class UrlTree:
    """A folder on an object store, through fsspec."""

    def __init__(self, url: str, storage_options: Optional[Mapping[str, Any]] = None) -> None:
        from ..storage.remote import filesystem  # fsspec is an extra: imported only for URLs

        self.url = url.rstrip("/")
        self.options = storage_options
        self.fs, self.root = filesystem(self.url, storage_options)

    def where(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def sub(self, name: str) -> UrlTree:
        sub = UrlTree.__new__(UrlTree)
        sub.url, sub.options, sub.fs, sub.root = f"{self.url}/{name}", self.options, self.fs, f"{self.root}/{name}"
        return sub

    def _info(self, rel: str) -> Optional[Dict[str, Any]]:
        try:
            info: Dict[str, Any] = self.fs.info(f"{self.root}/{rel}")
        except (FileNotFoundError, OSError):
            return None
        return info

    def folders(self) -> List[str]:
        try:
            listed = self.fs.ls(self.root, detail=True, refresh=True)
        except (FileNotFoundError, OSError):
            return []
        return [str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in listed if e.get("type") == "directory"]

    def exists(self, rel: str) -> bool:
        return self._info(rel) is not None

    def read_bytes(self, rel: str) -> bytes:
        data: bytes = self.fs.cat_file(f"{self.root}/{rel}")
        return data

    def size(self, rel: str) -> Optional[int]:
        info = self._info(rel)
        return int(info["size"]) if info is not None and info.get("type", "file") == "file" else None

    def checksum(self, rel: str) -> str:
        with self.fs.open(f"{self.root}/{rel}", "rb", block_size=READ_CHUNK) as f:
            return format_checksum(stream_crc(f)[1])


Tree = Union[LocalTree, UrlTree]


def tree(location: Location, storage_options: Optional[Mapping[str, Any]] = None) -> Tree:
    """The tree at a local path or URL."""
    text = os.fspath(location)
    return UrlTree(text, storage_options) if is_url(text) else LocalTree(text)
