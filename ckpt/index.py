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
from typing import Dict, List, NamedTuple, Optional, Tuple

from . import fileio, format, storage
from .errors import CkptError, CorruptCheckpointError, FormatVersionError
from .record import CheckpointRecord

INDEX_NAME = "ckpt-index.json"
INDEX_VERSION = 1
_OBSERVE_TRIES = 5


def _entries(directory: Path, raw: Optional[bytes] = None) -> List[CheckpointRecord]:
    text = (directory / INDEX_NAME).read_bytes() if raw is None else raw
    data = json.loads(text.decode("utf-8"))
    if isinstance(data.get("format"), int) and data["format"] > INDEX_VERSION:
        raise FormatVersionError(f"index format {data['format']} is newer than this ckpt reads "
                                 f"({INDEX_VERSION})", path=directory / INDEX_NAME,
                                 hint="upgrade ckpt (pip install -U ckpt) to use this directory")
    return [CheckpointRecord.from_json(e, directory) for e in data["checkpoints"]
            if format.parse_name(str(e["file"])) is not None]


def read(directory: Path, raw: Optional[bytes] = None) -> Optional[List[CheckpointRecord]]:
    """Records listed by the index (or by its bytes ``raw``), None when missing or unreadable."""
    path = directory / INDEX_NAME
    try:
        return _entries(directory, raw)
    except FileNotFoundError:
        return None
    except FormatVersionError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"{path}: index unreadable ({e}); rebuilding it from the checkpoint files",
                      stacklevel=2)
        return None


def write(directory: Path, records: List[CheckpointRecord]) -> None:
    """Commit the index atomically and durably (same protocol as checkpoints)."""
    ordered = sorted(records, key=lambda r: r.key)
    payload = {"format": INDEX_VERSION, "checkpoints": [r.to_json() for r in ordered]}
    data = (json.dumps(payload, indent=1) + "\n").encode("utf-8")
    storage.atomic_write(directory, INDEX_NAME, lambda f: f.write(data))


def roll_back(directory: Path, before: Optional[bytes]) -> None:
    """Put the index back to the bytes ``before`` (None: no index). Best effort: the
    caller is raising the original error, and a failed roll-back leaves an index that
    reconciliation repairs (entries of missing files are dropped, unindexed files read)."""
    path = directory / INDEX_NAME
    with suppress(OSError):
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


def _observe(directory: Path, locked: bool) -> Tuple[Optional[bytes], Dict[str, Path]]:
    """The index's bytes and the checkpoint files, seen with no commit in between.

    A writer replaces the index once per commit, between adding its file and deleting
    evicted ones; an index unchanged around the listing means the listing matches it,
    so a reader racing a writer does not report evicted files as missing. A caller
    holding the lock sees no commits and reads the index once.
    """
    raw = _read_bytes(directory)
    for _ in range(_OBSERVE_TRIES):
        on_disk = {p.name: p for p in storage.list_names(directory, "ckpt-") if format.parse_name(p.name)}
        if locked:
            break
        again = _read_bytes(directory)
        if again == raw:
            break
        raw = again
    return raw, on_disk


def _read_bytes(directory: Path) -> Optional[bytes]:
    try:
        return (directory / INDEX_NAME).read_bytes()
    except FileNotFoundError:
        return None


class Listing(NamedTuple):
    """What :func:`scan` found."""

    records: List[CheckpointRecord]  #: committed checkpoints, sorted by (epoch, step)
    changed: bool  #: the records differ from the index on disk (a writer should rewrite it)
    missing: List[str]  #: names the index lists whose file is gone
    raw: Optional[bytes]  #: the index bytes the records were built from


def reconcile(directory: Path) -> Tuple[List[CheckpointRecord], bool]:
    """(records, changed) of :func:`scan`."""
    listing = scan(directory)
    return listing.records, listing.changed


def scan(directory: Path, *, locked: bool = False) -> Listing:
    """The committed checkpoints in ``directory``: the index reconciled with the files.

    Unreadable unindexed files are skipped with a warning and left in place; a file in a
    newer format raises :class:`FormatVersionError` (skipping it would resume from older
    state). Pass ``locked=True`` when holding the directory lock.
    """
    raw, on_disk = _observe(directory, locked)
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
            raise
        except CorruptCheckpointError as e:
            where = ""
            if locked:  # a writer moves it aside, or every later scan would read it again
                with suppress(OSError):
                    where = f"; kept as {storage.quarantine(path)}"
            warnings.warn(f"{path}: not listed in the index and damaged, ignored: {e}{where}", stacklevel=2)
            continue
        except (CkptError, OSError) as e:
            warnings.warn(f"{path}: not listed in the index and unreadable, ignored: {e}", stacklevel=2)
            continue
        changed = True
    missing = sorted(set(by_name) - set(on_disk))
    if missing:  # not `changed`: the index keeps them until the next save, so verify() reports them
        warnings.warn(f"{directory}: indexed checkpoints missing on disk: {missing}", stacklevel=2)
    records.sort(key=lambda r: r.key)
    return Listing(records, changed, missing, raw)


def verify_all(directory: Path, *, progress: Optional[bool] = None) -> Dict[str, Tuple[str, str]]:
    """File name -> ("ok" | "damaged" | "missing", detail) for every indexed checkpoint."""
    listing = scan(directory)
    report: Dict[str, Tuple[str, str]] = {}
    for record in listing.records:
        try:
            fileio.verify(record.path, record.checksum, progress=progress)
            report[record.path.name] = ("ok", "" if record.checksum else "no recorded checksum")
        except FileNotFoundError:
            report[record.path.name] = ("missing", "deleted since it was listed")
        except CkptError as e:
            report[record.path.name] = ("damaged", str(e))
    report.update({name: ("missing", "listed in the index, gone from disk") for name in listing.missing})
    return report
