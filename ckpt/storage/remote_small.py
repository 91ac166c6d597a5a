"""The run's bookkeeping objects on an object store: each written whole in one request.

Mixin of :class:`ckpt.storage.remote.FsspecStore`. The index, its journal and the
metric history (:func:`ckpt.storage.base.bookkeeping`) are small objects that describe,
but never are, checkpoints: a single PUT replaces one atomically on every object store
(a reader gets the old bytes or the new ones, never a part), and whoever reads one
checks it (the index is strict JSON whose entries must match their names, else it is
rebuilt from the checkpoint files; a history line that does not parse is skipped). So
they need no commit record: one PUT each (was: DELETE of the old record, PUT, PUT of the
record). A record left by an earlier ckpt is deleted at the first write. Deleting a
checkpoint removes its record and its object in one request on S3 (``DeleteObjects``):
a record left alone lists nothing (its object is gone), an object left alone is
uncommitted; either is cleaned later. Requests per save: docs/explanation/remote-runs.md.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any, Callable, Dict, List, Optional, Set, TypeVar

from .base import OnBytes, Produce, Written
from .remote_trees import COMMIT_SUFFIX

T = TypeVar("T")


class SmallObjects:
    """Bookkeeping objects written whole, and deletions in one request."""

    fs: Any
    root: str
    _known: Optional[Dict[str, int]]
    #: Bookkeeping names known to have no commit record (this process deleted it, or wrote it whole).
    _bare: Set[str]

    def _key(self, name: str) -> str:
        raise NotImplementedError

    def _retry(self, fn: Callable[[], T], name: str = "", action: str = "accessing the store") -> T:
        raise NotImplementedError

    def _noted(self, name: str, present: bool) -> None:
        raise NotImplementedError

    def _upload(self, name: str, produce: Produce, on_write: OnBytes) -> Written:
        raise NotImplementedError

    def put_whole(self, name: str, produce: Produce) -> Written:
        """Write ``name`` in one request (see the module docstring): the store's one upload
        path, which sends a small object as a single PUT."""
        if name not in self._bare:  # a record an earlier ckpt wrote may exist: once
            with suppress(FileNotFoundError):
                self._retry(lambda: self.fs.rm_file(self._key(name + COMMIT_SUFFIX)))
            self._bare.add(name)
        written = self._retry(lambda: self._upload(name, produce, None), name, "writing")
        self._noted(name, True)
        return written

    def read_whole(self, name: str) -> bytes:
        """The bytes of a bookkeeping object; :class:`FileNotFoundError` when absent."""
        data: bytes = self._retry(lambda: self.fs.cat_file(self._key(name)))
        return data

    def delete_both(self, name: str) -> None:
        """Remove ``name``'s commit record and object: one request on S3, else two (record first)."""
        keys = [self._key(name + COMMIT_SUFFIX), self._key(name)]
        call = getattr(self.fs, "call_s3", None)
        if call is not None:
            bucket, _, _ = self.root.strip("/").partition("/")
            objects = [{"Key": k.strip("/").partition("/")[2]} for k in keys]
            self._retry(lambda: _batch(call, bucket, objects), name, "deleting")
            for key in keys:
                self.fs.invalidate_cache(key)
            return
        for key in keys:  # uncommit first
            with suppress(FileNotFoundError):
                self._retry(lambda key=key: self.fs.rm_file(key))  # type: ignore[misc]


def _batch(call: Any, bucket: str, objects: List[Dict[str, str]]) -> None:
    out = call("delete_objects", Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
    errors = out.get("Errors") or [] if isinstance(out, dict) else []
    if errors:
        raise OSError(5, f"the store did not delete {[e.get('Key') for e in errors]}: {errors[0].get('Message')}")
