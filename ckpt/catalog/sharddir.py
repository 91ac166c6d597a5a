"""Sharded checkpoints as the catalog sees them: a directory, described by its manifest.

A sharded checkpoint (``ckpt-e<epoch>-s<step>.dcp/``, written by
:mod:`ckpt.distributed.sharded`) is one entry of a run directory like a file: its
record's size is the total of its files, its checksum the CRC-32 of its manifest
(which holds the CRC-32 of every other file), its header that of ``ckpt-meta.pt``
(the plain entries). This module reads them without ``torch.distributed``.
"""

from __future__ import annotations

import io
import os
from contextlib import suppress
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .. import record, schema
from ..errors import CorruptCheckpointError, StorageError
from ..format import torchfile, torchio
from ..format.shardfiles import MANIFEST, META, encode_manifest, manifest_of, parse_manifest, verify_files
from ..io.checksum import crc32, format_checksum
from ..record import CheckpointRecord
from ..storage.base import Store
from ..storage.local import temporary_name
from . import index


def _local(store: Store, name: str) -> Path:
    """A sharded checkpoint's local directory (an overwrite keeps the old one aside there)."""
    local = store.tree(name).capabilities().local_only
    if local is None:
        raise StorageError("replacing a sharded checkpoint works on a local or shared filesystem only",
                           path=store.where(name), hint="save under a new (epoch, step) on object stores")
    return local


def _manifest(store: Store, name: str) -> Tuple[bytes, Dict[str, Any]]:
    """The manifest's bytes and contents (CheckpointNotFoundError without one)."""
    tree = store.tree(name)
    data = manifest_of(tree)
    return data, parse_manifest(data, tree.where(MANIFEST))


def manifest_checksum(store: Store, name: str) -> str:
    """The checksum a sharded checkpoint's record holds: CRC-32 of its manifest's bytes."""
    return format_checksum(crc32(_manifest(store, name)[0]))


def checked_manifest(store: Store, name: str, expected: Any) -> Dict[str, Any]:
    """The manifest, read once and checked against the record's checksum ``expected``
    (the other files are left to the load, which sums them as it reads them)."""
    return _checked(store, name, expected)[1]


def verify(store: Store, name: str, expected: Any) -> Dict[str, Any]:
    """Check the manifest against the record, then every file against the manifest."""
    return _verified(store, name, expected)[1]


def _verified(store: Store, name: str, expected: Any) -> Tuple[bytes, Dict[str, Any]]:
    """:func:`verify`, returning the manifest's bytes too (read once)."""
    tree = store.tree(name)
    data, manifest = _checked(store, name, expected)
    verify_files(tree.capabilities().local_only or tree, manifest)  # a local directory: read in parallel
    return data, manifest


def _checked(store: Store, name: str, expected: Any) -> Tuple[bytes, Dict[str, Any]]:
    tree = store.tree(name)
    data, manifest = _manifest(store, name)
    got = format_checksum(crc32(data))
    if expected is not None and got != expected:
        raise CorruptCheckpointError(f"manifest checksum {got}, the index says {expected}",
                                     path=tree.where(MANIFEST),
                                     hint="the manifest was changed after the save; resume from another checkpoint")
    return data, manifest


def load_meta(store: Store, name: str) -> Dict[str, Any]:
    """The plain entries (epoch, step, metrics, extra, RNG, small states) of a sharded checkpoint."""
    tree = store.tree(name)
    local = tree.capabilities().local_only
    if local is not None:
        obj = torchfile.load(local / META, mmap=False)
    else:
        try:
            obj = torchio.load(io.BytesIO(tree.read_bytes(META)))
        except (RuntimeError, EOFError) as e:
            raise CorruptCheckpointError(f"cannot read the plain entries: {e}", path=tree.where(META)) from e
    if not isinstance(obj, dict):
        raise CorruptCheckpointError("the plain entries are not a dict", path=tree.where(META))
    return obj


def committed(store: Store, name: str, manifest: Dict[str, Any], meta: Dict[str, Any]) -> CheckpointRecord:
    """The record of a checkpoint this process just committed, from the manifest it wrote
    (its bytes are :func:`~ckpt.format.shardfiles.encode_manifest`'s: nothing is read back)."""
    where = store.where(name)
    head = schema.header(meta, str(where))
    return _record(where, head, encode_manifest(manifest), manifest, meta)


def describe(store: Store, name: str) -> CheckpointRecord:
    """A record for a sharded checkpoint the index does not list (verified first)."""
    where = store.where(name)
    data, manifest = _verified(store, name, None)  # the manifest read once
    obj = load_meta(store, name)
    head = schema.header(obj, str(where))
    if head.key != schema.parse_name(name):
        raise CorruptCheckpointError(f"holds epoch {head.epoch}, step {head.step}, which does not match its name",
                                     path=where)
    return _record(where, head, data, manifest, obj)


def _record(where: Any, head: schema.Header, data: bytes, manifest: Dict[str, Any],
            meta: Dict[str, Any]) -> CheckpointRecord:
    """A sharded checkpoint's record: its size the total of its files and its manifest
    (``data``), its checksum the manifest's CRC-32, ``extra`` from the plain entries ``meta``."""
    size = sum(int(f["size"]) for f in manifest["files"].values()) + len(data)
    extra = meta.get("extra")
    return record.make(head, where, size=size, checksum=format_checksum(crc32(data)),
                       extra=dict(extra) if isinstance(extra, dict) else {})


class Overwrite:
    """Rank 0 replacing the committed checkpoint ``old`` by the sharded one ``new`` (the same
    name, or a file's of the same epoch and step), holding the lock, as
    :mod:`ckpt.catalog.commit` replaces a file: the old entry leaves the index first (a crash
    now leaves a valid, unindexed checkpoint that the next scan adopts); the old one stays
    under its name while the new one is written (a directory of the same name moves to
    ``aside`` only at the commit rename), and is deleted once the new index is
    committed, or put back, indexed again, if the save fails before that."""

    def __init__(self, store: Store, old: str, new: str, records: List[CheckpointRecord]) -> None:
        self.store, self.old, self.new, self.before = store, old, new, records
        where = _local(store, new)  # a directory renamed aside: local stores only (raises on others)
        self.aside = temporary_name(new, "prev-") if old == new else None
        # nothing under the new name yet (we hold the lock): whatever is there later is this save's
        self.fresh = old != new and not os.path.lexists(where)
        self.committed = False

    def begin(self) -> List[CheckpointRecord]:
        """Drop the old entry from the index; returns the records without it."""
        others = [r for r in self.before if r.name != self.old]
        index.write(self.store, others)
        return others

    def done(self) -> None:
        """The new index is committed: the old checkpoint goes."""
        self.committed = True
        self.store.delete(self.aside or self.old)

    def undo(self) -> None:
        """Put the old checkpoint and its index entry back, unless committed (best effort:
        the caller re-raises the save's error, and a scan adopts whatever is left)."""
        if self.committed:
            return
        with suppress(OSError):
            if self.aside is not None and os.path.lexists(_local(self.store, self.aside)):
                self.store.delete(self.new)  # renamed in at the commit, never indexed
                self.store.move(self.aside, self.old)
            elif self.fresh:
                self.store.delete(self.new)
            index.write(self.store, self.before)
