"""Reading and writing checkpoint files with torch: safe loading, verification, errors.

Loading is ``weights_only=True`` unless the caller explicitly trusts the file. A
checksum recorded at write time is verified before anything is unpickled, and the
file is memory-mapped, so verification reads it once and loading adds no second copy.
"""

from __future__ import annotations

import _compat_pickle
import errno
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, List, Optional

import torch

from . import storage
from .errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError, UnsafeCheckpointError
from .progress import Progress

MapLocation = Any
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
#: torch.load's RuntimeErrors that mean the bytes are bad (zip reader, unpickler, storages).
_ARCHIVE_ERROR = re.compile(r"PytorchStreamReader|zip archive|central directory|file not found|"
                            r"storage|invalid load key|unpickl|truncated|size mismatch|out of range", re.I)


def write(directory: Path, name: str, obj: Any, *, nbytes: int, progress: Optional[bool]) -> storage.Written:
    """``torch.save`` ``obj`` as ``directory/name`` with the full commit protocol."""
    with Progress(f"saving {name}", nbytes, progress) as bar:
        return storage.atomic_write(directory, name, lambda f: torch.save(obj, f), bar.update)


def verify(path: Path, expected: Optional[str], *, progress: Optional[bool] = None) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``path`` matches its recorded checksum."""
    if expected is None:
        return
    size = path.stat().st_size
    with Progress(f"verifying {path.name}", size, progress) as bar:
        actual = storage.file_checksum(path, bar.update)
    if actual != expected:
        raise CorruptCheckpointError(
            f"checksum mismatch (recorded {expected}, file has {actual}): the file is damaged",
            path=path, hint="ckpt skips it on resume; restore an earlier checkpoint")


def load(path: Path, *, map_location: MapLocation = "cpu", weights_only: bool = True,
         checksum: Optional[str] = None, progress: Optional[bool] = None, mmap: bool = True) -> Any:
    """Verify and load one file; damage and unsafe pickles raise typed errors."""
    path = Path(path)
    try:
        verify(path, checksum, progress=progress)
    except FileNotFoundError as e:
        raise gone_error(path) from e
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as e:
        if weights_only and _GLOBAL_RE.search(str(e)):  # code needs a global; garbage does not
            raise unsafe_error(path, e) from e
        raise CorruptCheckpointError(f"cannot unpickle the file ({e})", path=path) from e
    except FileNotFoundError as e:
        raise gone_error(path) from e
    except RuntimeError as e:
        if "deserialize object on" in str(e):  # saved on a GPU this machine lacks: not damage
            raise ConfigError(f"the file holds tensors of a device this machine lacks: {first_line(e)}",
                              path=path, hint="pass map_location='cpu' (the default) or a device you have") from e
        if mmap and "mmap" in str(e):  # legacy (non-zip) torch.save format cannot be mapped
            return load(path, map_location=map_location, weights_only=weights_only,
                        progress=progress, mmap=False)
        if isinstance(e, torch.OutOfMemoryError) or not _ARCHIVE_ERROR.search(str(e)):
            raise  # out of memory, a CUDA error...: a problem of this process, not of the file
        raise CorruptCheckpointError(f"cannot read the file: {first_line(e)}", path=path,
                                     hint="the file is truncated or damaged") from e
    except OSError as e:
        if e.errno != errno.EINVAL:  # EIO, ENOMEM, EMFILE...: retry later, the file may be fine
            raise
        raise CorruptCheckpointError(f"cannot read the file: {first_line(e)}", path=path,
                                     hint="the file is truncated or damaged") from e
    except (EOFError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as e:
        raise CorruptCheckpointError(f"cannot read the file: {first_line(e)}", path=path,
                                     hint="the file is truncated or damaged") from e


def gone_error(path: Path) -> CheckpointNotFoundError:
    return CheckpointNotFoundError("the checkpoint file is gone (deleted or moved)", path=path,
                                   hint="list what is there with mgr.refresh() or `python -m ckpt list DIR`")


def check_archive(path: Path) -> None:
    """Verify the CRC-32 that ``torch.save`` stores for each record of its zip archive.

    The fallback when no checksum was recorded (a rebuilt index): it catches damage in
    the tensor data that unpickling alone, with memory-mapped tensors, would not notice.
    """
    if not zipfile.is_zipfile(path):
        return  # legacy torch.save format: no per-record checksums to check
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except FileNotFoundError:
        raise  # gone (say, evicted by a concurrent writer): not damage
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CorruptCheckpointError(f"cannot read the archive: {first_line(e)}", path=path,
                                     hint="the file is truncated or damaged") from e
    if bad is not None:
        raise CorruptCheckpointError(f"record {bad!r} fails its CRC-32 check: the file is damaged",
                                     path=path, hint="restore an earlier checkpoint")


def unsafe_globals(path: Path, e: BaseException) -> List[str]:
    """The globals that made a ``weights_only`` load refuse ``path``, as the pickle names them."""
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy or damaged file: fall back to torch's message
        names = []
    return [_python3_name(n) for n in names or _GLOBAL_RE.findall(str(e))[:1]]


def _python3_name(name: str) -> str:
    """``commands.call`` -> ``subprocess.call``: torch.save pickles with Python 2 names."""
    module, _, attr = name.rpartition(".")
    module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{attr}" if module else attr


def unsafe_error(path: Path, e: BaseException) -> UnsafeCheckpointError:
    names = unsafe_globals(path, e)
    what = (f"the global {names[0]!r}" if len(names) == 1 else f"the globals {', '.join(map(repr, names))}"
            if names else "a type outside the weights_only allow-list")
    return UnsafeCheckpointError(
        f"refused to load: its pickle names {what}, and loading it could run code", path=path,
        hint="only if you trust where the file came from, opt in to running its code with "
             "weights_only=False: CheckpointManager(..., weights_only=False), or "
             "torch.load(path, weights_only=False) yourself")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
