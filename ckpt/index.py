"""The human-readable JSON index, and rebuilding records from the files themselves.

The index (``ckpt-index.json``) lists each committed checkpoint's epoch, step,
metrics, size, checksum and time. It is a cache: the checkpoint files describe
themselves, so a missing, torn or stale index is reconciled with the directory:
entries whose file is gone are dropped, files without an entry are read and added.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import suppress
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import fileio, format, storage
from .errors import CkptError, FormatVersionError
from .record import CheckpointRecord

INDEX_NAME = "ckpt-index.json"
INDEX_VERSION = 1
_OBSERVE_TRIES = 5


def _entries(directory: Path, raw: Optional[bytes] = None) -> List[CheckpointRecord]:
    text = (directory / INDEX_NAME).read_bytes() if raw is None else raw
    data = json.loads(text.decode("utf-8"))
    return [CheckpointRecord.from_json(e, directory) for e in data["checkpoints"]
            if format.parse_name(str(e["file"])) is not None]


def read(directory: Path, raw: Optional[bytes] = None) -> Optional[List[CheckpointRecord]]:
    """Records listed by the index (or by its bytes ``raw``), None when missing or unreadable."""
    path = directory / INDEX_NAME
    try:
        return _entries(directory, raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}: index unreadable ({e}); rebuilding it from the checkpoint files",
                      stacklevel=2)
        return None


def write(directory: Path, records: List[CheckpointRecord]) -> None:
    """Commit the index atomically and durably (same protocol as checkpoints)."""
    ordered = sorted(records, key=lambda r: r.key)
    payload = {"format": INDEX_VERSION, "checkpoints": [r.to_json() for r in ordered]}
    data = (json.dumps(payload, indent=1) + "\n").encode("utf-8")
    storage.atomic_write(directory, INDEX_NAME, lambda f: f.write(data))


def missing_files(directory: Path) -> List[str]:
    """Names the index lists whose file is gone (reconcile drops them from its records)."""
    try:
        entries = _entries(directory)
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return sorted(r.path.name for r in entries if not r.path.exists())


def snapshot(directory: Path) -> Optional[bytes]:
    """The index file's bytes (None when absent), to put back if a save fails."""
    try:
        return (directory / INDEX_NAME).read_bytes()
    except FileNotFoundError:
        return None


def roll_back(directory: Path, before: Optional[bytes]) -> None:
    """Put back a :func:`snapshot`. Best effort: the caller is raising the original error.

    Needed when the failure came after the new index was renamed into place (its
    directory ``fsync`` failed): the index must not list a checkpoint that was removed.
    """
    path = directory / INDEX_NAME
    with suppress(OSError):
        if snapshot(directory) == before:
            return
        if before is None:
            os.unlink(path)
        else:
            storage.atomic_write(directory, INDEX_NAME, lambda f: f.write(before))


def describe_file(path: Path, *, weights_only: bool = True) -> CheckpointRecord:
    """A record rebuilt from a checkpoint file that the index does not list.

    With no recorded checksum to compare, the archive's own per-record CRC-32s are
    checked, so a damaged file is not adopted (and its damage not blessed) as good.
    """
    fileio.check_archive(path)
    obj = fileio.load(path, weights_only=weights_only)
    format.header(obj, str(path))
    info = format.describe(obj)
    return CheckpointRecord(path=path, size=path.stat().st_size,
                            checksum=storage.file_checksum(path), **info)


def _observe(directory: Path) -> Tuple[Optional[bytes], Dict[str, Path]]:
    """The index's bytes and the checkpoint files, seen with no commit in between.

    A writer replaces the index once per commit, between adding its file and deleting
    evicted ones; an index unchanged around the listing means the listing matches it,
    so a reader racing a writer does not report evicted files as missing.
    """
    raw = snapshot(directory)
    for _ in range(_OBSERVE_TRIES):
        on_disk = {p.name: p for p in storage.list_names(directory, "ckpt-") if format.parse_name(p.name)}
        again = snapshot(directory)
        if again == raw:
            break
        raw = again
    return raw, on_disk


def reconcile(directory: Path) -> Tuple[List[CheckpointRecord], bool]:
    """Records of the committed checkpoints in ``directory``, sorted by (epoch, step).

    Returns the records and whether they differ from the index on disk (so a writer
    holding the lock knows to rewrite it). Unreadable unindexed files are skipped with
    a warning and left in place.
    """
    raw, on_disk = _observe(directory)
    indexed = read(directory, raw) if raw is not None else None
    by_name: Dict[str, CheckpointRecord] = {r.path.name: r for r in indexed or []}
    records: List[CheckpointRecord] = []
    changed = indexed is None and bool(on_disk)
    for name, path in on_disk.items():
        if name in by_name:
            records.append(by_name[name])
            continue
        try:
            records.append(describe_file(path))
        except FileNotFoundError:
            continue  # deleted since it was listed: a concurrent writer evicted it
        except FormatVersionError:
            raise  # a newer ckpt wrote it: skipping it would silently resume from older state
        except (CkptError, OSError) as e:
            warnings.warn(f"{path}: not listed in the index and unreadable, ignored: {e}", stacklevel=2)
            continue
        changed = True
    gone = set(by_name) - set(on_disk)
    if gone:  # not `changed`: the index keeps them until the next save, so verify() reports them
        warnings.warn(f"{directory}: indexed checkpoints missing on disk: {sorted(gone)}", stacklevel=2)
    records.sort(key=lambda r: r.key)
    return records, changed
