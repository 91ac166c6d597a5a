"""Reading and writing checkpoint files with torch: safe loading, verification, errors.

Loading is ``weights_only=True`` unless the caller explicitly trusts the file. A
checksum recorded at write time is verified before anything is unpickled, and the
file is memory-mapped, so verification reads it once and loading adds no second copy.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from . import storage
from .errors import CorruptCheckpointError, UnsafeCheckpointError
from .progress import Progress

MapLocation = Any
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


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
    verify(path, checksum, progress=progress)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as e:
        if weights_only and "weights_only" in str(e).lower().replace(" ", "_"):
            raise unsafe_error(path, e) from e
        raise CorruptCheckpointError(f"cannot unpickle the file ({e})", path=path) from e
    except FileNotFoundError:
        raise
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # legacy (non-zip) torch.save format cannot be mapped
            return load(path, map_location=map_location, weights_only=weights_only,
                        progress=progress, mmap=False)
        raise CorruptCheckpointError(f"cannot read the file: {first_line(e)}", path=path,
                                     hint="the file is truncated or damaged") from e
    except (EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError) as e:
        raise CorruptCheckpointError(f"cannot read the file: {first_line(e)}", path=path,
                                     hint="the file is truncated or damaged") from e


def unsafe_error(path: Path, e: BaseException) -> UnsafeCheckpointError:
    found = _GLOBAL_RE.search(str(e))
    name = found.group(1) if found else None
    what = f"the global {name!r}" if name else "a type outside the weights_only allow-list"
    return UnsafeCheckpointError(
        f"refused to load: its pickle names {what}, and loading it could run code", path=path,
        hint="load it only if you trust its origin: pass weights_only=False "
             "(CheckpointManager(..., weights_only=False) or ckpt.load(..., weights_only=False))")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
