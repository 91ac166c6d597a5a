"""One checkpoint file through torch: durable ``torch.save``, verified and safe ``torch.load``.

Loading is ``weights_only=True`` unless the caller explicitly trusts the file. A
checksum recorded at write time is verified before anything is unpickled, the file is
memory-mapped (verification reads it once, loading adds no second copy), and the same
open file is verified and loaded, so a concurrent writer replacing or deleting the name
cannot make a good file look damaged.

Only damage counts as damage: when ``torch.load`` fails, the file itself is examined
(its checksum, its zip records, its pickle's opcodes). A file that passes is intact,
and the error is the process's (a device this machine lacks, memory, a CUDA error): it
is raised as it is, and the file is never skipped or moved aside for it.
"""

from __future__ import annotations

import _compat_pickle
import errno
import os
import pickle
import pickletools
import re
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from ..errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError, UnsafeCheckpointError
from ..io.checksum import ChecksumWriter, file_checksum
from ..io.posix import open_regular
from ..progress import Progress
from ..storage.base import Store, Written
from . import directread, torchzip

MapLocation = Any
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_PROC_FD = Path("/proc/self/fd")
#: A torch archive holds a pickle, tensor records and small metadata records.
_MAX_RECORDS = 1 << 22


def write(store: Store, name: str, obj: Any, *, nbytes: int, progress: Optional[bool]) -> Written:
    """``torch.save`` ``obj`` as ``name`` in ``store`` with the store's commit protocol.

    The file is torch's format, written by :mod:`~ckpt.format.torchzip` (at offsets,
    from the tensors' memory) where it can, by ``torch.save`` itself otherwise.
    """
    try:
        plan: Optional[torchzip.Plan] = torchzip.Plan(obj)
    except torchzip.Unsupported:
        plan = None

    def produce(f: Any) -> None:
        if plan is None:
            _torch_save(obj, f)
            return
        fd = f.direct() if isinstance(f, ChecksumWriter) else None
        if fd is None:
            plan.stream(f)
        else:
            f.wrote(*plan.write(fd, bar.update))
    with Progress(f"saving {name}", nbytes, progress) as bar:
        return store.write(name, produce, on_write=bar.update)


def _torch_save(obj: Any, f: Any) -> None:
    trusted = isinstance(f, ChecksumWriter) and torch.serialization.get_crc32_options()
    if trusted:  # torch sums every record anyway: the file's checksum reuses those sums
        f.trust_records()
    torch.save(obj, f)
    if trusted:
        f.settle(record_crcs)


def record_crcs(fd: int) -> Dict[int, Tuple[int, int]]:
    """Data offset -> (size, CRC-32) of each stored record of the zip file open as
    ``fd`` (read-write), as its central directory says; {} for anything odd (the
    caller then sums those bytes itself)."""
    found: Dict[int, Tuple[int, int]] = {}
    try:
        with os.fdopen(os.dup(fd), "rb") as f, zipfile.ZipFile(f) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                    continue
                head = os.pread(fd, 30, info.header_offset)
                if len(head) < 30 or head[:4] != b"PK\x03\x04":
                    continue
                name_len, extra_len = struct.unpack("<HH", head[26:30])
                found[info.header_offset + 30 + name_len + extra_len] = (info.file_size, info.CRC)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
        return {}
    return found


@contextmanager
def opened(path: Path) -> Iterator[Path]:
    """A path to the file ``path`` names *now*: on Linux ``/proc/self/fd/N`` of an open
    descriptor, so that verifying and loading read the same inode even if the name is
    replaced or deleted meanwhile. :class:`CheckpointNotFoundError` if it is gone."""
    try:
        f = open_regular(path)
    except FileNotFoundError as e:
        raise gone_error(path) from e
    except IsADirectoryError as e:  # a FIFO or a device would block or never end
        link = isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ELOOP
        what = "is a symbolic link, not a checkpoint file" if link else \
            "is not a regular file (a FIFO, device or directory)"
        raise CorruptCheckpointError(what, path=path, hint="ckpt reads only the regular files it wrote") from e
    with f:
        yield _PROC_FD / str(f.fileno()) if _PROC_FD.is_dir() else path


def verify(path: Path, expected: Optional[str], *, progress: Optional[bool] = None,
           shown: Optional[PurePath] = None) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``path`` matches its recorded checksum."""
    if expected is None:
        return
    shown = shown or path
    with Progress(f"verifying {shown.name}", os.stat(path).st_size, progress) as bar:
        actual = file_checksum(path, bar.update)
    if actual != expected:
        raise CorruptCheckpointError(
            f"checksum mismatch (recorded {expected}, file has {actual}): the file is damaged",
            path=shown, hint="ckpt skips it on resume; restore an earlier checkpoint",
            summary="checksum mismatch: the file is damaged")


def load(path: Path, *, map_location: MapLocation = "cpu", weights_only: bool = True,
         checksum: Optional[str] = None, progress: Optional[bool] = None, mmap: bool = True,
         check_records: bool = False, targets: Optional[directread.Targets] = None) -> Any:
    """Verify and load one file; damage and unsafe pickles raise typed errors.

    ``check_records``: also check every zip record's own CRC-32 (for a file with no
    recorded checksum, so that damage in tensor data is not adopted as good).
    ``targets``: live tensors to read records straight into (see
    :mod:`~ckpt.format.directread`): the result is then a :class:`directread.Loaded`
    whose ``fill()`` must be called once every check passed, before it is applied.
    """
    path = Path(path)
    with opened(path) as real:
        if targets is not None and weights_only and checksum is not None:
            with open(real, "rb", buffering=0) as f:
                loaded = directread.load(f.fileno(), path, checksum=checksum, map_location=map_location,
                                         targets=targets, progress=progress)
            if loaded is not None:
                return loaded
        return load_open(real, path, map_location=map_location, weights_only=weights_only, checksum=checksum,
                         progress=progress, mmap=mmap, check_records=check_records)


def load_open(real: Path, path: PurePath, *, map_location: MapLocation = "cpu", weights_only: bool = True,
              checksum: Optional[str] = None, progress: Optional[bool] = None, mmap: bool = True,
              check_records: bool = False) -> Any:
    """:func:`load` of a file already :func:`opened` as ``real`` (``path`` is its name)."""
    verify(real, checksum, progress=progress, shown=path)
    check_layout(real, path, records=check_records and checksum is None)
    return _load(real, path, map_location, weights_only, mmap)


class _MapLocationFailed(Exception):
    """A callable ``map_location`` raised: the caller's own error, not the file's (it is
    re-raised as it was, whatever its type, and the file is not judged damaged)."""


def _guarded(map_location: MapLocation) -> MapLocation:
    """``map_location``, with a callable's own failures told apart from damage."""
    if not callable(map_location) or isinstance(map_location, torch.device):
        return map_location

    def call(storage: Any, location: str) -> Any:
        try:
            return map_location(storage, location)
        except Exception as e:  # noqa: BLE001 - any failure of the user's function is theirs
            raise _MapLocationFailed() from e
    return call


def _load(real: Path, path: PurePath, map_location: MapLocation, weights_only: bool, mmap: bool) -> Any:
    try:
        return torch.load(real, map_location=_guarded(map_location), weights_only=weights_only, mmap=mmap)
    except _MapLocationFailed as e:  # the caller's own error, as raised: never taken for damage
        raise e.__cause__ or e
    except pickle.UnpicklingError as e:
        examine(real, path, e)  # damaged bytes are damage, whatever torch's message says
        if weights_only:  # an intact pickle the allow-list refuses (a global, or an opcode such as INST)
            raise unsafe_error(real, path, e) from e
        raise  # intact bytes: not damage
    except FileNotFoundError as e:
        raise gone_error(path) from e
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        if mmap and "mmap" in str(e) and not zipfile.is_zipfile(real):  # legacy format cannot be mapped
            return _load(real, path, map_location, weights_only, mmap=False)
        examine(real, path, e)
        if "deserialize object on" in str(e):  # saved on a GPU this machine lacks: not damage
            raise ConfigError(f"the file holds tensors of a device this machine lacks: {first_line(e)}",
                              path=path, hint="pass map_location='cpu' (the default) or a device you have") from e
        raise  # the file is intact: a device, memory or torch problem of this process
    except OSError as e:
        if e.errno != errno.EINVAL:  # EIO, ENOMEM, EMFILE...: retry later, the file may be fine
            raise
        examine(real, path, e)
        raise
    except (EOFError, ValueError, zipfile.BadZipFile, KeyError, IndexError, TypeError, AttributeError,
            struct.error) as e:  # struct.error: a short legacy (non-zip) file
        examine(real, path, e)
        raise CorruptCheckpointError(f"cannot read the file: {first_line(e)}", path=path,
                                     hint="the file does not hold what torch.save writes") from e


def examine(real: Path, path: PurePath, error: BaseException) -> None:
    """Raise :class:`CorruptCheckpointError` (caused by ``error``) if the file's bytes are
    damaged: a zip record fails its CRC, or the pickle is not a well-formed pickle."""
    if not zipfile.is_zipfile(real):  # neither the zip format nor readable: nothing intact to tell
        with open(real, "rb") as f:
            head = f.read(4)
        if head and not head.startswith((b"PK", b"\x80")):  # neither a zip nor a legacy pickle
            raise CorruptCheckpointError(f"is not a file torch.save writes (it starts with {head!r})", path=path,
                                         hint="pass a checkpoint file; if this name held one, it was "
                                              "overwritten by something else") from error
        raise CorruptCheckpointError(f"cannot read the file: {first_line(error)}", path=path,
                                     hint="the file is truncated or damaged") from error
    try:
        check_layout(real, path, records=True)
        with zipfile.ZipFile(real) as archive:
            pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise CorruptCheckpointError("the archive has no data.pkl record", path=path)
            for _ in pickletools.genops(archive.read(pkl)):
                pass
    except CorruptCheckpointError as damage:
        raise damage from error
    except (ValueError, EOFError, zipfile.BadZipFile, KeyError, IndexError) as e:
        raise CorruptCheckpointError(f"cannot read the file: {first_line(e)}", path=path,
                                     hint="the file is truncated or damaged") from error


def check_layout(real: Path, path: PurePath, *, records: bool) -> None:
    """Refuse what ``torch.save`` never writes before reading any of it: compressed or
    oversized records (a small file inflating to gigabytes). ``records=True`` also
    checks each record's CRC-32."""
    if not zipfile.is_zipfile(real):
        return  # legacy torch.save format: no records to check
    try:
        with zipfile.ZipFile(real) as archive:
            infos = archive.infolist()
            if len(infos) > _MAX_RECORDS:
                raise CorruptCheckpointError(f"the archive has {len(infos)} records", path=path)
            size = os.stat(real).st_size
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
                    raise CorruptCheckpointError(
                        f"record {info.filename!r} is compressed ({info.file_size} bytes stored in "
                        f"{info.compress_size}); torch.save never compresses: refused unread", path=path,
                        hint="this is not a file torch.save wrote; do not load it")
            bad = archive.testzip() if records else None
    except FileNotFoundError:
        raise
    except CorruptCheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise CorruptCheckpointError(f"cannot read the archive: {first_line(e)}", path=path,
                                     hint="the file is truncated or damaged") from e
    if bad is not None:
        raise CorruptCheckpointError(f"record {bad!r} fails its CRC-32 check: the file is damaged",
                                     path=path, hint="restore an earlier checkpoint")


def gone_error(path: PurePath) -> CheckpointNotFoundError:
    return CheckpointNotFoundError("the checkpoint file is gone (deleted or moved)", path=path,
                                   hint="list what is there with mgr.refresh() or `ckpt ls DIR`")


def unsafe_globals(real: Path, e: BaseException) -> List[str]:
    """The globals that made a ``weights_only`` load refuse the file, as its pickle names them."""
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(real)))
    except Exception:  # legacy or damaged file: fall back to torch's message
        names = []
    return [_python3_name(n) for n in names or _GLOBAL_RE.findall(str(e))[:1]]


def _python3_name(name: str) -> str:
    """``commands.call`` -> ``subprocess.call``: torch.save pickles with Python 2 names."""
    module, _, attr = name.rpartition(".")
    module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{attr}" if module else attr


def unsafe_error(real: Path, path: PurePath, e: BaseException) -> UnsafeCheckpointError:
    names = unsafe_globals(real, e)
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
