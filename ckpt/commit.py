"""Committing one checkpoint: file, index, retention, in that order, under the lock.

Design §4 at the level of the directory: the checkpoint file is committed, then the
index, and only then are evicted files deleted. A failure at any step puts the
directory back as it was. Replacing an existing (epoch, step) takes extra care, since
``os.replace`` destroys the old bytes: the old entry leaves the index first (a crash
now leaves a valid, unindexed file that the next scan adopts), the old file is kept
under a hard link until the new index is committed, and it is put back on failure.
"""

from __future__ import annotations

import os
import secrets
from contextlib import suppress
from pathlib import Path
from typing import Any, Collection, Dict, List, Optional, Tuple

from . import fileio, format, index, policy, storage
from .errors import CheckpointExistsError
from .record import CheckpointRecord

Key = Tuple[int, int]


def check_new(key: Key, mid_epoch: bool, overwrite: bool, records: List[CheckpointRecord]) -> Optional[CheckpointRecord]:
    """The record ``key`` would replace (None if new); raise unless replacing is allowed.

    An end-of-epoch save may replace a mid-epoch checkpoint of the same (epoch, step):
    the same training state, now marked complete.
    """
    existing = next((r for r in records if r.key == key), None)
    if existing is not None and not overwrite and not (existing.mid_epoch and not mid_epoch):
        raise CheckpointExistsError(
            f"a checkpoint for epoch {key[0]}, step {key[1]} already exists", path=existing.path,
            hint="pass a new step (save(epoch=..., step=global_step)), or overwrite=True to replace it")
    return existing


def commit(directory: Path, obj: Dict[str, Any], nbytes: int, *, retention: policy.RetentionPolicy,
           protected: Collection[Key], overwrite: bool,
           progress: Optional[bool]) -> Tuple[CheckpointRecord, List[CheckpointRecord]]:
    """Commit the checkpoint dict ``obj``; return its record and the records kept."""
    key, meta = (obj["epoch"], obj["step"]), obj["ckpt"]
    path = directory / format.file_name(*key)
    with storage.lock(directory):
        listing = index.scan(directory, locked=True)
        existing = check_new(key, meta["mid_epoch"], overwrite, listing.records)
        others = [r for r in listing.records if r.key != key]
        replacing = existing is not None and existing.path.exists()
        backup: Optional[Path] = None
        written: Optional[storage.Written] = None
        try:
            if replacing:
                _write_index(directory, others)
                backup = _link_aside(path)
            written = _write_checkpoint(directory, path, obj, nbytes, progress)
            record = CheckpointRecord(epoch=key[0], step=key[1], path=path, metrics=obj["metrics"],
                                      mid_epoch=meta["mid_epoch"], size=written.size,
                                      checksum=written.checksum, time=meta["created"])
            record._extra = obj["extra"]
            records = others + [record]
            kept_keys = policy.select_kept(records, retention, {key, *protected})
            kept = sorted((r for r in records if r.key in kept_keys), key=lambda r: r.key)
            _write_index(directory, kept)
        except BaseException:
            _undo(directory, path, listing.raw, replacing=replacing, backup=backup, written=written)
            raise
        finally:
            if backup is not None:
                storage.remove(backup)
        _delete([r for r in records if r.key not in kept_keys])
    return record, kept


def _undo(directory: Path, path: Path, index_before: Optional[bytes], *, replacing: bool,
          backup: Optional[Path], written: Optional[storage.Written]) -> None:
    """Put the directory back as it was after a failed commit (best effort: the caller
    re-raises the original error, and scans repair whatever a second failure leaves)."""
    if replacing and backup is None:
        return  # the old bytes could not be kept aside: leave the (valid) file unindexed
    if backup is not None:
        with suppress(OSError):
            os.replace(backup, path)
    elif written is not None:
        storage.remove(path)
    if written is not None or backup is not None:
        index.roll_back(directory, index_before)


def _link_aside(path: Path) -> Optional[Path]:
    """A hard link to ``path`` under a temporary name (cleaned at the next open after a crash)."""
    aside = path.with_name(f"{storage.TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-prev-{path.name}")
    try:
        os.link(path, aside)
    except OSError:  # no hard links here: the replaced checkpoint cannot be put back
        return None
    return aside


def _write_checkpoint(directory: Path, path: Path, obj: Dict[str, Any], nbytes: int,
                      progress: Optional[bool]) -> storage.Written:
    try:
        return fileio.write(directory, path.name, obj, nbytes=nbytes, progress=progress)
    except OSError as e:
        raise storage.storage_error(e, path, "writing the checkpoint") from e


def _write_index(directory: Path, records: List[CheckpointRecord]) -> None:
    try:
        index.write(directory, records)
    except OSError as e:
        raise storage.storage_error(e, directory / index.INDEX_NAME, "updating the index") from e


def _delete(evicted: List[CheckpointRecord]) -> None:
    for record in evicted:
        try:
            storage.remove(record.path)
        except OSError as e:
            raise storage.storage_error(e, record.path, "deleting an evicted checkpoint "
                                        "(the new checkpoint is committed)") from e
