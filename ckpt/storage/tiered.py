"""A local directory in front of a remote store (``CheckpointManager(url, cache_dir=...)``).

Each write commits to the local tier first (the fast, durable copy that a restarted
process resumes from) and is then uploaded by a background thread (the copy that
survives losing the machine), with the remote store's own commit-last protocol.
Uploads keep the catalog's order on the remote side: checkpoint objects first, then
the index, then deletions (retention) - so the remote tier is always a consistent,
if possibly older, run directory.

Reads see the union of both tiers: the local copy when there is one, else the remote
one (downloaded), so resume takes the newest checkpoint of either tier, after the
cache was wiped or a remote object was deleted. Deletion and moves apply to both.

A save never waits on the remote tier: the remote run is listed once (when the run is
opened) and that listing is then kept up to date by the upload thread, the only writer
of the remote side; a file missing locally and absent from it is missing, with no
request. So an unreachable or hung endpoint costs a save nothing: it commits locally
and returns. An upload that fails (after the remote store's retries) warns at once and
is raised by :meth:`flush` (the manager's ``wait()``/``close()``), once, like an async
save error; the names it did not upload stay pending and go up with the next upload.
Checkpoints committed locally by a process killed before their upload are found when
the run is opened (local, not remote) and uploaded with this store's first commit
(sharded ones, spread over the nodes' caches, by the open: ckpt.distributed.nodecache).
A writer's first commit takes the remote run's writer lease before it commits locally,
so a second writer is refused before it commits anything, as on a plain remote run; a
lost lease (another writer took the run over) is raised by the next commit
(:meth:`lock`) too: saving on would race that writer.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

from .. import schema
from ..errors import StorageError, WriterConflictError, wrapped
from ..io.checksum import file_checksum
from ..progress import Progress
from .base import INDEX_NAME, Capabilities, OnBytes, Produce, Written, capabilities, probed
from .local import TMP_PREFIX, LocalStore
from .remote import FsspecStore, ObjectPath
from .trees import TieredTree


class TieredStore:
    """A :class:`~ckpt.storage.local.LocalStore` cache committed first, mirrored to an
    :class:`~ckpt.storage.remote.FsspecStore`."""

    def __init__(self, local: LocalStore, remote: FsspecStore) -> None:
        self.local = local
        self.remote = remote
        self.url = remote.url
        self._cond = threading.Condition()
        self._uploads: Dict[str, int] = {}  # names to upload, in order, with a write count
        self._writes = 0
        self._deletes: Dict[str, None] = {}
        self._worker: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._uploaded = 0  # the size of the upload thread's last upload
        #: The remote listing failed: list the local tier only (no timeout per save) until an upload succeeds.
        self._remote_down = False
        #: The remote tier's committed names and sizes, listed once, then kept by the upload thread.
        self._remote: Optional[Dict[str, int]] = None
        self._backlog: List[str] = []  # local checkpoints missing remotely when the run was opened
        #: Uploads of sharded checkpoints: name -> (the job, run as the run's writer or not).
        self._jobs: Dict[str, Tuple[Callable[[FsspecStore], int], bool]] = {}
        self._remote_dirs: Optional[Dict[str, int]] = None  # the remote tier's sharded checkpoints, listed once

    def capabilities(self) -> Capabilities:
        """Its own methods' (uploads to flush, the remote claim to release, directories
        listed on both tiers) and the local copies of its cache; not the cache's directory
        as the run's root: the run lives remotely."""
        return dataclasses.replace(probed(self), local_copies=capabilities(self.local).local_copies)

    def where(self, name: str) -> ObjectPath:
        return self.remote.where(name)

    # -- writing ---------------------------------------------------------------------

    def write(self, name: str, produce: Produce, *, on_write: OnBytes = None) -> Written:
        written = self.local.write(name, produce, on_write=on_write)
        with self._cond:
            for left in self._backlog:  # a killed writer's local commits that never went up, first
                if left not in self._uploads and left != name:
                    self._writes += 1
                    self._uploads[left] = self._writes
            self._backlog = []
            self._deletes.pop(name, None)
            self._uploads.pop(name, None)
            self._writes += 1
            self._uploads[name] = self._writes
            self._start()
        return written

    def tree(self, name: str) -> TieredTree:
        """A sharded checkpoint: this node's cached files in front of the uploaded ones."""
        return TieredTree(self.local.tree(name), self.remote.tree(name), self._later)

    def _later(self, name: str, job: Callable[[FsspecStore], int], as_writer: bool) -> None:
        """Queue ``job`` (a sharded checkpoint's upload, see ckpt.distributed.targets) in
        commit order; ``as_writer``: under the run's writer check (rank 0 only)."""
        with self._cond:
            self._jobs[name] = (job, as_writer)
            self._deletes.pop(name, None)
            self._uploads.pop(name, None)
            self._writes += 1
            self._uploads[name] = self._writes
            self._start()

    def list_dirs(self, prefix: str = "") -> Dict[str, int]:
        """Sharded checkpoints of either tier (the remote ones listed once, then kept)."""
        with self._cond:
            remote, down, deleting = self._remote_dirs, self._remote_down, set(self._deletes)
        if remote is None and not down:
            try:
                remote = self.remote.list_dirs()
            except StorageError:
                remote = {}
            with self._cond:
                self._remote_dirs = dict(remote)
        out = {n: s for n, s in (remote or {}).items() if n.startswith(prefix) and n not in deleting}
        out.update(self.local.list_dirs(prefix))
        return out

    def delete(self, name: str) -> None:
        self.local.delete(name)
        with self._cond:
            self._uploads.pop(name, None)
            self._deletes[name] = None
            self._start()

    def move(self, src: str, dst: str) -> None:
        """Move both copies; but when they differ (a local copy damaged after its upload)
        only the local one, the one reads were served from: the remote copy is then read
        next, and verified on its own."""
        self.flush(raise_error=False)  # the remote side must hold what the local one does
        if src.startswith(TMP_PREFIX):  # a copy kept aside (keep_aside) is in the cache only
            self.local.move(src, dst)
            with self._cond:  # its bytes go up again under dst
                self._deletes.pop(dst, None)
                self._uploads.pop(dst, None)
                self._writes += 1
                self._uploads[dst] = self._writes
                self._start()
            return
        if schema.is_sharded(src):  # a directory: both tiers' copies go
            if os.path.isdir(self.local.where(src)):
                self.local.move(src, dst)
            if src in self.remote.list_dirs(src):
                self.remote.move(src, dst)
            return
        local = src in self.local.list(src)
        remote = src in self.remote.list(src)
        if local:
            self.local.move(src, dst)
            if remote and self.remote.recorded_checksum(src) != file_checksum(self.local.where(dst)):
                return
        if remote:
            self.remote.move(src, dst)

    def keep_aside(self, name: str) -> Optional[str]:
        return self.local.keep_aside(name) if name in self.local.list(name) else None

    # -- reading ---------------------------------------------------------------------

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.local.read_bytes(name)
        except FileNotFoundError:
            if not self._remote_has(name):
                raise
            return self.remote.read_bytes(name)

    def _remote_has(self, name: str) -> bool:
        """Might the remote tier hold ``name``? Answered from the kept listing: no request."""
        with self._cond:
            return not self._remote_down and (self._remote is None or name in self._remote)

    def local_path(self, name: str) -> AbstractContextManager[Path]:
        """The local copy, unless it differs from the uploaded one (damaged after the
        upload: then the remote copy, so that resume still gets the newest checkpoint).
        Costs a read of the local file and one small request; loads are rare."""
        path = self.local.where(name)
        if not path.is_file():
            return self.remote.local_path(name)
        try:
            uploaded = self.remote.recorded_checksum(name) if self._remote_has(name) else None
        except OSError:
            uploaded = None  # the remote tier is unreachable: the local copy is all there is
        if uploaded is not None and uploaded != file_checksum(path):
            warnings.warn(f"{path}: the local copy differs from the uploaded one ({uploaded}); "
                          f"reading {self.remote.where(name)}", stacklevel=3)
            return self.remote.local_path(name)
        return self.local.local_path(name)

    def list(self, prefix: str = "") -> Dict[str, int]:
        with self._cond:
            deleting = set(self._deletes)
        with self._cond:
            remote, down = self._remote, self._remote_down
        if remote is None and not down:
            try:
                remote = self.remote.list()
            except StorageError as e:  # saves go on locally; the upload reports the outage
                warnings.warn(f"{e}; listing the local tier only until an upload succeeds", stacklevel=2)
                with self._cond:
                    self._remote_down = True
            else:
                with self._cond:
                    self._remote = remote = dict(remote)
                    # committed here, not there: the process was killed before its upload; this
                    # store's first commit (a writer's, never a reader's) uploads them
                    self._backlog = [n for n in self.local.list() if schema.parse_name(n) and n not in remote
                                     and self.local.where(n).is_file()]
        remote = {} if remote is None or down else remote
        out = {n: s for n, s in remote.items() if n not in deleting and n.startswith(prefix)}
        out.update(self.local.list(prefix))
        return out

    # -- writers ---------------------------------------------------------------------

    def lock(self, timeout: float = -1, *, commit: bool) -> AbstractContextManager[object]:
        return self._locked(timeout, commit)

    @contextmanager
    def _locked(self, timeout: float, commit: bool) -> Iterator[object]:
        with self._cond:
            conflict = self._error if getattr(self._error, "writer_conflict", False) else None
        if conflict is not None:
            self._raise_pending()
        with self.local.lock(timeout, commit=commit):  # the remote writer check runs with each upload too
            if commit:  # a writer's commit (never the repair when opening the run)
                self._claim()
            yield self

    def _claim(self) -> None:
        """Before a writer's first local commit: hold the remote run's lease, as a plain
        remote run does, so a second writer is refused before it commits anything (a
        dead holder's lease is waited for, with a warning). Once held, nothing to do
        (renewed by its heartbeat). An unreachable store does not stop the save: it
        commits locally and the upload takes the lease (docs/explanation/remote-runs.md)."""
        with self._cond:
            down = self._remote_down
        if down or self.remote.lease.held or self.remote.lease.lost is not None:
            return  # lost: raised by the upload (kept above) or by the next upload
        try:
            self.remote.lease.acquire(wait=True)
        except WriterConflictError:
            raise  # another writer holds the run: nothing committed, locally or remotely
        except StorageError as e:
            warnings.warn(f"{e}; this save commits in the local tier only, its upload takes the writer lease",
                          stacklevel=4)

    def clean_temporaries(self) -> List[str]:
        return self.local.clean_temporaries() + self.remote.clean_temporaries()

    def clean_cache(self) -> List[str]:
        """What crashed writers left in this cache only (a node's other than rank 0's)."""
        return self.local.clean_temporaries()

    def unsent_dirs(self) -> List[str]:
        """Sharded checkpoints committed in this cache and not on the remote tier (a killed
        job's whose upload did not finish), oldest first; none while it is unreachable."""
        self.list_dirs()  # the remote tier listed, once
        with self._cond:
            remote, down = self._remote_dirs or {}, self._remote_down
        return [] if down else sorted(n for n in self.local.list_dirs() if schema.is_sharded(n) and n not in remote)

    # -- the upload thread -----------------------------------------------------------

    def flush(self, raise_error: bool = True) -> None:
        """Wait until every pending upload and deletion reached the remote store; raise
        the error of a failed upload (once)."""
        with self._cond:
            if self._uploads or self._deletes:
                self._start()  # what a failed upload left pending goes up now
            while self._worker is not None:
                self._cond.wait()
        self.local.flush()  # large local files freed in the background
        if raise_error:
            self._raise_pending()

    def close(self) -> None:
        self.flush()

    def release(self) -> None:
        """Free the remote run directory (after :meth:`flush`: nothing left to upload)."""
        with self._cond:
            busy = self._worker is not None or bool(self._uploads or self._deletes)
        if not busy:
            self.remote.release()

    def _raise_pending(self) -> None:
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _start(self) -> None:
        """Start the upload thread if none runs (the caller holds the condition)."""
        if self._worker is None:
            # not a daemon: at interpreter exit the pending uploads finish
            self._worker = threading.Thread(target=self._run, name="ckpt-upload")
            self._worker.start()

    def _next(self) -> Optional[Tuple[str, str, int]]:
        """The next operation in commit order: checkpoints, then the index, then deletions."""
        with self._cond:
            for name, n in self._uploads.items():
                if name != INDEX_NAME:
                    return "upload", name, n
            if INDEX_NAME in self._uploads:
                return "upload", INDEX_NAME, self._uploads[INDEX_NAME]
            for name in self._deletes:
                return "delete", name, 0
            self._worker = None
            self._cond.notify_all()
            return None

    def _run(self) -> None:
        while True:
            op = self._next()
            if op is None:
                return
            kind, name, n = op
            with self._cond:
                job = self._jobs.get(name) if kind == "upload" else None
            try:
                # one writer per run directory: stop if taken over (a rank's own shards: not the writer)
                with self.remote.lock(commit=True) if job is None or job[1] else nullcontext():
                    if job is not None:
                        self._uploaded = job[0](self.remote)
                    elif kind == "upload":
                        self._upload(name)
                    else:
                        self.remote.delete(name)
            except BaseException as e:  # kept for the next commit, wait() or close()
                error = wrapped(StorageError, f"the background upload of {name} failed", e,
                                path=self.remote.where(name),
                                hint="the local tier holds it and it is uploaded again with the next save, "
                                     "wait() or close(); check the remote store")
                error.writer_conflict = getattr(e, "writer_conflict", False)  # type: ignore[attr-defined]
                warnings.warn(f"{error}; saves go on in the local tier only until an upload succeeds",
                              stacklevel=1)
                with self._cond:
                    self._error = error
                    self._worker = None
                    self._cond.notify_all()
                return
            with self._cond:
                if self._remote_down:
                    self._remote_down, self._remote = False, None  # listed again at the next list()
                if kind == "delete":
                    self._deletes.pop(name, None)
                    if self._remote is not None:
                        self._remote.pop(name, None)
                    if self._remote_dirs is not None:
                        self._remote_dirs.pop(name, None)
                elif job is not None:
                    if self._remote_dirs is not None and job[1] and self._uploaded >= 0:
                        self._remote_dirs[name] = self._uploaded
                    if self._uploads.get(name) == n:
                        del self._uploads[name]
                        self._jobs.pop(name, None)
                else:
                    if self._remote is not None and self._uploaded >= 0:
                        self._remote[name] = self._uploaded
                    if self._uploads.get(name) == n:  # not written again meanwhile
                        del self._uploads[name]

    def _upload(self, name: str) -> None:
        self._uploaded = -1
        try:
            src = open(self.local.where(name), "rb")  # noqa: SIM115  (closed below)
        except FileNotFoundError:
            return  # deleted locally since (retention): its deletion is queued too

        def produce(f: BinaryIO) -> None:
            src.seek(0)  # the remote store may call this again after a transient error
            shutil.copyfileobj(src, f, 8 << 20)

        with src, Progress(f"uploading {name}", os.fstat(src.fileno()).st_size, None) as bar:
            self._uploaded = self.remote.write(name, produce, on_write=bar.update).size

    def __repr__(self) -> str:
        return f"TieredStore({self.local.url!r} -> {self.remote.url!r})"
