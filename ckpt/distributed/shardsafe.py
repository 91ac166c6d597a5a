"""Reading a sharded checkpoint safely: the manifest, DCP's metadata and the plain entries.

DCP unpickles ``.metadata`` with plain ``pickle`` and non-tensor entries (optimizer
hyperparameters) with ``torch.load(weights_only=False)``: loading is only as safe as the
directory. ckpt first unpickles ``.metadata`` with an allow-list of DCP's metadata
classes and checks every non-tensor entry with ``weights_only=True``, so a sharded
checkpoint is held to the same rule as a single file (see docs/howto/fsdp2.md).

:func:`open_checkpoint`: rank 0 alone reads those three files (once: when resume()
chose the checkpoint, :func:`leader_read`), checks the two against the manifest's
CRC-32, and broadcasts their bytes; every rank parses them with the same checks, and
DCP's reader takes the parsed metadata instead of opening ``.metadata`` itself (see
docs/explanation/performance-internals.md).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import ReadItem

from .. import errors
from ..errors import CkptError, CorruptCheckpointError, UnsafeCheckpointError
from ..format import torchio
from ..format.shardfiles import MANIFEST, META, check_bytes, manifest_of, parse_manifest
from ..storage.trees import Tree
from .collective import Group, broadcast_object

METADATA = ".metadata"


def torch_load(tree: Tree, rel: str) -> dict[str, Any]:
    return parse_meta(tree.read_bytes(rel), tree, rel)


def parse_meta(data: bytes, tree: Tree, rel: str = META) -> dict[str, Any]:
    """The plain entries ``data`` (the bytes of ``rel``), loaded with ``weights_only=True``."""
    path = tree.where(rel)
    try:
        loaded = torchio.load(io.BytesIO(data))
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
    parse_metadata(_read(tree, METADATA), tree)


def _read(tree: Tree, rel: str, what: str = "DCP metadata") -> bytes:
    try:
        return tree.read_bytes(rel)  # a FIFO in its place must not block
    except OSError as e:
        raise CorruptCheckpointError(f"unreadable {what}: {e}", path=tree.where(rel)) from e


def parse_metadata(data: bytes, tree: Tree) -> Metadata:
    """DCP's metadata ``data`` (the bytes of ``.metadata``), unpickled with the allow-list."""
    path = tree.where(METADATA)
    try:
        loaded = _MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, AttributeError, ImportError) as e:
        raise UnsafeCheckpointError(f"refusing to unpickle DCP metadata: {e}", path=path,
                                    hint="only load sharded checkpoints written by ckpt/DCP") from e
    except (OSError, EOFError, ValueError) as e:
        raise CorruptCheckpointError(f"unreadable DCP metadata: {e}", path=path) from e
    if not isinstance(loaded, Metadata):
        raise CorruptCheckpointError(f"DCP metadata holds a {type(loaded).__name__}, not DCP's Metadata", path=path)
    return loaded


@dataclass(frozen=True)
class Opened:
    """A sharded checkpoint's small files, as every rank has them after :func:`open_checkpoint`."""

    manifest: dict[str, Any]
    metadata: Metadata
    meta: dict[str, Any]

    @property
    def shards(self) -> dict[str, dict[str, int]]:
        """Size and CRC-32 of every file but the two checked already (the shards, verified
        while they load: :class:`~.shardread.DirectReader`)."""
        return {name: want for name, want in self.manifest["files"].items() if name not in (METADATA, META)}


#: What rank 0 read to choose a checkpoint: its manifest (parsed, checked against the
#: index), and the bytes of ``.metadata`` and ``ckpt-meta.pt`` (checked against it).
Held = tuple[dict[str, Any], bytes, bytes]


def open_checkpoint(ctx: Group, tree: Tree, *, timeout: float, what: str, held: Held | None = None) -> Opened:
    """Collective: rank 0 reads the manifest, ``.metadata`` and ``ckpt-meta.pt`` once
    (``held``: it read them already, to choose this checkpoint, see :func:`leader_read`),
    checks the two against the manifest, and broadcasts the bytes; no other rank opens
    them. Rank 0's error is raised on every rank as the same typed error, with the same
    path and hint. The shard files are verified while they load, not here."""
    outcome: tuple[Any, ...] | None = None
    error: BaseException | None = None
    if ctx.is_leader:
        try:
            outcome = ("ok", *(held if held is not None else leader_read(tree)))
        except Exception as e:  # noqa: BLE001 - every failure must reach the others
            error = e if isinstance(e, CkptError) else CorruptCheckpointError(f"{type(e).__name__}: {e}",
                                                                              path=tree.where())
            assert isinstance(error, CkptError)
            outcome = ("err", type(error).__name__, error.message, error.path, error.hint)
    got = broadcast_object(ctx, outcome, timeout=timeout, what=f"{what} (manifest)")
    if error is not None:
        raise error
    if got[0] == "err":
        kind = getattr(errors, got[1], None)
        kind = kind if isinstance(kind, type) and issubclass(kind, CkptError) else CorruptCheckpointError
        raise kind(f"{got[2]} (read by rank 0)", path=got[3], hint=got[4])
    manifest, metadata, meta = got[1:]
    return Opened(manifest, parse_metadata(metadata, tree), parse_meta(meta, tree))


def leader_read(tree: Tree, manifest: dict[str, Any] | None = None) -> Held:
    """Rank 0: the manifest (parsed; ``manifest``: read already), the bytes of ``.metadata``
    and ``ckpt-meta.pt``, both parsed with their allow-lists and checked against it."""
    if manifest is None:
        manifest = parse_manifest(manifest_of(tree), tree.where(MANIFEST))
    metadata, meta = _read(tree, METADATA), _read(tree, META, "plain entries")
    parse_metadata(metadata, tree)
    parse_meta(meta, tree)
    for name, data in {METADATA: metadata, META: meta}.items():  # read whole: checked from memory
        check_bytes(tree.where(name), data, manifest["files"].get(name))
    return manifest, metadata, meta


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
