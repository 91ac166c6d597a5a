"""Single checkpoint files in a trainer's own format, written with ckpt's commit protocol.

A file ``NAME`` is committed through a :class:`~ckpt.store.base.Store` (temporary name,
fsync, rename, directory fsync; commit-last on object stores) and then described by a
small sidecar ``NAME.ckpt-sum`` (JSON: size, CRC-32, step numbers), committed the same
way. The checkpoint file itself is exactly what ``torch.save`` writes, so the trainer's
stock loader reads it; the sidecar only lets ckpt verify it before loading. A file
without a sidecar (written without ckpt) is verified by its zip records' own CRC-32.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import PurePath
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from ..errors import CheckpointNotFoundError, CkptError, CorruptCheckpointError
from ..store import Store, is_url, open_existing, open_store, torchfile

SIDECAR = ".ckpt-sum"
PathLike = Union[str, "os.PathLike[str]"]


def split(path: PathLike) -> Tuple[str, str]:
    """(directory, file name) of a local path or URL."""
    text = os.fspath(path)
    if is_url(text):
        head, _, name = text.rstrip("/").rpartition("/")
        return head, name
    text = text[len("file://"):] if text.startswith("file://") else text
    return os.path.dirname(os.path.abspath(text)), os.path.basename(text)


def store_for(directory: str, storage_options: Optional[Mapping[str, Any]] = None, *,
              create: bool = True) -> Store:
    return open_store(directory, storage_options) if create else open_existing(directory, storage_options)


def save(store: Store, name: str, obj: Mapping[str, Any], numbers: Mapping[str, Any], *,
         clean: bool = False) -> None:
    """Commit ``obj`` as ``name`` (torch.save format), then its sidecar, under the
    directory's writer lock. ``clean``: first remove what killed writers left."""
    if clean:
        store.clean_temporaries()
    with store.lock():
        written = torchfile.write(store, name, obj, nbytes=0, progress=False)
        record = {"size": written.size, "checksum": written.checksum, "time": time.time(), **numbers}
        data = json.dumps(record, sort_keys=True).encode()
        store.write(name + SIDECAR, lambda f: f.write(data))


def sidecar(store: Store, name: str) -> Optional[Dict[str, Any]]:
    """The recorded size/checksum/numbers of ``name``; None when it has no (readable) sidecar."""
    try:
        record = json.loads(store.read_bytes(name + SIDECAR))
    except (FileNotFoundError, ValueError, OSError, CkptError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("checksum"), str) else None


def load(store: Store, name: str, *, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """Verify ``name`` (its sidecar's checksum, or its zip records) and load it."""
    record = sidecar(store, name)
    try:
        with store.local_path(name) as local:
            return torchfile.load(local, map_location=map_location, weights_only=weights_only,
                                  checksum=record["checksum"] if record else None, mmap=False,
                                  check_records=record is None)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError("the checkpoint file does not exist", path=str(store.where(name)),
                                      hint="pass an existing file, or last_checkpoint(directory)") from e


def remove(store: Store, name: str) -> None:
    store.delete(name)
    store.delete(name + SIDECAR)


def _numbers(store: Store, name: str, keys: Tuple[str, ...]) -> Optional[Tuple[Any, ...]]:
    """The order key of ``name``: its numbers, from the sidecar or (without one) the file."""
    record = sidecar(store, name)
    if record is not None:
        return tuple(record.get(k, -1) for k in keys) + (record.get("time", 0.0),)
    return None


def newest(directory: str, *, suffix: str, keys: Tuple[str, ...], read_numbers: Callable[[Any], Tuple[Any, ...]],
           storage_options: Optional[Mapping[str, Any]] = None) -> Optional[PurePath]:
    """The newest file ending in ``suffix`` under ``directory`` that verifies; damaged or
    half-written ones are skipped with a warning. None when there is none."""
    try:
        store = store_for(directory, storage_options, create=False)
        names = [n for n in store.list() if n.endswith(suffix)]
    except (FileNotFoundError, NotADirectoryError):
        return None
    keyed: List[Tuple[Tuple[Any, ...], str, Optional[Any]]] = []
    for name in names:
        key = _numbers(store, name, keys)
        loaded = None
        if key is None:  # written without ckpt: the file itself says where it stands
            try:
                loaded = load(store, name)
                key = read_numbers(loaded) + (0.0,)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                warnings.warn(f"skipping damaged checkpoint {store.where(name)}: {e}", stacklevel=3)
                continue
            except Exception as e:  # noqa: BLE001 - any unreadable file is not a resume point
                warnings.warn(f"skipping unreadable checkpoint {store.where(name)}: {e}", stacklevel=3)
                continue
        keyed.append((key, name, loaded))
    keyed.sort(key=lambda t: (t[0], t[1]), reverse=True)
    for _, name, loaded in keyed:
        if loaded is not None:
            return store.where(name)
        try:
            record = sidecar(store, name)
            with store.local_path(name) as local:
                torchfile.verify(local, record["checksum"] if record else None, shown=store.where(name))
                if record is not None and os.stat(local).st_size != record["size"]:
                    raise CorruptCheckpointError("size differs from the recorded size", path=store.where(name))
            return store.where(name)
        except (CorruptCheckpointError, FileNotFoundError, OSError) as e:
            warnings.warn(f"skipping damaged checkpoint {store.where(name)}: {e}", stacklevel=3)
    return None


def corrupt_error(error: CorruptCheckpointError, path: str, good: Optional[PurePath]) -> CorruptCheckpointError:
    """``error`` again, with a hint naming the newest checkpoint that verifies."""
    hint = (f"the newest checkpoint that verifies is {good}: resume from it (last_checkpoint(directory))"
            if good is not None else "no checkpoint in that directory verifies; start the run again")
    return CorruptCheckpointError(error.message, path=path, hint=hint)
