"""The files of a sharded checkpoint directory: manifest, checksums, atomic commit.

The manifest (``ckpt-manifest.json``, written last, by rank 0) lists every other file
with its size and CRC-32, says what each tracked state is and how many ranks wrote
it. A directory without one is an unfinished save. Stdlib only: no torch, no ranks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, BinaryIO, Protocol

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError, wrapped
from ..io.checksum import crc32, stream_crc
from ..io.posix import open_regular, read_regular
from ..storage.trees import Tree

MANIFEST = "ckpt-manifest.json"
#: The plain entries (epoch, step, metrics, RNG, small states) of a sharded checkpoint.
META = "ckpt-meta.pt"
FORMAT = "ckpt-sharded"
VERSION = 1
_CHUNK = 4 << 20
_THREADS = 4  # files verified at once (local disks)


def read_manifest(final_dir: Path) -> dict[str, Any]:
    """The manifest of a committed sharded checkpoint; typed errors when absent or damaged."""
    path = Path(final_dir) / MANIFEST
    return parse_manifest(manifest_bytes(final_dir), path)


def manifest_bytes(final_dir: Path) -> bytes:
    """The manifest's bytes, read without blocking: a FIFO or device in its place is damage."""
    path = Path(final_dir) / MANIFEST
    try:
        return read_regular(path)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError("not a committed sharded checkpoint (no manifest)", path=final_dir,
                                      hint="a directory without ckpt-manifest.json is an unfinished save") from e
    except OSError as e:
        raise _damaged(path, f"unreadable manifest ({e.strerror or e}); expected a regular JSON file") from e


def manifest_of(tree: Tree) -> bytes:
    """A sharded checkpoint's manifest bytes, from any store's tree (typed errors without one)."""
    local = tree.capabilities().local_only
    if local is not None:
        return manifest_bytes(local)  # typed errors for a missing or unreadable one
    try:
        return tree.read_bytes(MANIFEST)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError("not a committed sharded checkpoint (no manifest)", path=tree.where(),
                                      hint="a directory without ckpt-manifest.json is an unfinished save") from e


def parse_manifest(data: bytes, path: PurePath) -> dict[str, Any]:
    """The manifest ``data`` (read from ``path``), checked field by field: whatever ckpt
    did not write is :class:`CorruptCheckpointError`, never a raw ``TypeError``."""
    try:
        manifest = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError as e:
        raise _damaged(path, "the manifest is nested too deeply to be one ckpt wrote") from e
    except ValueError as e:  # also UnicodeDecodeError
        raise _damaged(path, f"the manifest is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _damaged(path, f'not a ckpt sharded-checkpoint manifest; expected a JSON object with '
                             f'"format": "{FORMAT}"')
    version: Any = manifest.get("version")
    if not _count(version, least=1):
        raise _damaged(path, f'"version" is {_show(version)}; expected a positive integer such as {VERSION}')
    if version > VERSION:
        raise FormatVersionError(f"manifest version {version} is newer than this ckpt reads ({VERSION})",
                                 path=path, hint="upgrade ckpt")
    if not _count(manifest.get("world_size"), least=1):
        raise _damaged(path, f'"world_size" is {_show(manifest.get("world_size"))}; expected a positive integer')
    states = manifest.get("states")
    if not isinstance(states, dict):
        raise _damaged(path, f'"states" is {_show(states)}; expected an object mapping each tracked name to '
                             '"module" or "optimizer"')
    for name, kind in states.items():
        if kind not in ("module", "optimizer"):
            raise _damaged(path, f'"states"[{name!r}] is {_show(kind)}; expected "module" or "optimizer"')
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _damaged(path, f'"files" is {_show(files)}; expected an object mapping each file of the '
                             'checkpoint to its size and CRC-32')
    for name, entry in files.items():
        if not _inside(name):
            raise _damaged(path, f'"files" lists {name!r}; expected names relative to the checkpoint directory')
        if not (isinstance(entry, dict) and _count(entry.get("size")) and _count(entry.get("crc32"))
                and entry["crc32"] < 1 << 32):
            raise _damaged(path, f'"files"[{name!r}] is {_show(entry)}; expected '
                                 '{"size": <bytes>, "crc32": <0..4294967295>}')
    return manifest


def _damaged(path: PurePath, message: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(message, path=path,
                                  hint="the manifest was damaged or edited after the save: resume skips this "
                                       "checkpoint (moved aside as *.corrupt); restore another one")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _count(value: Any, least: int = 0) -> bool:
    """An int of at least ``least`` (JSON ``true`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _inside(name: str) -> bool:
    """A name inside the directory (not absolute, no ``..``): verifying reads nothing else."""
    parts = PurePosixPath(name).parts
    return bool(name) and not name.startswith("/") and ".." not in parts


def _show(value: Any) -> str:
    """``value`` for a message: its JSON, or the kind of a container (which may be huge)."""
    if isinstance(value, (dict, list)):
        return "a JSON " + ("object" if isinstance(value, dict) else "array")
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Files(Protocol):
    """A directory of files, local or not (:mod:`ckpt.storage.trees`)."""

    def where(self, rel: str = "") -> PurePath: ...

    def open(self, rel: str) -> AbstractContextManager[BinaryIO]: ...


class _Directory:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def where(self, rel: str = "") -> PurePath:
        return self.path / rel

    def open(self, rel: str) -> AbstractContextManager[BinaryIO]:
        return open_regular(self.path / rel)  # a FIFO in a file's place must not block


def verify_files(final_dir: Path | Files, manifest: Mapping[str, Any], *,
                 held: Mapping[str, bytes] | None = None) -> None:
    """Raise :class:`CorruptCheckpointError` unless every listed file has its size and CRC-32
    (``final_dir``: a local directory, or a store's tree of files; pass a local tree's
    directory, ``capabilities().local_only``, to have it read in parallel). ``held``: files whose
    bytes the caller read already, checked from memory. Local files are read by a few
    threads at once (the reads and the CRC release the GIL; a disk serves parallel
    reads faster than one stream); the first damaged file in the manifest's order is
    reported."""
    files = _Directory(final_dir) if isinstance(final_dir, (str, os.PathLike)) else final_dir
    held = held or {}
    todo = [(name, want) for name, want in manifest["files"].items() if name not in held]
    for name, data in held.items():
        check_bytes(files.where(name), data, manifest["files"].get(name))
    if len(todo) > 1 and isinstance(files, _Directory):
        with ThreadPoolExecutor(min(_THREADS, len(todo)), thread_name_prefix="ckpt-verify") as pool:
            errors = list(pool.map(lambda item: _check_file(files, *item), todo))
    else:
        errors = [_check_file(files, name, want) for name, want in todo]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def check_bytes(path: PurePath, data: bytes, want: Mapping[str, int] | None) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``data`` (read whole from ``path``) has
    the size and CRC-32 the manifest lists for it (``want``; None: it lists none)."""
    if want is None:
        raise CorruptCheckpointError("the manifest does not list this file", path=path,
                                     hint="the manifest was damaged or edited after the save")
    _compare(path, len(data), crc32(data), want)


def _check_file(files: Files, name: str, want: Mapping[str, int]) -> CorruptCheckpointError | None:
    path = files.where(name)
    try:
        with files.open(name) as f:
            size, crc = stream_crc(f, _CHUNK)
        _compare(path, size, crc, want)
    except OSError as e:
        return wrapped(CorruptCheckpointError, "a file of the checkpoint is unreadable", e, path=path,
                       hint="the file was damaged after the save; resume from an older checkpoint")
    except CorruptCheckpointError as e:
        return e
    return None


def _compare(path: PurePath, size: int, crc: int, want: Mapping[str, int]) -> None:
    if (size, crc) != (want["size"], want["crc32"]):
        raise CorruptCheckpointError(
            f"checksum mismatch: {size} bytes, CRC-32 {crc:08x}; the manifest says "
            f"{want['size']} bytes, {want['crc32']:08x}", path=path,
            hint="the file was damaged after the save; resume from an older checkpoint",
            summary="checksum mismatch: the file is damaged")


def commit(tmp_dir: Path, final_dir: Path, manifest: dict[str, Any],
           known: Mapping[str, Mapping[str, int]] | None = None, *, aside: Path | None = None,
           elsewhere: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, Any]:
    """Rank 0, once every rank's files are written: take each file's size and CRC-32 from
    ``known`` (checksummed as they were written, and fsynced, by the rank that wrote
    them; any other file is read, checksummed and fsynced here), write the manifest,
    fsync the directory, rename it to ``final_dir`` and fsync the parent, so the name
    appears only for a complete checkpoint, and survives a power cut once it has.
    ``aside``: where an existing ``final_dir`` goes (an overwrite; see ``_swap``).
    ``elsewhere``: the files of other machines' caches, listed as they are."""
    files: dict[str, Any] = {}
    known = known or {}
    for path in sorted(p for p in tmp_dir.rglob("*") if p.is_file()):
        name = path.relative_to(tmp_dir).as_posix()
        if name in known and known[name]["size"] == path.stat().st_size:
            files[name] = dict(known[name])
            continue
        with open(path, "rb") as f:
            files[name] = {"size": os.fstat(f.fileno()).st_size, "crc32": stream_crc(f, _CHUNK)[1]}
            os.fsync(f.fileno())
    for name, entry in (elsewhere or {}).items():  # files that other machines hold (a per-node cache)
        files.setdefault(name, dict(entry))
    manifest = {**manifest, "files": dict(sorted(files.items()))}
    with open(tmp_dir / MANIFEST, "wb") as f:
        f.write(encode_manifest(manifest))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp_dir)
    _swap(tmp_dir, final_dir, aside)
    fsync_dir(final_dir.parent)
    return manifest


def encode_manifest(manifest: Mapping[str, Any]) -> bytes:
    """The manifest's bytes as ckpt writes them (their CRC-32 is the checkpoint's checksum)."""
    return json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")


def _swap(tmp_dir: Path, final_dir: Path, aside: Path | None) -> None:
    """Rename ``tmp_dir`` to ``final_dir``. A directory cannot replace a non-empty one: an
    existing ``final_dir`` (an overwrite) moves to ``aside`` first, and back if the second
    rename fails. A crash between the two leaves it there, and the next open puts it back
    (:meth:`ckpt.storage.local.LocalStore.clean_temporaries`)."""
    if aside is None or not os.path.lexists(final_dir):
        os.replace(tmp_dir, final_dir)
        return
    os.replace(final_dir, aside)
    try:
        os.replace(tmp_dir, final_dir)
    except BaseException:
        os.replace(aside, final_dir)
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op on Windows, which cannot)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
