"""Sharded checkpoints as the catalog sees them: a directory, described by its manifest.

A sharded checkpoint (``ckpt-e<epoch>-s<step>.dcp/``, written by
:mod:`ckpt.distributed.sharded`) is one entry of a run directory like a file: its
record's size is the total of its files, its checksum the CRC-32 of its manifest
(which holds the CRC-32 of every other file), its header that of ``ckpt-meta.pt``
(the plain entries). This module reads them without ``torch.distributed``.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Dict

from .. import record, schema
from ..errors import CorruptCheckpointError, StorageError
from ..record import CheckpointRecord
from . import torchfile
from .base import Store
from .checksum import format_checksum
from .local import LocalStore
from .shardfiles import MANIFEST, manifest_bytes, parse_manifest, verify_files

META = "ckpt-meta.pt"


def _local(store: Store, name: str) -> Path:
    """Where a sharded checkpoint lives: only a local (or shared POSIX) directory holds one."""
    if not isinstance(store, LocalStore):
        raise StorageError("sharded checkpoints need a local or shared POSIX filesystem", path=store.where(name),
                           hint="write sharded runs to a shared filesystem; object stores hold single files")
    return Path(store.where(name))


def manifest_checksum(store: Store, name: str) -> str:
    """The checksum a sharded checkpoint's record holds: CRC-32 of its manifest's bytes."""
    return format_checksum(zlib.crc32(manifest_bytes(_local(store, name))))


def verify(store: Store, name: str, expected: Any) -> Dict[str, Any]:
    """Check the manifest against the record, then every file against the manifest."""
    directory = _local(store, name)
    data = manifest_bytes(directory)  # CheckpointNotFoundError without one
    manifest = parse_manifest(data, directory / MANIFEST)
    got = format_checksum(zlib.crc32(data))
    if expected is not None and got != expected:
        raise CorruptCheckpointError(f"manifest checksum {got}, the index says {expected}",
                                     path=directory / MANIFEST,
                                     hint="the manifest was changed after the save; resume from another checkpoint")
    verify_files(directory, manifest)
    return manifest


def load_meta(store: Store, name: str) -> Dict[str, Any]:
    """The plain entries (epoch, step, metrics, extra, RNG, small states) of a sharded checkpoint."""
    obj = torchfile.load(_local(store, name) / META, mmap=False)
    if not isinstance(obj, dict):
        raise CorruptCheckpointError("the plain entries are not a dict", path=_local(store, name) / META)
    return obj


def committed(store: Store, name: str, manifest: Dict[str, Any], meta: Dict[str, Any]) -> CheckpointRecord:
    """The record of a directory this process just committed (its files are not read again)."""
    directory = _local(store, name)
    head = schema.header(meta, str(directory))
    size = sum(int(f["size"]) for f in manifest["files"].values()) + (directory / MANIFEST).stat().st_size
    extra = meta.get("extra")
    return record.make(head, directory, size=size, checksum=manifest_checksum(store, name),
                       extra=dict(extra) if isinstance(extra, dict) else {})


def describe(store: Store, name: str) -> CheckpointRecord:
    """A record for a sharded checkpoint the index does not list (verified first)."""
    directory = _local(store, name)
    verify(store, name, None)
    obj = load_meta(store, name)
    head = schema.header(obj, str(directory))
    if head.key != schema.parse_name(name):
        raise CorruptCheckpointError(f"holds epoch {head.epoch}, step {head.step}, which does not match its name",
                                     path=directory)
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    extra = obj.get("extra")
    return record.make(head, directory, size=size, checksum=manifest_checksum(store, name),
                       extra=dict(extra) if isinstance(extra, dict) else {})
