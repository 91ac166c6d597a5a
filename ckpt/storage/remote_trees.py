"""Sharded checkpoints on an object store: directories of objects, committed last.

Mixin of :class:`ckpt.storage.remote.FsspecStore`. A sharded checkpoint ``name`` is the
objects ``<run>/<name>/<file>`` (written by every rank under their final keys: there
is no rename) and, written last by rank 0 once every file is uploaded, the commit
record ``<name>.ckpt-commit`` with the checkpoint's total size and checksum (the
CRC-32 of its manifest, which holds every file's). A directory without a commit record
is an unfinished save: never listed, removed once stale (see docs/howto/fsdp2.md).
"""

from __future__ import annotations

import time
from contextlib import suppress
from datetime import datetime
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TypeVar

from .trees import ObjectTree

T = TypeVar("T")
COMMIT_SUFFIX = ".ckpt-commit"


class TreeObjects:
    """Directories of objects (sharded checkpoints) in an fsspec run directory."""

    url: str
    fs: Any
    stale_after: float

    def _key(self, name: str) -> str:
        raise NotImplementedError

    def _retry(self, fn: Callable[[], T], name: str = "", action: str = "accessing the store") -> T:
        raise NotImplementedError

    def _write_commit_record(self, name: str, size: int, checksum: Optional[str]) -> None:
        raise NotImplementedError

    def _commit_record(self, name: str) -> Optional[Dict[str, Any]]:
        raise NotImplementedError

    def _committed_record(self, name: str) -> Dict[str, Any]:
        raise NotImplementedError

    def _listing(self) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def tree(self, name: str) -> ObjectTree:
        """The sharded checkpoint ``name`` (committed or being written)."""
        return ObjectTree(self.fs, self._key(name), f"{self.url}/{name}",
                          commit=lambda size, checksum: self._write_commit_record(name, size, checksum),
                          retry=lambda fn: self._retry(fn, name, "reading"))

    def _dirs(self, listed: Sequence[Mapping[str, Any]]) -> List[str]:
        return [str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in listed if e.get("type") == "directory"]

    def list_dirs(self, prefix: str = "") -> Dict[str, int]:
        """Committed sharded checkpoints starting with ``prefix`` and their sizes (as recorded)."""
        listed = self._listing()
        records = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in listed if e.get("type") != "directory"}
        out: Dict[str, int] = {}
        for name in self._dirs(listed):
            if name.startswith(prefix) and name + COMMIT_SUFFIX in records:
                out[name] = 0  # the recorded size is read on demand (one request per checkpoint)
        return out

    def delete_tree(self, name: str) -> None:
        """Uncommit ``name`` (its record first), then remove its objects."""
        with suppress(FileNotFoundError):
            self._retry(lambda: self.fs.rm_file(self._key(name + COMMIT_SUFFIX)))
        with suppress(FileNotFoundError):
            self._retry(lambda: self.fs.rm(self._key(name), recursive=True), name, "deleting")

    def move_tree(self, src: str, dst: str) -> None:
        """Copy ``src``'s objects to ``dst`` (server side), commit the copy, delete ``src``."""
        rec = self._committed_record(src)
        with suppress(FileNotFoundError):
            self._retry(lambda: self.fs.rm_file(self._key(dst + COMMIT_SUFFIX)))
        for key in self._retry(lambda: self.fs.find(self._key(src))):
            rel = str(key).rstrip("/").rsplit("/", 1)[-1]  # DCP's files: flat in the directory
            self._retry(lambda k=key, r=rel: self.fs.copy(k, f"{self._key(dst)}/{r}"))  # type: ignore[misc]
        self._write_commit_record(dst, int(rec.get("size") or 0), rec.get("checksum"))
        self.delete_tree(src)

    def clean_trees(self, listed: Sequence[Mapping[str, Any]], entries: Mapping[str, Any]) -> List[str]:
        """Remove directories without a commit record whose newest object is older than
        ``stale_after`` (younger ones may be a live save); their names."""
        now, removed = time.time(), []
        for name in self._dirs(listed):
            if name + COMMIT_SUFFIX in entries:
                continue
            with suppress(Exception):
                found = self._retry(lambda n=name: self.fs.find(self._key(n), detail=True))  # type: ignore[misc]
                if now - max((mtime(e, 0.0) for e in found.values()), default=0.0) >= self.stale_after:
                    self.delete_tree(name)
                    removed.append(name)
        return removed


def mtime(entry: Mapping[str, Any], default: float) -> float:
    """When an object was last written, from whichever field the backend lists."""
    for key in ("LastModified", "mtime", "last_modified", "created", "updated"):
        value = entry.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return default
