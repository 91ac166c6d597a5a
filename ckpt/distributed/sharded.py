"""Sharded checkpoints: a directory written by ``torch.distributed.checkpoint`` (DCP), committed atomically.

A committed checkpoint directory holds::

    .metadata, __<rank>_<n>.distcp   DCP: model and optimizer state, each rank writing its own shards
    ckpt-meta.pt                     rank 0: the plain entries (epoch, step, metrics, extra, per-rank
                                     RNG, header); loads with torch.load(weights_only=True)
    ckpt-manifest.json               rank 0, last: format, world size, what each state is, and the
                                     size and CRC-32 of every other file

Save (every rank): capture, then agree; DCP writes into ``tmp_dir`` through
:class:`~.shardio.SummingWriter`, which takes each file's CRC-32 as its bytes stream out
and fsyncs it once (nothing is read back), then agree and gather the checksums; rank 0
writes the manifest, fsyncs it and the directory, renames ``tmp_dir`` to ``final_dir``
and fsyncs the parent, then agree -- so a rank that fails or
is killed at any step makes every other rank raise (bounded: see ckpt.distributed) and
nothing appears under ``final_dir``. Load: every rank reads its slices through DCP,
which reshards, each file's checksum summed as it is read: a checkpoint saved by 2 ranks loads on
1, 2 or 3, and in a plain process with no process group at all.

Findings on torch 2.13 (CPU build, gloo):

- FSDP2 works on CPU: ``fully_shard(module, mesh=init_device_mesh("cpu", (world,)))``
  trains (forward, backward, optimizer step) over gloo; parameters are ``DTensor``
  sharded on dim 0, with uneven shards padded. The tests use it directly.
- Model and optimizer state go through ``torch.distributed.checkpoint.state_dict``:
  ``get_model_state_dict(model)`` / ``get_optimizer_state_dict(model, optimizer)``
  (sharded DTensors, keyed by parameter name), loaded back in place with ``dcp.load``
  into the same calls' output on the new layout, then ``set_model_state_dict`` /
  ``set_optimizer_state_dict``. An optimizer is paired with the tracked module that
  owns its parameters.
- DCP's collectives run on ``Group.control``, ckpt's gloo group with a timeout, not on
  the training group: they stay bounded, and would work the same beside NCCL.
- DCP raises ``CheckpointException``, a ``BaseException``: ``except Exception`` misses it.
- ``dcp.save``/``dcp.load`` without a process group (``no_dist``) warn on every call;
  ckpt passes ``no_dist`` itself and silences that one warning.
- DCP unpickles ``.metadata`` with plain ``pickle`` and non-tensor entries (optimizer
  hyperparameters) with ``torch.load(weights_only=False)``: loading is only as safe as the
  directory. ckpt first unpickles ``.metadata`` with an allow-list of DCP's metadata
  classes and checks every non-tensor entry with ``weights_only=True``, so a sharded
  checkpoint is held to the same rule as a single file.
- ``format_utils.dcp_to_torch_save`` is the model for :func:`export_single`; it uses
  the private ``_load_state_dict`` and ``_EmptyStateDictLoadPlanner``, as ckpt does (to
  rebuild a state dict from the metadata alone), with the checks above added.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any, NamedTuple, TypeVar, cast

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ..errors import (
    CkptError,
    ConfigError,
    CorruptCheckpointError,
    StateMismatchError,
    StorageError,
    storage_error,
)
from ..format import torchio
from ..format.shardfiles import (
    FORMAT,
    MANIFEST,
    META,
    VERSION,
    fsync_dir,
    read_manifest,
    verify_files,
)
from ..storage.base import Store
from ..storage.trees import LocalTree, Tree, as_tree
from .collective import Group, agree, broadcast_object, sync
from .shardread import reader_for
from .shardsafe import Held, SafeEmptyPlanner, SafeLoadPlanner, check_metadata, open_checkpoint, torch_load
from .targets import LocalTarget, for_tree

__all__ = ["MANIFEST", "META", "Captured", "capture", "export_single", "load_sharded", "read_manifest", "save_sharded",
           "verify_files"]
_T = TypeVar("_T")
Trackable = torch.nn.Module | torch.optim.Optimizer


def save_sharded(ctx: Group, tmp_dir: Path, final_dir: Path, states: Mapping[str, Trackable],
                 meta: Mapping[str, Any], *, timeout: float, aside: Path | None = None) -> dict[str, Any]:
    """Write ``states`` (modules and optimizers, through DCP) and ``meta`` (plain values,
    rank 0) as the checkpoint directory ``final_dir``; collective. Returns the manifest.

    ``tmp_dir`` is a scratch name beside ``final_dir`` (same filesystem); a leftover of a
    crashed save under that name is removed first. A rank that fails or dies before every
    rank's files are written leaves nothing under ``final_dir``; one that dies after that
    finds the checkpoint committed (it is complete), while the others still raise.
    ``aside`` (rank 0): an existing ``final_dir`` is replaced, and moved there at the
    commit rename; until then, and if the save fails, it stays as it is.
    """
    return save_to(ctx, LocalTarget(ctx, Path(tmp_dir), Path(final_dir), aside), states, meta, timeout=timeout)


class Captured(NamedTuple):
    """What :func:`capture` took of the modules and optimizers: their kinds and DCP state
    dicts (an asynchronous save stages these and writes them later)."""

    kinds: dict[str, str]
    state: dict[str, Any]


def capture(states: Mapping[str, Trackable]) -> Captured:
    """The kinds (``"module"``/``"optimizer"``) and DCP state dicts of ``states`` (local: no collective)."""
    return Captured(*_capture(states))


def save_into(ctx: Group, store: Store, name: str, tmp: str, states: Mapping[str, Trackable] | Captured,
              meta: Mapping[str, Any], *, timeout: float, aside: Path | None = None) -> dict[str, Any]:
    """:func:`save_to` the sharded checkpoint ``name`` of ``store`` (``tmp``: its scratch
    name where the store renames); collective."""
    target = for_tree(ctx, store.tree(name), tmp, aside=aside, timeout=timeout)
    return save_to(ctx, target, states, meta, timeout=timeout)


def save_to(ctx: Group, target: Any, states: Mapping[str, Trackable] | Captured, meta: Mapping[str, Any], *,
            timeout: float) -> dict[str, Any]:
    """:func:`save_sharded` into any target of :mod:`.targets` (a directory, an object
    store, a tiered cache); collective. Returns the manifest. ``states`` may be
    :func:`capture`'s result, taken earlier (its tensors staged in host buffers)."""
    shown = target.shown
    what = f"save of {PurePath(shown).name}"
    sums: dict[str, dict[str, int]] = {}

    def prepare() -> dict[str, Any]:
        kinds, state = states if isinstance(states, Captured) else _capture(states)
        clash = sorted(set(kinds) & set(meta))
        if clash:
            raise ConfigError(f"{clash} name both a tracked state and a plain entry", path=shown,
                              hint="rename the extra entries")
        target.begin()
        if ctx.is_leader:
            sums[META] = target.meta(dict(meta))
        return {"kinds": kinds, "state": state}

    def write() -> dict[str, dict[str, int]]:
        writer = target.writer()  # each file checksummed as it is written, fsynced once
        with _quiet_no_dist():
            dcp_save(captured["state"], storage_writer=writer, process_group=ctx.control, no_dist=not ctx.active)
        return {**sums, **writer.sums}  # this rank's __<rank>_<n>.distcp; rank 0's .metadata too

    def finish() -> dict[str, Any]:
        return cast(dict[str, Any], target.commit(manifest, known)) if ctx.is_leader else manifest

    try:
        captured = _step(ctx, f"{what} (capture)", timeout, prepare, shown, StorageError)
        mine = _step(ctx, f"{what} (write)", timeout, write, shown, StorageError)
        known = {k: v for sums in sync(ctx, f"{what} (checksums)", timeout=timeout, payload=mine) for k, v in
                 sums.items()}
        manifest = {"format": FORMAT, "version": VERSION, "world_size": ctx.world_size, "states": captured["kinds"]}
        manifest = _step(ctx, f"{what} (commit)", timeout, finish, shown, StorageError)
        manifest = cast(dict[str, Any], broadcast_object(ctx, manifest, timeout=timeout, what=f"{what} (manifest)"))
    except BaseException:
        target.discard()
        raise
    target.after(manifest, mine)
    return manifest


def load_sharded(ctx: Group, final_dir: Path | Tree, states: Mapping[str, Trackable], *, timeout: float,
                 strict: bool = True, verify: bool = True, held: Held | None = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_sharded` (a local directory, or a store's
    tree: :mod:`ckpt.storage.trees`) into ``states``, on any number of ranks (DCP reshards);
    collective. Returns the plain entries (``ckpt-meta.pt``).

    Rank 0 alone reads the manifest, DCP's metadata and the plain entries (``held``: it
    read them already, :func:`~.shardsafe.leader_read`); the other ranks get them from it
    (:func:`~.shardsafe.open_checkpoint`) and read only their shards. With ``verify``,
    each shard file's CRC-32 is summed while it loads, by the rank that reads most of it
    (:class:`~.shardread.DirectReader`): a damaged file raises
    :class:`~ckpt.errors.CorruptCheckpointError` on every rank, after the tensors were
    partly written (load another checkpoint then). ``strict=False`` skips tracked
    states the checkpoint lacks.
    """
    tree = as_tree(final_dir)
    shown = tree.where()
    what = f"load of {PurePath(shown).name}"
    opened = open_checkpoint(ctx, tree, timeout=timeout, what=what, held=held)
    manifest = opened.manifest

    def read() -> None:
        missing = [n for n in states if n not in manifest["states"]]
        if missing and strict:
            raise StateMismatchError(f"the checkpoint has no state for {missing}", path=shown,
                                     hint="pass strict=False to restore the other objects")
        present = {n: obj for n, obj in states.items() if n in manifest["states"]}
        kinds, state = _capture(present)
        wrong = [f"{n}: saved {manifest['states'][n]}, given {k}" for n, k in kinds.items()
                 if manifest["states"][n] != k]
        if wrong:
            raise StateMismatchError(f"tracked objects differ from the saved ones ({'; '.join(wrong)})",
                                     path=shown, hint="track the same kinds of objects under the same names")
        with _quiet_no_dist():
            dcp_load(state, storage_reader=reader_for(tree, opened.metadata, opened.shards if verify else None),
                     planner=SafeLoadPlanner(allow_partial_load=not strict),
                     process_group=ctx.control, no_dist=not ctx.active)
        options = StateDictOptions(strict=strict)
        modules = _modules(present)
        for name, obj in present.items():
            if isinstance(obj, torch.nn.Module):
                set_model_state_dict(obj, state[name], options=options)
            else:
                set_optimizer_state_dict(_owner(name, obj, modules), obj, state[name], options=options)

    _step(ctx, f"{what} (load)", timeout, read, shown, StateMismatchError)
    return opened.meta


def export_single(final_dir: Path, out_path: Path, *, verify: bool = True) -> Path:
    """One plain ``torch.save`` file of a sharded checkpoint's full state, in the
    single-process layout (optimizers numbered like ``optimizer.state_dict()``); loads with
    ``torch.load(weights_only=True)``. Single process; holds the whole state in memory."""
    final_dir, out_path = Path(final_dir), Path(out_path)
    manifest = read_manifest(final_dir)
    if verify:
        verify_files(final_dir, manifest)
    check_metadata(LocalTree(final_dir))
    full: dict[str, Any] = {}
    try:
        _load_state_dict(full, storage_reader=FileSystemReader(final_dir),
                         planner=SafeEmptyPlanner(), no_dist=True)  # type: ignore[no-untyped-call]
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        raise _translate(e, final_dir, CorruptCheckpointError) from e
    out = torch_load(LocalTree(final_dir), META)
    for name, kind in manifest["states"].items():
        if name not in full:
            raise CorruptCheckpointError(f"the DCP files hold no {name!r}, which the manifest lists", path=final_dir)
        out[name] = _numbered(full[name]) if kind == "optimizer" else full[name]
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torchio.save(out, f)
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
        fsync_dir(out_path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write the export: {e}", path=out_path,
                           hint="check free space and permissions") from e
    return out_path


def _step(ctx: Group, what: str, timeout: float, fn: Callable[[], _T], path: PurePath | os.PathLike[str],
          kind: type[CkptError]) -> _T:
    """Run this rank's part of ``what``, then agree with every rank on the outcome. DCP
    raises the failures it gathered on every rank: only its lowest failing rank reports
    one, so every other rank raises that rank's error, with its ``rank`` (see :func:`agree`)."""
    try:
        result = fn()
    except (Exception, CheckpointException) as e:  # every failure must reach the others
        error = _translate(e, path, kind)
        if error is not e:
            error.__cause__ = e
        mine = not isinstance(e, CheckpointException) or min(e.failures) == ctx.rank
        agree(ctx, what, error if mine else None, timeout=timeout)
        raise error  # agree() raised already (the failing rank reported it)
    agree(ctx, what, None, timeout=timeout)
    return result


def _translate(e: BaseException, path: PurePath | os.PathLike[str], kind: type[CkptError]) -> BaseException:
    """ckpt's errors as they are; DCP's and the rest as ``kind`` (with this rank's message)."""
    if isinstance(e, CkptError):
        return e
    if isinstance(e, CheckpointException):
        first = min(e.failures)
        inner = e.failures[first][0]
        if isinstance(inner, CkptError):
            return inner
        if isinstance(inner, OSError) and kind is StorageError:  # a full or read-only disk: its errno and hint
            return storage_error(inner, path, "writing the shards")
        msg = f"{type(inner).__name__} on rank {first}: {inner}"
    else:
        msg = f"{type(e).__name__}: {e}"
    if kind is StateMismatchError and ("Missing key" in msg or "Size mismatch" in msg or "size mismatch" in msg):
        return StateMismatchError(f"the checkpoint does not fit the tracked objects ({msg})", path=path,
                                  hint="build the model with the same architecture as when it was saved")
    return kind(msg, path=path)


def _capture(states: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """(name -> "module"/"optimizer", name -> DCP state dict) of the tracked objects."""
    modules = _modules(states)
    kinds: dict[str, str] = {}
    state: dict[str, Any] = {}
    for name, obj in states.items():
        if isinstance(obj, torch.nn.Module):
            kinds[name], state[name] = "module", get_model_state_dict(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            kinds[name], state[name] = "optimizer", get_optimizer_state_dict(_owner(name, obj, modules), obj)
        else:
            raise ConfigError(f"{name!r} ({type(obj).__name__}) is neither a module nor an optimizer",
                              hint="sharded states are modules and optimizers; put other state "
                                   "(schedulers, samplers) in the plain entries")
    return kinds, state


def _modules(states: Mapping[str, Any]) -> list[torch.nn.Module]:
    return [obj for obj in states.values() if isinstance(obj, torch.nn.Module)]


def _owner(name: str, optimizer: torch.optim.Optimizer, modules: list[torch.nn.Module]) -> torch.nn.Module:
    """The tracked module holding every parameter of ``optimizer`` (DCP keys optimizer
    state by that module's parameter names)."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in modules:
        if params <= {id(p) for p in module.parameters()}:
            return module
    raise ConfigError(f"optimizer {name!r} has parameters outside every tracked module",
                      hint="track the model the optimizer was built from, in the same save()")


def _numbered(optim: Mapping[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state (DCP's) keyed by position, like ``Optimizer.state_dict()``."""
    ids: dict[str, int] = {}
    groups = [{**g, "params": [ids.setdefault(p, len(ids)) for p in g["params"]]} for g in optim["param_groups"]]
    return {"state": {ids[p]: s for p, s in optim.get("state", {}).items()}, "param_groups": groups}


@contextlib.contextmanager
def _quiet_no_dist() -> Iterator[None]:
    """DCP warns on every call made without a process group, even when asked to (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
