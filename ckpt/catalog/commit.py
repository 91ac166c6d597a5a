"""Committing one checkpoint: file, index, retention, in that order, under the lock.

The commit protocol (see docs/explanation/commit-protocol.md) at the level of the
directory: the checkpoint file is committed, then the index, and only then are
evicted files deleted. Every writer goes through the retention step here
(:func:`index_kept` then :func:`finish`): a local save, the collective save of a
process group and ``ckpt prune``. A failure at any step puts the
directory back as it was. Replacing an existing (epoch, step) takes extra care, since
the store's commit destroys the old bytes: the old entry leaves the index first (a
crash now leaves a valid, unindexed file that the next scan adopts), the old bytes are
kept under a temporary name until the new index is committed, and put back on failure.
"""

from __future__ import annotations

from typing import Collection, List, Optional, Set, Tuple

from .. import policy, record, schema
from ..errors import CheckpointExistsError, storage_error
from ..format import torchfile
from ..record import CheckpointRecord
from ..storage.base import Store, Written
from . import differential, history, index
from .book import Book, Change

Key = Tuple[int, int]
#: What :func:`commit` returns: the new record, the records kept, and for a differential
#: save what the next one compares with.
Committed = Tuple[CheckpointRecord, List[CheckpointRecord], Optional[differential.Previous]]


def check_new(key: Key, mid_epoch: bool, overwrite: bool,
              records: List[CheckpointRecord]) -> Optional[CheckpointRecord]:
    """The record ``key`` would replace (None if new); raise unless replacing is allowed.

    An end-of-epoch save may replace a mid-epoch checkpoint of the same (epoch, step):
    the same training state, now marked complete.
    """
    existing = find(records, key)
    if existing is not None and not overwrite and not (existing.mid_epoch and not mid_epoch):
        raise CheckpointExistsError(
            f"a checkpoint for epoch {key[0]}, step {key[1]} already exists", path=existing.path,
            hint="pass a new step (save(epoch=..., step=global_step)), or overwrite=True to replace it")
    return existing


def find(records: List[CheckpointRecord], key: Key) -> Optional[CheckpointRecord]:
    """The record of ``key`` in ``records`` (sorted by key); a save past the newest,
    the common case, costs nothing however many checkpoints there are."""
    if not records or records[-1].key < key:
        return None
    return next((r for r in records if r.key == key), None)


def commit(store: Store, records: List[CheckpointRecord], book: Book,
           checkpoint: schema.Checkpoint, *, retention: policy.RetentionPolicy, protected: Collection[Key],
           overwrite: bool, progress: Optional[bool], differential_save: bool = False,
           previous: Optional[differential.Previous] = None) -> Committed:
    """Commit ``checkpoint`` over the committed ``records`` (the caller holds the lock;
    ``book`` writes the index); return its record, the records kept and, for a
    differential save, what the next one compares with.

    ``differential_save``: store the large tensors as chunks in packs, reusing the chunks
    of ``previous`` (what the previous checkpoint holds) whose bytes are equal
    (:mod:`ckpt.catalog.differential`).
    """
    key, name = checkpoint.key, checkpoint.name
    existing = check_new(key, checkpoint.header.mid_epoch, overwrite, records)
    others = records if existing is None else [r for r in records if r.key != key]
    replacing = existing is not None and name in store.list(name)
    backup: Optional[str] = None
    written: Optional[Written] = None
    new_blobs: List[str] = []
    following: Optional[differential.Previous] = None
    try:
        if differential_save:
            checkpoint, new_blobs, following = differential.split(store, checkpoint, previous, progress)
        if replacing:
            _write_index(store, book, others, ([], [name]))
            backup = store.keep_aside(name)
        written = _write_checkpoint(store, checkpoint, progress)
        rec = record.make(checkpoint.header, store.where(name), size=written.size, checksum=written.checksum,
                          extra=checkpoint.extra)
        candidates = others + [rec]
        if others and others[-1].key > key:
            candidates.sort(key=lambda r: r.key)
        kept, evicted = index_kept(store, book, candidates, retention, {key, *protected}, added=[rec], new=rec)
    except BaseException:
        _undo(store, name, book, records, replacing=replacing, backup=backup, written=written)
        differential.remove(store, new_blobs)
        raise
    finally:
        if backup is not None:
            store.delete(backup)
    finish(store, kept, evicted, new=rec, retention=retention, protected=protected,
           replaced=existing.blobs if existing is not None else ())
    if following is not None:
        following.name, following.checksum = rec.name, rec.checksum
    return rec, kept, following


def partition(candidates: List[CheckpointRecord], retention: policy.RetentionPolicy,
              protected: Collection[Key]) -> Tuple[List[CheckpointRecord], List[CheckpointRecord]]:
    """(kept, evicted) of ``candidates`` (sorted, order kept); keep-all costs nothing per record."""
    if not retention.deletes:
        return candidates, []
    kept_keys = policy.select_kept(candidates, retention, protected)
    return ([r for r in candidates if r.key in kept_keys], [r for r in candidates if r.key not in kept_keys])


def index_kept(store: Store, book: Book, candidates: List[CheckpointRecord], retention: policy.RetentionPolicy,
               protected: Collection[Key], *, added: Optional[List[CheckpointRecord]] = None,
               new: Optional[CheckpointRecord] = None) -> Tuple[List[CheckpointRecord], List[CheckpointRecord]]:
    """Commit the index as the ``candidates`` (sorted) that ``retention`` keeps, the
    ``protected`` keys always; return (kept, evicted). Nothing is deleted yet (:func:`finish`).

    ``added``: the records new since the records ``book`` holds, so the change can be one
    journal line; None rewrites the whole index (the caller changed it behind the book).
    ``new``: the save being committed, whose history line the index carries on a store
    that keeps its history there (elsewhere :func:`finish` appends it).
    """
    kept, evicted = partition(candidates, retention, protected)
    change: Optional[Change] = None if added is None else (added, [r.name for r in evicted])
    _write_index(store, book, kept, change, new=new, retention=retention, protected=protected)
    return kept, evicted


def finish(store: Store, kept: List[CheckpointRecord], evicted: List[CheckpointRecord], *,
           new: Optional[CheckpointRecord], retention: policy.RetentionPolicy, protected: Collection[Key],
           replaced: Collection[Tuple[str, str]] = ()) -> None:
    """After the index commit: the history line of the ``new`` save (evicted or not; where
    the index does not carry it), then the evicted files, then the blobs no kept record
    references (the evicted ones' and the ``replaced`` checkpoint's)."""
    if new is not None and not history.in_index(store):
        history.append(store, new, retention, protected)
    _delete(store, evicted)
    still = {b for r in kept for b, _ in r.blobs}
    _delete_blobs(store, {b for r in evicted for b, _ in r.blobs} | {b for b, _ in replaced}, still)


def _undo(store: Store, name: str, book: Book, before: List[CheckpointRecord], *, replacing: bool,
          backup: Optional[str], written: Optional[Written]) -> None:
    """Put the directory back as it was after a failed commit (best effort: the caller
    re-raises the original error, and scans repair whatever a second failure leaves)."""
    if replacing and backup is None:
        return  # the old bytes could not be kept aside: leave the (valid) file unindexed
    try:
        if backup is not None:
            store.move(backup, name)
        elif written is not None:
            store.delete(name)
    except OSError:
        pass
    if written is not None or backup is not None:
        book.restore(before)


def _write_checkpoint(store: Store, checkpoint: schema.Checkpoint, progress: Optional[bool]) -> Written:
    try:
        return torchfile.write(store, checkpoint.name, checkpoint.obj, nbytes=checkpoint.nbytes, progress=progress)
    except OSError as e:
        raise storage_error(e, store.where(checkpoint.name), "writing the checkpoint") from e


def _write_index(store: Store, book: Book, records: List[CheckpointRecord], change: Optional[Change], *,
                 new: Optional[CheckpointRecord] = None, retention: Optional[policy.RetentionPolicy] = None,
                 protected: Collection[Key] = ()) -> None:
    try:
        if new is not None and retention is not None and history.in_index(store):
            history.stage(store, new, retention, protected)
        book.write(records, change)
    except OSError as e:
        raise storage_error(e, store.where(index.INDEX_NAME), "updating the index") from e


def _delete_blobs(store: Store, candidates: Set[str], referenced: Set[str]) -> None:
    """Blobs that no kept checkpoint references (after the commit, like evicted files)."""
    for name in sorted(candidates - referenced):
        try:
            store.delete(name)
        except OSError as e:
            raise storage_error(e, store.where(name), "deleting an unreferenced tensor file "
                                "(the new checkpoint is committed)") from e


def _delete(store: Store, evicted: List[CheckpointRecord]) -> None:
    for rec in evicted:
        try:
            store.delete(rec.name)
        except OSError as e:
            raise storage_error(e, rec.path, "deleting an evicted checkpoint "
                                "(the new checkpoint is committed)") from e
