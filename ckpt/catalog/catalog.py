"""The committed checkpoints of a run directory: the index reconciled with the files.

A :class:`Catalog` is everything the manager needs of a run directory, over any
:class:`~ckpt.storage.base.Store`: list what is committed, load one checkpoint, commit
a new one (:mod:`ckpt.catalog.commit`), move a damaged one aside, verify them all. Locks
and index transactions happen here, never in the manager.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Collection, Dict, List, NamedTuple, Optional, Set, Tuple

from filelock import Timeout

from .. import policy, record, schema
from ..errors import CkptError, CorruptCheckpointError, FormatVersionError, wrapped
from ..format import torchfile, torchio
from ..io.checksum import file_checksum
from ..record import CheckpointRecord
from ..storage.base import Store, capabilities
from ..verdicts import MissingFilesWarning, Quarantine, Quarantined, UnindexedFileWarning, Verdict
from . import commit as _commit
from . import differential, index, sharddir, verifying
from .book import Book

QUARANTINE_SUFFIX = ".corrupt"
_OBSERVE_TRIES = 5


class Listing(NamedTuple):
    """What :meth:`Catalog.scan` found."""

    records: List[CheckpointRecord]  #: committed checkpoints, sorted by (epoch, step)
    changed: bool  #: the records differ from the index on disk (a writer should rewrite it)
    missing: List[str]  #: names the index lists whose file is gone
    raw: index.Raw  #: the index bytes the records were built from
    unread: bool = False  #: a checkpoint file could not be read now: what it references is unknown


class Catalog:
    """The checkpoints of one run directory (see the module docstring)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        #: What the store can do beyond the Store protocol (asked once).
        self.caps = capabilities(store)
        self._book = Book(store)  # the writer's copy of the index (flat bookkeeping)
        self._suspects: Set[str] = set()  # unreferenced tensor files seen after this writer's last commit
        self._memo: Optional[differential.Previous] = None  # what this writer's last differential save holds

    # -- listing ---------------------------------------------------------------------

    @property
    def records(self) -> List[CheckpointRecord]:
        """The committed checkpoints as this process last saw them, oldest first: what
        it opened, scanned (:meth:`refresh`), committed or was told (:meth:`adopt`). The
        one list a manager shows: it has no copy of its own."""
        return self._book.records

    def refresh(self) -> List[CheckpointRecord]:
        """Read the directory again (another process may have committed); the records."""
        records = self.scan().records
        self._book.show(records)
        return records

    def adopt(self, records: List[CheckpointRecord]) -> None:
        """The committed records are ``records`` (sorted), as the process that wrote them
        says (rank 0 of a process group, to the other ranks)."""
        self._book.show(records)

    def forget(self, rec: CheckpointRecord) -> None:
        """Leave ``rec`` out of :attr:`records` (it failed to load) until the next scan."""
        self._book.show([r for r in self._book.records if r.key != rec.key])

    def open(self) -> List[CheckpointRecord]:
        """Clean what crashed writers left and list the checkpoints, rewriting a stale
        index when no writer is active."""
        self.store.clean_temporaries()
        listing = self.scan(remember=True)  # no commit of ours is in flight yet
        # Tensor files no checkpoint references: a crashed save's, or a live save's that
        # has not committed yet. Only a lock that excludes every writer tells them apart;
        # elsewhere (object stores) the writer collects them after its commits (_collect).
        exclusive = self.caps.exclusive_lock and not listing.unread  # an unread file may reference packs
        orphans = differential.unreferenced(
            self.store, {b for r in listing.records for b, _ in r.blobs}) if exclusive else []
        if not listing.changed and not orphans:
            self._book.show(listing.records)
            return listing.records
        try:
            with self.store.lock(timeout=0, commit=False):  # the repair when opening the run
                listing = self.scan(locked=True)  # a writer may have committed meanwhile
                if listing.changed:
                    self._book.write(listing.records)
                if exclusive and not listing.unread:  # packs of a differential save that crashed before its commit
                    differential.remove(self.store, differential.unreferenced(
                        self.store, {b for r in listing.records for b, _ in r.blobs}))
        except Timeout:
            pass  # a writer is committing: it rewrites the index itself
        except OSError as e:
            warnings.warn(f"{self.store.url}: could not rewrite the index ({e}); the checkpoint "
                          "files still describe themselves", stacklevel=2)
        self._book.show(listing.records)
        return listing.records

    def scan(self, *, locked: bool = False, remember: bool = False) -> Listing:
        """The committed checkpoints: the index reconciled with the files. Unindexed files
        are adopted when they verify and their contents match their name; a damaged one is
        moved aside when ``locked`` (a writer), else skipped with a warning. A file in a newer
        format raises :class:`FormatVersionError` (skipping it would resume from older state).
        A locked scan (or ``remember``: no commit of ours in flight) primes the writer's book."""
        before = self._book.directory()  # before the listing: a change after it is noticed
        raw, on_disk, seen = self._observe(locked)
        known = self._book.peek(seen)  # the index this process wrote or read last: not decoded again
        indexed, applied = known if known is not None else index.read_all(self.store, raw, self.extra_loader)
        by_name: Dict[str, CheckpointRecord] = {r.name: r for r in indexed or []}
        records: List[CheckpointRecord] = []
        changed = indexed is None and (raw != index.Raw(None, None) or bool(on_disk))
        unread = False
        for name in on_disk:
            if name in by_name:
                records.append(by_name[name])
                continue
            try:
                records.append(self.describe(name))
            except FileNotFoundError:
                continue  # deleted since it was listed: a concurrent writer evicted it
            except FormatVersionError:
                raise
            except CorruptCheckpointError as e:
                where = ""
                if locked:  # a writer moves it aside, or every later scan would read it again
                    try:
                        where = f"; kept as {self.store.where(self.move_aside(name))}"
                    except OSError:
                        pass
                warnings.warn(f"{self.store.where(name)}: not listed in the index and damaged, ignored: "
                              f"{e}{where}", UnindexedFileWarning, stacklevel=2)
                continue
            except (CkptError, OSError) as e:
                warnings.warn(f"{self.store.where(name)}: not listed in the index and unreadable, ignored: {e}",
                              UnindexedFileWarning, stacklevel=2)
                unread = True
                continue
            changed = True
        missing = sorted(set(by_name) - set(on_disk))
        if missing:  # not `changed`: the index keeps them until the next save, so verify() reports them
            warnings.warn(f"{self.store.url}: indexed checkpoints missing on disk: {missing}", MissingFilesWarning,
                          stacklevel=2)
        records.sort(key=lambda r: r.key)
        if locked or (remember and not changed and not missing):
            self._book.remember(records, raw, seen, stale=changed or bool(missing), applied=applied,
                                directory=before)
        return Listing(records, changed, missing, raw, unread)

    def _observe(self, locked: bool) -> Tuple[index.Raw, Dict[str, int], Optional[index.Identity]]:
        """The index's bytes and the checkpoint files, seen with no commit in between,
        and the index's identity then (None where the store cannot tell).

        A writer changes the index once per commit, between adding its file and
        deleting evicted ones; an index unchanged around the listing means the listing
        matches it, so a reader racing a writer does not report evicted files as
        missing. A caller holding the lock sees no commits and reads the index once.
        """
        seen = index.identity(self.store, self.caps)
        raw = index.read_raw(self.store)
        on_disk: Dict[str, int] = {}
        for _ in range(_OBSERVE_TRIES):
            on_disk = {n: s for n, s in self.store.list("ckpt-").items() if schema.parse_name(n)}
            list_dirs = self.caps.list_dirs  # sharded checkpoints: local stores only
            if list_dirs is not None:
                on_disk.update((n, s) for n, s in list_dirs("ckpt-").items()
                               if schema.parse_name(n) and schema.is_sharded(n))
            if locked:
                break
            if seen is not None:
                again_seen = index.identity(self.store, self.caps)
                if again_seen == seen:
                    break
                seen, raw = again_seen, index.read_raw(self.store)
                continue
            again = index.read_raw(self.store)
            if again == raw:
                break
            raw = again
        return raw, on_disk, seen

    def describe(self, name: str) -> CheckpointRecord:
        """A record rebuilt from a checkpoint file that the index does not list.

        With no recorded checksum to compare, the archive's own per-record CRC-32s are
        checked, so a damaged file is not adopted (and its damage not blessed) as good;
        its contents must name the same (epoch, step) as its file name.
        """
        path = self.store.where(name)
        if schema.is_sharded(name):
            return sharddir.describe(self.store, name)
        with self.store.local_path(name) as local, torchfile.opened(local) as real:
            obj = torchfile.load_open(real, path, check_records=True)
            head = schema.header(obj, str(path))
            if (head.epoch, head.step) != schema.parse_name(name):
                raise CorruptCheckpointError(
                    f"holds epoch {head.epoch}, step {head.step}, which does not match its name "
                    "(a renamed or copied file)", path=path,
                    hint=f"its own name is {schema.file_name(head.epoch, head.step)}")
            checksum = file_checksum(real)
            size = real.stat().st_size
        return record.make(head, path, size=size, checksum=checksum, load_extra=self.extra_loader(name))

    # -- loading ---------------------------------------------------------------------

    def load(self, rec: CheckpointRecord, *, map_location: Any = "cpu", weights_only: bool = True,
             progress: Optional[bool] = None, targets: Any = None) -> Tuple[Dict[str, Any], schema.Header]:
        """Verify and load one committed checkpoint and validate its header (``targets``:
        see :func:`torchfile.load`)."""
        with self.store.local_path(rec.name) as local:
            obj = torchfile.load(local, map_location=map_location, weights_only=weights_only,
                                 checksum=rec.checksum, progress=progress, targets=targets)
        head = schema.header(obj, str(rec.path))
        if head.key != rec.key:
            raise CorruptCheckpointError(f"holds epoch {head.epoch}, step {head.step}, not "
                                         f"epoch {rec.epoch}, step {rec.step} as its name says", path=rec.path)
        if head.blobs:
            obj = differential.resolve(self.store, obj, head, map_location=map_location, progress=progress)
        return obj, head

    def extra_loader(self, name: str) -> record.ExtraLoader:
        """Reads the ``extra`` dict of ``name``: its pickle only, not the tensors (:func:`torchio.read_extra`)."""
        def load() -> Dict[str, Any]:
            if schema.is_sharded(name):
                obj: Any = sharddir.load_meta(self.store, name)
                extra = obj.get("extra", {}) if isinstance(obj, dict) else {}
                return dict(extra) if isinstance(extra, dict) else {}
            with self.store.local_path(name) as local:
                return torchio.read_extra(local, shown=self.store.where(name))
        return load

    # -- changing --------------------------------------------------------------------

    def commit(self, checkpoint: schema.Checkpoint, *, retention: policy.RetentionPolicy,
               protected: Tuple[Tuple[int, int], ...] = (), overwrite: bool = False,
               progress: Optional[bool] = None,
               differential_save: bool = False) -> Tuple[CheckpointRecord, List[CheckpointRecord]]:
        """Commit ``checkpoint``, then apply retention; return its record and the records kept.

        ``differential_save``: tensors unchanged since the newest committed checkpoint are
        referenced, not written again (:mod:`ckpt.catalog.differential`).
        """
        with self.store.lock(commit=True):
            records = self._book.current()  # no other writer committed: nothing to read
            if records is None:
                records = self.scan(locked=True).records
            previous = differential.previous(self._memo, records[-1], self._unresolved) \
                if differential_save and records else None
            self._memo = None
            rec, kept, self._memo = _commit.commit(
                self.store, records, self._book, checkpoint, retention=retention, protected=protected,
                overwrite=overwrite, progress=progress, differential_save=differential_save, previous=previous)
            self._book.seal()
            if differential_save and not self.caps.exclusive_lock:
                self._collect(kept)
            return rec, kept

    def retain(self, candidates: List[CheckpointRecord], retention: policy.RetentionPolicy,
               protected: Collection[Tuple[int, int]] = (), *, new: Optional[CheckpointRecord] = None,
               indexed: Optional[Callable[[], None]] = None) -> Tuple[List[CheckpointRecord], List[CheckpointRecord]]:
        """The commit-and-retention transaction of a writer that holds the lock and wrote
        its files itself (a collective save: ``new``, already in place; ``ckpt prune``:
        none): index the ``candidates`` (sorted) that ``retention`` keeps, ``protected``
        and ``new`` always; then ``indexed()``, the history line of ``new``, and the
        deletion of what was evicted. Returns (kept, evicted).

        If the index cannot be written, ``new`` is deleted (it is not committed) and the
        error raised; the caller puts back what it replaced.
        """
        keep = set(protected) | ({new.key} if new is not None else set())
        try:
            kept, evicted = _commit.index_kept(self.store, self._book, candidates, retention, keep, new=new)
        except BaseException:
            if new is not None:
                self.store.delete(new.name)
            raise
        if indexed is not None:
            indexed()
        _commit.finish(self.store, kept, evicted, new=new, retention=retention, protected=protected)
        self._book.seal()
        return kept, evicted

    def _collect(self, kept: List[CheckpointRecord]) -> None:
        """Delete the tensor files that were already unreferenced after this writer's
        previous commit and still are: a crashed save's (a save in flight at the first
        look has committed, or been refused, by the second). Readers never delete them."""
        orphans = set(differential.unreferenced(self.store, {b for r in kept for b, _ in r.blobs}))
        try:
            differential.remove(self.store, sorted(orphans & self._suspects))
        except OSError as e:  # the checkpoint is committed: the next commit tries again
            warnings.warn(f"{self.store.url}: could not delete unreferenced tensor files ({e})", stacklevel=3)
            return
        self._suspects = orphans - self._suspects

    def _unresolved(self, rec: CheckpointRecord) -> Optional[Dict[str, Any]]:
        """The checkpoint dict of ``rec`` with blob references as they are (None if unreadable:
        the next differential save then writes every tensor)."""
        if schema.is_sharded(rec.name):
            return None
        try:
            with self.store.local_path(rec.name) as local:
                # its references are reused: checked first; with none, only its inline
                # tensors are sampled (to tell a trained tensor), never referenced
                obj = torchfile.load(local, checksum=rec.checksum if rec.blobs else None)
            return obj if schema.is_checkpoint(obj) else None
        except (CkptError, OSError):
            return None

    def quarantine(self, rec: CheckpointRecord, error: BaseException) -> Quarantine:
        """Move a checkpoint that failed to load out of the namespace, if it still fails
        under the lock (a concurrent writer may have replaced it meanwhile: then it is
        left alone). Returns what happened."""
        try:
            with self.store.lock(commit=True):
                listing = self.scan(locked=True)
                now = next((r for r in listing.records if r.name == rec.name), None)
                if now is None:
                    return Quarantine(Quarantined.GONE)
                if now.checksum != rec.checksum:
                    return Quarantine(Quarantined.REPLACED)
                try:  # the file and every tensor file it references (a differential checkpoint)
                    self.verify_one(now, {})
                    return Quarantine(Quarantined.READS_NOW)
                except CorruptCheckpointError:
                    pass
                aside = self.move_aside(rec.name)
                self._book.write([r for r in listing.records if r.name != rec.name])
                return Quarantine(Quarantined.MOVED, str(self.store.where(aside)))
        except (OSError, CkptError) as e:
            return Quarantine(Quarantined.FAILED, str(e))

    def move_aside(self, name: str) -> str:
        taken = self.store.list(name + QUARANTINE_SUFFIX)
        target, n = name + QUARANTINE_SUFFIX, 0
        while target in taken:  # never overwrite an earlier quarantined copy
            n += 1
            target = f"{name}{QUARANTINE_SUFFIX}.{n}"
        self.store.move(name, target)
        return target

    # -- integrity -------------------------------------------------------------------

    def verify_one(self, rec: CheckpointRecord, checked: Dict[str, Optional[Exception]],
                   progress: Optional[bool] = None) -> None:
        """Raise unless ``rec``'s file (or sharded directory) and its blobs match their
        checksums (``checked``: blob -> what is wrong with it, None: nothing, filled in here)."""
        if schema.is_sharded(rec.name):
            sharddir.verify(self.store, rec.name, rec.checksum)
        else:
            with self.store.local_path(rec.name) as local, torchfile.opened(local) as real:
                torchfile.verify(real, rec.checksum, progress=progress, shown=rec.path)
        for blob, checksum in rec.blobs:
            if blob not in checked:
                checked[blob] = self._verify_blob(blob, checksum, progress)
            wrong = checked[blob]
            if isinstance(wrong, FileNotFoundError):
                raise CorruptCheckpointError(f"its tensor file {blob} is missing", path=rec.path,
                                             hint="restore an earlier checkpoint")
            if wrong is not None:
                raise wrapped(CorruptCheckpointError, f"its tensor file {blob} is damaged", wrong, path=rec.path)

    def _verify_blob(self, name: str, checksum: str, progress: Optional[bool]) -> Optional[Exception]:
        """None when the blob verifies, else the error that says what is wrong with it."""
        try:
            with self.store.local_path(name) as local, torchfile.opened(local) as real:
                torchfile.verify(real, checksum, progress=progress, shown=self.store.where(name))
        except (FileNotFoundError, CkptError) as e:
            return e
        return None

    def verify(self, *, progress: Optional[bool] = None) -> Dict[str, Verdict]:
        """File name -> :class:`~ckpt.verdicts.Verdict` (ok, damaged or missing, and the
        detail) for every committed checkpoint (see :func:`ckpt.catalog.verifying.verify`)."""
        return verifying.verify(self, progress=progress)
