"""A run directory on an object store (S3, GCS, Azure, ``memory://``, ...) through fsspec.

Object stores have no rename, no fsync and no lock, so commit means *commit-last*:

1. The old commit record of ``name`` (if any) is deleted: while the new bytes upload,
   the name is simply not there (the catalog keeps replacing safe with ``keep_aside``).
2. The bytes stream to the final key through fsspec's buffered writer (multipart in
   blocks for large objects: one block in memory, never a second full copy); CRC-32
   and size are computed on the way. A failed upload is discarded (the multipart
   upload aborted) and re-raised.
3. The uploaded object is checked: its size (``info``) must equal the bytes sent.
   The content is not downloaded again: transport integrity is the protocol's job
   (botocore sends and the server checks a per-request checksum; TCP/TLS below), a
   download would double the cost of every save, and every load verifies the CRC
   recorded here before it unpickles anything.
4. Only then is ``<name>.ckpt-commit`` (JSON: size, checksum) written: a single small
   PUT, atomic on every object store. :meth:`list` shows only names that have one, so
   an object without it (a killed upload, a crash before step 4) is never listed or
   resumed; :meth:`clean_temporaries` removes such objects once they are old enough
   not to be a live upload.

One writer per run directory: the first commit takes the run's writer lease
(:mod:`ckpt.storage.lease`, created with ``If-None-Match`` on S3), so a second writer is
refused with :class:`~ckpt.errors.WriterConflictError` naming the holder, while a job
killed and restarted is not locked out. Holding the lease, the writer knows what the run
holds without listing it at every commit, and on S3 trusts the PUT's own checksum
instead of a size check (requests per save: docs/explanation/remote-runs.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
import time
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, TypeVar
from zlib import crc32

from .. import schema
from ..errors import ConfigError, StorageError
from ..io.checksum import ChecksumWriter, format_checksum
from ..progress import Progress
from . import lease as _lease
from . import retry
from .base import OnBytes, Produce, Written, bookkeeping
from .claim import WriterClaim
from .conditional import Objects, Precondition
from .lease import WRITER_NAME, Lease
from .local import TMP_PREFIX
from .remote_fs import ObjectPath as ObjectPath
from .remote_fs import abandon as _abandon
from .remote_fs import filesystem as filesystem
from .remote_fs import from_client as _from_client
from .remote_fs import never_wait_for_continue, request_limit
from .remote_small import SmallObjects
from .remote_trees import COMMIT_SUFFIX, TreeObjects, mtime

T = TypeVar("T")

#: ckpt's own key in ``storage_options`` (removed before fsspec sees them): how long one
#: operation may keep retrying transient errors, in seconds.
RETRY_OPTION = "ckpt_retry_seconds"
#: An uncommitted object younger than this may be a live upload: cleaning leaves it.
STALE_AFTER = 3600.0
_CHUNK = 8 << 20


class FsspecStore(WriterClaim, TreeObjects, SmallObjects):
    """A run directory under ``url`` on any fsspec filesystem (see the module docstring)."""

    def __init__(self, url: str, storage_options: Optional[Mapping[str, Any]] = None, *,
                 stale_after: float = STALE_AFTER, writer: bool = True) -> None:
        self.url = url.rstrip("/")
        options = dict(storage_options or {})
        deadline = options.pop(RETRY_OPTION, retry.DEFAULT_DEADLINE)
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or deadline < 0:
            raise ConfigError(f"storage_options[{RETRY_OPTION!r}] must be a number of seconds, got {deadline!r}",
                              hint=f"pass {RETRY_OPTION}=60 (the default) or 0 to never retry")
        held = _lease.options(options)
        per_request = request_limit(options)
        self.fs, self.root = filesystem(self.url, options)
        self.deadline = float(deadline)
        self.stale_after = stale_after
        #: False for a tool (``ckpt prune``): it never takes a run over from a writer
        #: (see :meth:`~ckpt.storage.base.Store.lock`).
        self.writer = writer
        self.objects = Objects(self.fs)
        self.lease = Lease(self.objects, self._key(WRITER_NAME), self.url, ttl=held["ttl"],
                           writer_id=held["writer_id"], tool=not writer,
                           on_acquire=lambda: self.abort_uploads(before=time.time()),
                           guard=lambda fn: self._retry(fn, WRITER_NAME, "taking or renewing the writer lease"))
        self._known: Optional[Dict[str, int]] = None
        self._generation = 0
        self._bare: Set[str] = set()
        never_wait_for_continue(self.fs, per_request)  # first: opening the run is bounded too
        self._check_reachable()

    # -- helpers ---------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _retry(self, fn: Callable[[], T], name: str = "", action: str = "accessing the store") -> T:
        """``fn()`` retried on transient errors; what still fails is a :class:`StorageError`
        naming the URL (a missing object stays a :class:`FileNotFoundError`)."""
        try:
            return retry.call(fn, deadline=self.deadline)
        except (FileNotFoundError, FileExistsError, StorageError):
            raise
        except Exception as e:  # botocore/aiohttp errors are not all OSErrors
            if isinstance(e, OSError) or retry.transient(e) or _from_client(e):
                raise self._error(e, name, action) from e
            raise  # the producer's own error (torch, pickling): not the store's

    def _check_reachable(self) -> None:
        """Fail now, naming the URL, on wrong credentials, a missing bucket or no server."""
        try:
            retry.call(lambda: self.fs.ls(self.root, detail=False, refresh=True), deadline=self.deadline)
            return
        except FileNotFoundError:
            pass  # no object under the prefix yet: the bucket must exist
        except PermissionError as e:
            raise StorageError(f"access denied ({e})", path=self.url,
                               hint="check the credentials in storage_options (key/secret, profile) "
                                    "and the bucket policy") from e
        except Exception as e:
            raise StorageError(f"cannot reach the store ({type(e).__name__}: {e})", path=self.url,
                               hint="check the endpoint (storage_options client_kwargs endpoint_url), "
                                    "the network and the credentials") from e
        if getattr(self.fs, "root_marker", "") != "":  # a filesystem with directories, not buckets
            self._retry(lambda: self.fs.makedirs(self.root, exist_ok=True))
            return
        bucket = self.root.strip("/").split("/")[0]
        try:
            # listing an existing bucket never fails with "not found": the root is the bucket, or it is missing
            if bucket == self.root.strip("/") or not retry.call(lambda: self.fs.exists(bucket), deadline=self.deadline):
                raise FileNotFoundError(bucket)
        except PermissionError as e:
            raise StorageError(f"access denied ({e})", path=self.url,
                               hint="check the credentials in storage_options and the bucket policy") from e
        except (FileNotFoundError, OSError) as e:
            raise StorageError(f"the bucket {bucket!r} does not exist or cannot be read ({e})", path=self.url,
                               hint="create the bucket first (ckpt creates prefixes, never buckets)") from e

    def _error(self, e: BaseException, name: str, action: str) -> StorageError:
        transient = retry.transient(e)
        kind = "the store is unreachable or failing" if transient else "the store refused it"
        tried = f"retried for up to {self.deadline:.0f} s; " if transient else ""
        return StorageError(f"{action} failed: {kind} ({type(e).__name__}: {e})", path=self.where(name),
                            hint=f"{tried}earlier checkpoints are intact; check the endpoint, the network, "
                                 "the credentials and the permissions, then save again")

    def _commit_record(self, name: str) -> Optional[Dict[str, Any]]:
        try:
            raw = self._retry(lambda: self.fs.cat_file(self._key(name + COMMIT_SUFFIX)))
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def _committed_record(self, name: str) -> Dict[str, Any]:
        """``name``'s commit record; FileNotFoundError without one (an uncommitted object
        is not there: moving it must never commit it under another name)."""
        rec = self._commit_record(name)
        if rec is None:
            raise FileNotFoundError(f"{self._key(name)}: no commit record")
        return rec

    def recorded_checksum(self, name: str) -> Optional[str]:
        """The checksum in ``name``'s commit record (None if it has none)."""
        value = (self._commit_record(name) or {}).get("checksum")
        return value if isinstance(value, str) else None

    def _write_commit_record(self, name: str, size: int, checksum: Optional[str], *, fresh: bool = False) -> None:
        """``fresh``: the record was deleted (or never was): created only if still absent, so
        that a name committed by someone else meanwhile is a conflict, not overwritten."""
        data = json.dumps({"size": size, "checksum": checksum}).encode()
        key = self._key(name + COMMIT_SUFFIX)
        if fresh and self.objects.s3:
            try:
                self._retry(lambda: self.objects.create(key, data), name, "committing")
            except Precondition:
                raise self.lease.conflict(None, f"{name} was committed by someone else while this process "
                                                "uploaded it") from None
        else:
            self._retry(lambda: self.fs.pipe_file(key, data), name, "committing")
        self._noted(name, True)

    def _size(self, name: str) -> int:
        info = self._retry(lambda: self.fs.info(self._key(name), refresh=True))
        return int(info["size"])

    # -- the Store protocol ----------------------------------------------------------

    def where(self, name: str) -> ObjectPath:
        return ObjectPath(f"{self.url}/{name}")

    def write(self, name: str, produce: Produce, *, on_write: OnBytes = None) -> Written:
        if bookkeeping(name):
            return self.put_whole(name, produce)
        if self._known is None or name in self._known or not self.lease.held:  # a stale record may exist
            try:
                self._retry(lambda: self.fs.rm_file(self._key(name + COMMIT_SUFFIX)))
            except FileNotFoundError:
                pass
        try:
            written = self._retry(lambda: self._upload(name, produce, on_write), name, "uploading")
        except BaseException:
            with suppress(Exception):  # best effort: uncommitted, it is never listed anyway
                self.fs.rm_file(self._key(name))
            raise
        if not (self.objects.s3 and self.lease.held):  # S3 checks the PUT's checksum itself
            size = self._size(name)
            if size != written.size:
                raise StorageError(f"uploaded {written.size} bytes but the store holds {size}: another process "
                                   f"wrote {name} at the same time, or the upload was cut short",
                                   path=self.where(name), hint="nothing was committed; save again (one writer "
                                                               "per run directory)")
        if self.lost():
            raise self.lease.taken()
        self._write_commit_record(name, written.size, written.checksum, fresh=True)
        return written

    def _upload(self, name: str, produce: Produce, on_write: OnBytes) -> Written:
        f = self.fs.open(self._key(name), "wb")
        writer = ChecksumWriter(f, on_write)
        try:
            try:
                produce(writer)  # type: ignore[arg-type]  # a file-like, as torch.save expects
            except BaseException as e:
                if writer.error is not None and e is not writer.error:
                    raise writer.error from e  # the network's error, not torch's "unexpected pos"
                raise
            f.close()  # completes the (multipart) upload
        except BaseException:
            _abandon(f)
            raise
        return Written(name, writer.size, format_checksum(writer.crc))

    def read_bytes(self, name: str) -> bytes:
        if bookkeeping(name):
            return self.read_whole(name)
        rec = self._commit_record(name)
        if rec is None:
            raise FileNotFoundError(2, "no committed object", str(self.where(name)))
        data: bytes = self._retry(lambda: self.fs.cat_file(self._key(name)))
        if len(data) != rec.get("size") or format_checksum(crc32(data)) != rec.get("checksum"):
            raise OSError(5, "does not match its commit record (being replaced, or damaged)", str(self.where(name)))
        return data

    def local_path(self, name: str) -> AbstractContextManager[Path]:
        return self._download(name)

    @contextmanager
    def _download(self, name: str) -> Iterator[Path]:
        """A temporary local copy of ``name`` (deleted when the context closes)."""
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + name)
        try:
            with os.fdopen(fd, "wb") as out:
                self._retry(lambda: self._fetch(name, out))
            yield Path(tmp)
        finally:
            with suppress(OSError):
                os.unlink(tmp)

    def _fetch(self, name: str, out: Any) -> None:
        out.seek(0)
        out.truncate()
        key = self._key(name)
        size = int(self.fs.info(key, refresh=True)["size"])
        with Progress(f"downloading {name}", size, None) as bar, self.fs.open(key, "rb", block_size=_CHUNK) as f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))
        out.flush()

    def _listing(self) -> List[Dict[str, Any]]:
        """Every entry under the run (objects, and the directories of sharded checkpoints)."""
        with suppress(FileNotFoundError):
            return list(self._retry(lambda: self.fs.ls(self.root, detail=True, refresh=True), "", "listing"))
        return []

    def _entries(self, listed: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for e in self._listing() if listed is None else listed:
            if e.get("type", "file") == "file":
                out[str(e["name"]).rstrip("/").rsplit("/", 1)[-1]] = e
        return out

    def list(self, prefix: str = "") -> Dict[str, int]:
        held, epoch = self.lease.held, self.lease.epoch
        entries = self._entries()
        recorded = {n[:-len(COMMIT_SUFFIX)] for n in entries if n.endswith(COMMIT_SUFFIX)}
        recorded |= {n for n in entries if bookkeeping(n)}  # written whole: no record
        self._listed(recorded, held, epoch)  # what the lease holder knows: names with a record
        return {n: int(e.get("size") or 0) for n, e in entries.items()
                if n.startswith(prefix) and not n.startswith(TMP_PREFIX) and not n.endswith(COMMIT_SUFFIX)
                and n != WRITER_NAME and n in recorded}

    def delete(self, name: str) -> None:
        if schema.is_sharded(name):
            self.delete_tree(name)
            self._noted(name, False)
            return
        self.delete_both(name)
        self._noted(name, False)

    def move(self, src: str, dst: str) -> None:
        """Copy (server side), commit the copy, delete the original: a crash in between
        leaves both names, never neither."""
        if schema.is_sharded(src):
            self.move_tree(src, dst)
            return
        self.move_copy(src, dst)
        self.delete(src)

    def keep_aside(self, name: str) -> Optional[str]:
        aside = f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-prev-{name}"
        try:
            self.move_copy(name, aside)
        except OSError:
            return None
        return aside

    def move_copy(self, src: str, dst: str) -> None:
        """A committed server-side copy of ``src`` as ``dst`` (its checksum carried over
        when the copy has the recorded size)."""
        rec = self._committed_record(src)
        with suppress(FileNotFoundError):
            self._retry(lambda: self.fs.rm_file(self._key(dst + COMMIT_SUFFIX)))
        self._retry(lambda: self.fs.copy(self._key(src), self._key(dst)))
        size = self._size(dst)
        self._write_commit_record(dst, size, rec.get("checksum") if rec.get("size") == size else None)

    def clean_temporaries(self) -> List[str]:
        """Remove uncommitted objects older than ``stale_after`` (younger ones may be a
        live upload) and commit records whose object is gone."""
        listed = self._listing()
        entries = self._entries(listed)
        dirs, now = set(self._dirs(listed)), time.time()
        removed: List[str] = self.clean_trees(listed, entries)  # unfinished sharded saves
        for name, e in entries.items():
            if name == WRITER_NAME or bookkeeping(name):  # written whole: no record, never stale
                continue
            if name.endswith(COMMIT_SUFFIX):
                orphan = name[:-len(COMMIT_SUFFIX)] not in entries and name[:-len(COMMIT_SUFFIX)] not in dirs
            else:
                orphan = name + COMMIT_SUFFIX not in entries or name.startswith(TMP_PREFIX)
            if orphan and now - mtime(e, now) >= self.stale_after:
                with contextlib.suppress(OSError):
                    self.delete(name[:-len(COMMIT_SUFFIX)] if name.endswith(COMMIT_SUFFIX) else name)
                    removed.append(name)
        return removed

    def abort_uploads(self, before: float) -> int:
        """Abort the unfinished multipart uploads under this run started before ``before``
        (seconds since the epoch): a killed writer's, which S3 keeps (and bills) forever.
        Called by a writer when it claims the run; S3 only, best effort. Returns how many."""
        call = getattr(self.fs, "call_s3", None)
        if call is None:
            return 0
        bucket, _, prefix = self.root.strip("/").partition("/")
        aborted = 0
        with suppress(Exception):
            listed = call("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/" if prefix else "")
            for up in listed.get("Uploads", []) or []:
                started = up.get("Initiated")
                if isinstance(started, datetime) and started.timestamp() >= before:
                    continue
                with suppress(Exception):
                    call("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                    aborted += 1
        return aborted

    def __repr__(self) -> str:
        return f"FsspecStore({self.url!r})"
