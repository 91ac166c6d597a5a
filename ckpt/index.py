"""The human-readable JSON index, and rebuilding records from the files themselves.

The index (``ckpt-index.json``) lists each committed checkpoint's epoch, step,
metrics, size, checksum and time. It is a cache: the checkpoint files describe
themselves, so a missing, torn or stale index is reconciled with the directory:
entries whose file is gone are dropped, files without an entry are read and added.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import fileio, format, storage
from .errors import CkptError
from .record import CheckpointRecord

INDEX_NAME = "ckpt-index.json"
INDEX_VERSION = 1


def read(directory: Path) -> Optional[List[CheckpointRecord]]:
    """Records listed by the index, or None when it is missing or unreadable."""
    path = directory / INDEX_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["checkpoints"]
        return [CheckpointRecord.from_json(e, directory) for e in entries
                if format.parse_name(str(e["file"])) is not None]
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


def describe_file(path: Path) -> CheckpointRecord:
    """A record rebuilt from a checkpoint file that the index does not list."""
    obj = fileio.load(path)
    format.header(obj, str(path))
    info = format.describe(obj)
    return CheckpointRecord(path=path, size=path.stat().st_size,
                            checksum=storage.file_checksum(path), **info)


def reconcile(directory: Path) -> Tuple[List[CheckpointRecord], bool]:
    """Records of the committed checkpoints in ``directory``, sorted by (epoch, step).

    Returns the records and whether they differ from the index on disk (so a writer
    holding the lock knows to rewrite it). Unreadable unindexed files are skipped with
    a warning and left in place.
    """
    indexed = read(directory)
    by_name: Dict[str, CheckpointRecord] = {r.path.name: r for r in indexed or []}
    on_disk = {p.name: p for p in storage.list_names(directory, "ckpt-") if format.parse_name(p.name)}
    records: List[CheckpointRecord] = []
    changed = indexed is None and bool(on_disk)
    for name, path in on_disk.items():
        if name in by_name:
            records.append(by_name[name])
            continue
        try:
            records.append(describe_file(path))
        except (CkptError, OSError) as e:
            warnings.warn(f"{path}: not listed in the index and unreadable, ignored: {e}", stacklevel=2)
            continue
        changed = True
    gone = set(by_name) - set(on_disk)
    if gone:
        warnings.warn(f"{directory}: indexed checkpoints missing on disk: {sorted(gone)}", stacklevel=2)
        changed = True
    records.sort(key=lambda r: r.key)
    return records, changed
