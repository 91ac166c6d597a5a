"""Single checkpoint files in a trainer's own format, written with ckpt's commit protocol.

A file ``NAME`` is the exact bytes ``torch.save`` writes, so the trainer's stock loader
reads it; a small sidecar ``NAME.ckpt-sum`` (JSON: size, CRC-32, step numbers) lets ckpt
verify it before loading. A file without a sidecar (written without ckpt) is verified
by its zip records' own CRC-32.

A save never makes a file visible before the record that verifies it is durable. In a
local directory (the store's capabilities name a real directory, where a rename is free):

1. the file is committed under a staging name, ``NAME.ckpt-next`` (temporary name,
   fsync, rename, directory fsync), which gives its size and CRC-32;
2. its record is committed as ``NAME.ckpt-sum-next`` (the pending sidecar);
3. ``NAME.ckpt-next`` is renamed to ``NAME`` (replacing the previous file, whose own
   sidecar still describes it until then);
4. ``NAME.ckpt-sum-next`` is renamed to ``NAME.ckpt-sum``.

A kill between 3 and 4 leaves ``NAME`` with a pending sidecar that matches it: readers
take that record (:func:`current`), and the next writer finishes the step
(:func:`settle`), which also rolls a save killed after 2 forward, drops what a save
killed before 2 left, and drops sidecars whose file a killed removal deleted. At every
instant each committed file has a record that verifies it (see docs/howto/lightning.md).

On an object store (no rename: a "move" is a full copy) the file is written once, under
its final key, with the store's own commit protocol (the object first, its commit
record last: until then the name is not listed, so nothing a resume would load):

1. the previous sidecar of ``NAME``, if there is one, is deleted (it describes bytes
   about to be replaced);
2. the file is committed as ``NAME``;
3. its sidecar ``NAME.ckpt-sum`` is committed.

A kill before 3 leaves ``NAME`` (the previous or the new one) without a sidecar: it is
verified by its zip records, as a file written without ckpt. A name being rewritten
(Lightning's ``last.ckpt``) is not there while it uploads; the run's other checkpoints
are.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import PurePath
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, Union

from ..errors import CheckpointNotFoundError, CkptError, CorruptCheckpointError
from ..format import torchfile
from ..io.checksum import file_checksum
from ..storage import Store, is_url, open_existing, open_store
from ..storage.base import Written, capabilities

SIDECAR = ".ckpt-sum"
#: The sidecar of a file not renamed in yet, and that file (steps 2 and 1 of the module doc).
PENDING = SIDECAR + "-next"
STAGED = ".ckpt-next"
PathLike = Union[str, "os.PathLike[str]"]
Record = Dict[str, Any]


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
    """Commit ``obj`` as ``name`` (torch.save format) and its sidecar, staged as in the
    module doc, under the directory's writer lock. ``clean``: first settle what killed
    writers left (:func:`settle`). A plug-in keeps a :class:`Directory` instead."""
    if clean:
        store.clean_temporaries()
    with store.lock(commit=True):
        if clean:
            settle(store)
        _save_staged(store, name, obj, numbers)


def _record(written: Written, numbers: Mapping[str, Any]) -> bytes:
    record = {"size": written.size, "checksum": written.checksum, "time": time.time(), **numbers}
    return json.dumps(record, sort_keys=True).encode()


def _save_staged(store: Store, name: str, obj: Mapping[str, Any], numbers: Mapping[str, Any]) -> None:
    written = torchfile.write(store, name + STAGED, obj, nbytes=0, progress=False)
    data = _record(written, numbers)
    store.write(name + PENDING, lambda f: f.write(data))
    store.move(name + STAGED, name)
    store.move(name + PENDING, name + SIDECAR)


class Directory:
    """The directory a plug-in writes its checkpoints to: what killed writers left is
    settled once, when it is opened; each save then commits as the module doc says for
    this store (staged renames in a local directory, one write per file on an object store)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        caps = capabilities(store)
        #: A real directory: renames are free, so a save is staged (module doc).
        self.staged = caps.local_root is not None
        self.release = caps.release
        store.clean_temporaries()
        with store.lock(commit=True):
            settle(store)
            self._names = set(store.list())  # this writer's own view from now on (one writer per run)

    def save(self, name: str, obj: Mapping[str, Any], numbers: Mapping[str, Any]) -> None:
        with self.store.lock(commit=True):
            if self.staged:
                _save_staged(self.store, name, obj, numbers)
                return
            for old in (name + SIDECAR, name + PENDING):
                if old in self._names:  # it describes bytes about to be replaced
                    self.store.delete(old)
                    self._names.discard(old)
            written = torchfile.write(self.store, name, obj, nbytes=0, progress=False)
            self._names.add(name)
            data = _record(written, numbers)
            self.store.write(name + SIDECAR, lambda f: f.write(data))
            self._names.add(name + SIDECAR)

    def remove(self, name: str) -> None:
        remove(self.store, name)
        self._names -= {name, name + SIDECAR}


def _read_record(store: Store, name: str) -> Optional[Record]:
    try:
        record = json.loads(store.read_bytes(name))
    except (FileNotFoundError, ValueError, OSError, CkptError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("checksum"), str) else None


def sidecar(store: Store, name: str) -> Optional[Record]:
    """The recorded size/checksum/numbers of ``name``; None when it has no (readable) sidecar."""
    return _read_record(store, name + SIDECAR)


def _matches(store: Store, name: str, record: Record) -> bool:
    """Whether ``name``'s bytes are the ones ``record`` describes."""
    try:
        with store.local_path(name) as local:
            return bool(os.stat(local).st_size == record.get("size") and file_checksum(local) == record["checksum"])
    except (FileNotFoundError, OSError, CkptError):
        return False


def current(store: Store, name: str, listed: Optional[Set[str]] = None) -> Optional[Record]:
    """The record that describes ``name`` now: its sidecar's, or the pending one's when a
    save was killed after renaming the file in (step 3) and the file matches it.
    ``listed``: the names in the directory, when the caller has them (saves a read)."""
    pending = None if listed is not None and name + PENDING not in listed else _read_record(store, name + PENDING)
    if pending is not None and _matches(store, name, pending):
        return pending
    return sidecar(store, name)


def settle(store: Store) -> List[str]:
    """Finish or undo what killed saves and removals left (the caller holds the lock):
    a pending sidecar whose file is complete is rolled forward, anything else a save
    killed half-way left goes, and so does a sidecar whose file is gone. What it did."""
    names = set(store.list())
    done: List[str] = []
    for pending in sorted(n for n in names if n.endswith(PENDING)):
        name, record = pending[: -len(PENDING)], _read_record(store, pending)
        if record is not None and name + STAGED in names and _matches(store, name + STAGED, record):
            store.move(name + STAGED, name)  # killed before step 3: everything was durable
            names |= {name}
        if record is not None and name in names and _matches(store, name, record):
            store.move(pending, name + SIDECAR)  # killed before step 4
            names |= {name + SIDECAR}
            done.append(f"completed the save of {name}")
        else:
            store.delete(pending)
    listed = set(store.list())
    for staged in sorted(n for n in listed if n.endswith(STAGED)):  # killed before step 2
        store.delete(staged)
        done.append(f"removed the unfinished {staged}")
    for side in sorted(n for n in listed if n.endswith(SIDECAR)):
        if side[: -len(SIDECAR)] not in listed:  # a removal killed between its two deletes
            store.delete(side)
            done.append(f"removed the orphan {side}")
    return done


def load(store: Store, name: str, *, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """Verify ``name`` (its record's checksum, or its zip records) and load it."""
    record = current(store, name)
    try:
        with store.local_path(name) as local:
            return torchfile.load(local, map_location=map_location, weights_only=weights_only,
                                  checksum=record["checksum"] if record else None, mmap=False,
                                  check_records=record is None)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError("the checkpoint file does not exist", path=str(store.where(name)),
                                      hint="pass an existing file, or last_checkpoint(directory)") from e


def remove(store: Store, name: str) -> None:
    """Delete ``name``, then its sidecar (a kill in between leaves an orphan :func:`settle` drops)."""
    store.delete(name)
    store.delete(name + SIDECAR)


Keyed = Tuple[Tuple[Any, ...], str, Optional[Record], Optional[Any]]


def _keyed(store: Store, names: Set[str], suffix: str, keys: Tuple[str, ...],
           read_numbers: Callable[[Any], Tuple[Any, ...]]) -> List[Keyed]:
    """(order key, name, record, loaded file) of each candidate; unreadable files without
    a record are skipped with a warning here."""
    keyed: List[Keyed] = []
    for name in (n for n in names if n.endswith(suffix)):
        record = current(store, name, names)
        if record is not None:
            keyed.append((tuple(record.get(k, -1) for k in keys) + (record.get("time", 0.0),), name, record, None))
            continue
        try:  # written without ckpt: the file itself says where it stands
            loaded = load(store, name)
        except (CorruptCheckpointError, CheckpointNotFoundError) as e:
            warnings.warn(f"skipping damaged checkpoint {store.where(name)}: {e}", stacklevel=4)
            continue
        except Exception as e:  # noqa: BLE001 - any unreadable file is not a resume point
            warnings.warn(f"skipping unreadable checkpoint {store.where(name)}: {e}", stacklevel=4)
            continue
        keyed.append((read_numbers(loaded) + (0.0,), name, None, loaded))
    return keyed


def newest(directory: str, *, suffix: str, keys: Tuple[str, ...], read_numbers: Callable[[Any], Tuple[Any, ...]],
           storage_options: Optional[Mapping[str, Any]] = None) -> Optional[PurePath]:
    """The newest file ending in ``suffix`` under ``directory`` that verifies; damaged or
    half-written ones are skipped with a warning. None when there is none."""
    try:
        store = store_for(directory, storage_options, create=False)
        names = set(store.list())
    except (FileNotFoundError, NotADirectoryError):
        return None
    keyed = _keyed(store, names, suffix, keys, read_numbers)
    keyed.sort(key=lambda t: (t[0], t[1]), reverse=True)
    for _, name, record, loaded in keyed:
        if loaded is not None:
            return store.where(name)
        try:
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
