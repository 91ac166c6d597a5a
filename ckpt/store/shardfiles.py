"""The files of a sharded checkpoint directory: manifest, checksums, atomic commit.

The manifest (``ckpt-manifest.json``, written last, by rank 0) lists every other file
with its size and CRC-32, says what each tracked state is and how many ranks wrote
it. A directory without one is an unfinished save. Stdlib only: no torch, no ranks.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError

MANIFEST = "ckpt-manifest.json"
FORMAT = "ckpt-sharded"
VERSION = 1
_CHUNK = 1 << 20


def read_manifest(final_dir: Path) -> dict[str, Any]:
    """The manifest of a committed sharded checkpoint; typed errors when absent or damaged."""
    path = Path(final_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointNotFoundError("not a committed sharded checkpoint (no manifest)", path=final_dir,
                                      hint="a directory without ckpt-manifest.json is an unfinished save") from e
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"unreadable manifest: {e}", path=path) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptCheckpointError("not a ckpt sharded-checkpoint manifest", path=path)
    if manifest.get("version", VERSION + 1) > VERSION:
        raise FormatVersionError(f"manifest version {manifest.get('version')} is newer than this "
                                     f"ckpt reads ({VERSION})", path=path, hint="upgrade ckpt")
    return manifest


def verify_files(final_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Raise :class:`CorruptCheckpointError` unless every listed file has its size and CRC-32."""
    for name, want in manifest["files"].items():
        path = Path(final_dir) / name
        try:
            with open(path, "rb") as f:
                size, crc = os.fstat(f.fileno()).st_size, _crc32(f)
        except OSError as e:
            raise CorruptCheckpointError(f"a file of the checkpoint is unreadable: {e}", path=path) from e
        if (size, crc) != (want["size"], want["crc32"]):
            raise CorruptCheckpointError(
                f"checksum mismatch: {size} bytes, CRC-32 {crc:08x}; the manifest says "
                f"{want['size']} bytes, {want['crc32']:08x}", path=path,
                hint="the file was damaged after the save; resume from an older checkpoint")


def checksums(directory: Path, prefix: str) -> dict[str, dict[str, int]]:
    """Size and CRC-32 of the files in ``directory`` whose names start with ``prefix``
    (one rank's shards), each fsynced: every rank checks its own files, in parallel."""
    out = {}
    for path in sorted(p for p in Path(directory).glob(f"{prefix}*") if p.is_file()):
        with open(path, "rb") as f:
            out[path.name] = {"size": os.fstat(f.fileno()).st_size, "crc32": _crc32(f)}
            os.fsync(f.fileno())
    return out


def commit(tmp_dir: Path, final_dir: Path, manifest: dict[str, Any],
           known: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, Any]:
    """Rank 0, once every rank's files are written: checksum and fsync each file (those in
    ``known`` were checked and fsynced by the rank that wrote them), write the manifest,
    fsync the directory, rename it to ``final_dir`` and fsync the parent, so the name
    appears only for a complete checkpoint, and survives a power cut once it has."""
    files: dict[str, Any] = {}
    known = known or {}
    for path in sorted(p for p in tmp_dir.rglob("*") if p.is_file()):
        name = path.relative_to(tmp_dir).as_posix()
        if name in known and known[name]["size"] == path.stat().st_size:
            files[name] = dict(known[name])
            continue
        with open(path, "rb") as f:
            files[name] = {"size": os.fstat(f.fileno()).st_size, "crc32": _crc32(f)}
            os.fsync(f.fileno())
    manifest = {**manifest, "files": files}
    with open(tmp_dir / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp_dir)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    return manifest


def _crc32(f: BinaryIO) -> int:
    crc = 0
    while chunk := f.read(_CHUNK):
        crc = zlib.crc32(chunk, crc)
    return crc


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op on Windows, which cannot)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
