"""torch's file format for everything but the committed checkpoint itself.

With :mod:`ckpt.format.torchfile` (which commits, verifies and loads a run directory's
checkpoint files) this is the format layer: the only code in ckpt that calls
``torch.save`` and ``torch.load``. Here are the plain files around the checkpoints
(a ``save_model`` file, an export, the plain entries of a sharded checkpoint, a tensor
file of a differential save) and :func:`read_extra`, which reads a checkpoint's
``extra`` entry without reading its tensors.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path, PurePath
from typing import IO, Any, Dict, Optional, Union

import torch

from ..errors import CorruptCheckpointError
from . import torchfile

Source = Union[str, Path, IO[bytes]]


def save(obj: Any, f: Union[str, Path, IO[bytes]]) -> None:
    """``torch.save`` ``obj`` to ``f`` (a path or an open binary file; the caller makes it durable)."""
    torch.save(obj, f)


def load(source: Source, *, map_location: Any = "cpu", weights_only: bool = True, mmap: bool = False) -> Any:
    """``torch.load`` of ``source``, ``weights_only`` unless the caller trusts it. Errors are
    torch's own: callers that read a run directory's checkpoints use :func:`torchfile.load`,
    which turns damage into typed errors."""
    return torch.load(source, map_location=map_location, weights_only=weights_only, mmap=mmap)


def read_extra(path: Path, *, shown: Optional[PurePath] = None) -> Dict[str, Any]:
    """The ``extra`` dict of the checkpoint file ``path``, read from its pickle alone.

    The pickle record is checked against its CRC-32 and unpickled under the
    ``weights_only`` allow-list with every tensor left unread (on the ``meta`` device).
    An ``extra`` that holds tensors itself is loaded from the whole file (mapped, then
    copied, so the file is not pinned). A legacy (non-zip) file is loaded whole.
    """
    shown = shown or path
    with torchfile.opened(path) as real:
        torchfile.check_layout(real, shown, records=False)
        obj = _pickle_only(real, shown) if zipfile.is_zipfile(real) else None
        extra = _extra_of(obj)
        if obj is None or _has_meta_tensor(extra):
            obj = torchfile.load_open(real, shown, mmap=False)
            extra = _extra_of(obj)
    return extra


def _extra_of(obj: Any) -> Dict[str, Any]:
    extra = obj.get("extra", {}) if isinstance(obj, dict) else {}
    return dict(extra) if isinstance(extra, dict) else {}


def _pickle_only(real: Path, shown: PurePath) -> Any:
    """The archive's object with meta tensors in place of its storages (None if the
    allow-list refuses it: the full load then says why)."""
    try:
        with zipfile.ZipFile(real) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                raise CorruptCheckpointError("the archive has no data.pkl record", path=shown)
            data = archive.read(name)  # zipfile checks the record's CRC-32
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise CorruptCheckpointError(f"cannot read the pickle: {torchfile.first_line(e)}", path=shown,
                                     hint="the file is damaged; restore an earlier checkpoint") from e
    from torch import _weights_only_unpickler

    unpickler: Any = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = _meta_storage
    try:
        return unpickler.load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError):
        return None  # refused or odd: the full load classifies it (damage, unsafe, device)


def _meta_storage(saved_id: Any) -> Any:
    """A storage of the recorded size and dtype on the ``meta`` device: nothing is read."""
    _, storage_type, _, _, numel = saved_id
    dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
    storages: Any = torch  # torch's storage constructors are untyped
    storage = storages.UntypedStorage(numel * torch.empty(0, dtype=dtype).element_size(), device="meta")
    return storages.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)


def _has_meta_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device.type == "meta"
    if isinstance(value, dict):
        return any(_has_meta_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_meta_tensor(v) for v in value)
    return False
