"""Conditional writes of one small object: create it only if absent, replace or delete it
only if it is still the version read (the writer lease of docs/explanation/remote-runs.md).

On S3 (and S3-compatible servers that honour ``If-None-Match`` / ``If-Match``: AWS since
2024, MinIO, moto) each operation is one request and atomic: of two processes creating
the same object, exactly one succeeds; a replace fails with :class:`Precondition` if
anyone wrote the object since it was read. On ``memory://`` (a filesystem inside this
process) each operation runs under one process-wide lock: read, compare and write are
one step, as atomic as on S3 for every thread of the process (the only ones that share
it). Elsewhere (a backend without conditional requests) creation uses fsspec's
``mode="create"`` and a replace compares the content first: not atomic, so there the
lease's timing is the only guard.

A version (``Version.tag``) is the object's ETag on S3, a hash of its bytes elsewhere;
``Version.age`` is how long ago it was written, by the server's clock on S3 (its
``Date`` header minus ``LastModified``: no clock skew between machines), by the
holder's own ``renewed`` field elsewhere (the caller's job).
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Optional

#: Makes a read-compare-write on an in-process filesystem (``memory://``) one step.
_IN_PROCESS = threading.Lock()


class Precondition(Exception):
    """The object is not (or no longer) in the state the operation required."""


@dataclass(frozen=True)
class Version:
    """One version of an object: its bytes, its tag, and its age in seconds (None: unknown)."""

    data: bytes
    tag: str
    age: Optional[float]


def _tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _precondition(e: BaseException) -> bool:
    """A 412 (or 409 ConditionalRequestConflict), however s3fs translated it."""
    cur: Optional[BaseException] = e
    for _ in range(6):
        if cur is None:
            return False
        if isinstance(cur, FileExistsError):
            return True
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
        cur = cur.__cause__ or cur.__context__
    return False


class Objects:
    """Conditional operations on the objects of one fsspec filesystem."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs
        self.s3 = callable(getattr(fs, "call_s3", None))
        protocol = getattr(fs, "protocol", ())
        #: Every user of this filesystem is in this process: a lock makes each operation atomic.
        self.in_process = "memory" in ((protocol,) if isinstance(protocol, str) else tuple(protocol))

    def _atomic(self) -> AbstractContextManager[object]:
        return _IN_PROCESS if self.in_process else nullcontext()

    def _split(self, key: str) -> tuple[str, str]:
        bucket, _, path = key.strip("/").partition("/")
        return bucket, path

    def read(self, key: str) -> Optional[Version]:
        """The current version of ``key`` (None: absent)."""
        if not self.s3:
            try:
                data = bytes(self.fs.cat_file(key))
            except FileNotFoundError:
                return None
            return Version(data, _tag(data), None)
        bucket, path = self._split(key)
        try:
            resp = self.fs.call_s3("get_object", Bucket=bucket, Key=path)
        except FileNotFoundError:
            return None
        body = resp["Body"]
        data = _read_body(self.fs, body)
        return Version(data, str(resp.get("ETag", "")), _server_age(resp))

    def create(self, key: str, data: bytes) -> str:
        """Write ``key`` only if absent; its tag. :class:`Precondition` if it exists."""
        try:
            if self.s3:
                bucket, path = self._split(key)
                resp = self.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=data, IfNoneMatch="*")
                return str(resp.get("ETag", ""))
            with self._atomic():
                if self.in_process and self.fs.exists(key):
                    raise FileExistsError(key)
                self.fs.pipe_file(key, data, mode="create")
            return _tag(data)
        except Exception as e:
            if _precondition(e):
                raise Precondition(key) from e
            raise

    def replace(self, key: str, data: bytes, tag: str) -> str:
        """Write ``key`` only if its version is still ``tag``; the new tag.
        :class:`Precondition` if it changed or is gone."""
        try:
            if self.s3:
                bucket, path = self._split(key)
                resp = self.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=data, IfMatch=tag)
                return str(resp.get("ETag", ""))
        except FileNotFoundError as e:
            raise Precondition(key) from e
        except Exception as e:
            if _precondition(e):
                raise Precondition(key) from e
            raise
        with self._atomic():  # elsewhere not atomic (see the module docstring)
            now = self.read(key)
            if now is None or now.tag != tag:
                raise Precondition(key)
            self.fs.pipe_file(key, data)
        return _tag(data)

    def delete(self, key: str, tag: str) -> None:
        """Delete ``key`` only if its version is still ``tag`` (already gone: done)."""
        try:
            if self.s3:
                bucket, path = self._split(key)
                self.fs.call_s3("delete_object", Bucket=bucket, Key=path, IfMatch=tag)
                self.fs.invalidate_cache(key)
                return
        except FileNotFoundError:
            return
        except Exception as e:
            if _precondition(e):
                raise Precondition(key) from e
            raise
        with self._atomic():
            now = self.read(key)
            if now is None:
                return
            if now.tag != tag:
                raise Precondition(key)
            self.fs.rm_file(key)


def _read_body(fs: Any, body: Any) -> bytes:
    """The bytes of a ``get_object`` body (aiobotocore streams are read on s3fs's loop)."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        try:
            return bytes(await body.read())
        finally:
            body.close()

    data: bytes = sync(fs.loop, read)
    return data


def _server_age(resp: Any) -> Optional[float]:
    """Seconds since the object was written, by the server's clock alone."""
    written = resp.get("LastModified")
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not isinstance(written, datetime) or not isinstance(date, str):
        return None
    try:
        now = parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
    return max(0.0, (now - written).total_seconds())
