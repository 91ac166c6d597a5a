"""Reading a sharded checkpoint safely: the manifest, DCP's metadata and the plain entries.

DCP unpickles ``.metadata`` with plain ``pickle`` and non-tensor entries (optimizer
hyperparameters) with ``torch.load(weights_only=False)``: loading is only as safe as the
directory. ckpt first unpickles ``.metadata`` with an allow-list of DCP's metadata
classes and checks every non-tensor entry with ``weights_only=True``, so a sharded
checkpoint is held to the same rule as a single file (see docs/howto/fsdp2.md).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

from ..errors import CorruptCheckpointError, UnsafeCheckpointError
from ..format import torchio
from ..storage.trees import Tree


def torch_load(tree: Tree, rel: str) -> dict[str, Any]:
    path = tree.where(rel)
    try:
        loaded = torchio.load(io.BytesIO(tree.read_bytes(rel)))
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"refusing to unpickle: {e}", path=path) from e
    except (OSError, RuntimeError, EOFError) as e:
        raise CorruptCheckpointError(f"cannot read the plain entries: {e}", path=path) from e
    if not isinstance(loaded, dict):
        raise CorruptCheckpointError("the plain entries are not a dict", path=path)
    return loaded


_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                   ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                   ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                   ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` with nothing but its own classes, torch dtypes and paths."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_NAMES or module in _METADATA_MODULES or module == "torch":  # import only these
            found = super().find_class(module, name)
            if ((module, name) in _METADATA_NAMES or isinstance(found, torch.dtype)
                    or (isinstance(found, type) and found.__module__ == module != "torch")):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata type")


def check_metadata(tree: Tree) -> None:
    path = tree.where(".metadata")
    try:
        _MetadataUnpickler(io.BytesIO(tree.read_bytes(".metadata"))).load()  # a FIFO in its place must not block
    except (pickle.UnpicklingError, AttributeError, ImportError) as e:
        raise UnsafeCheckpointError(f"refusing to unpickle DCP metadata: {e}", path=path,
                                    hint="only load sharded checkpoints written by ckpt/DCP") from e
    except (OSError, EOFError, ValueError) as e:
        raise CorruptCheckpointError(f"unreadable DCP metadata: {e}", path=path) from e


class _SafeBytes:
    """Load-planner mixin: a non-tensor entry must load with ``weights_only=True`` before DCP
    (which uses ``weights_only=False``) may unpickle it."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            torchio.load(value)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"refusing to unpickle entry {read_item.dest_index.fqn!r}: {e}") from e
        value.seek(0)
        super().load_bytes(read_item, value)  # type: ignore[misc]


class SafeLoadPlanner(_SafeBytes, DefaultLoadPlanner):
    pass


class SafeEmptyPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    pass
