"""PyTorch Lightning: a ``CheckpointIO`` plug-in with atomic, durable, verified and
exactly resumable checkpoints (``pip install 'ckpt[lightning]'``).

::

    from ckpt.integrations.lightning import CheckpointIO, last_checkpoint
    trainer = Trainer(plugins=[CheckpointIO()],
                      callbacks=[ModelCheckpoint(dirpath="runs/exp1", save_last=True)])
    trainer.fit(model, datamodule=dm, ckpt_path=last_checkpoint("runs/exp1"))

Files keep Lightning's format (a dict written by ``torch.save``): Lightning's stock
``TorchCheckpointIO`` loads them, and this plug-in loads files written without it
(verified by their zip records). Each file gets a ``NAME.ckpt-sum`` sidecar with its
size and CRC-32, checked before the file is unpickled. The checkpoint dict also holds
the Python, NumPy, torch and CUDA RNG states under ``"ckpt_rng"``; they are restored
when the file is loaded, so a resumed ``fit`` equals the uninterrupted one bit for bit.

What it does not cover:

* Under DDP only rank 0 calls a ``CheckpointIO``: the RNG states saved are rank 0's.
  Add :class:`RankRNG` to the callbacks to save and restore every rank's states.
* ``FSDPStrategy(state_dict_type="full")`` saves through this plug-in but loads the
  file itself (not verified, ``"ckpt_rng"`` not restored: use ``last_checkpoint`` and
  :class:`RankRNG`). Sharded FSDP, ``ModelParallelStrategy`` (distributed checkpoints)
  and DeepSpeed write through their own path and never call it: those saves get none of
  ckpt's guarantees (see docs/howto/lightning.md).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import PurePath
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..errors import CorruptCheckpointError
from ..state import capture_rng, restore_rng
from . import _files

try:
    import lightning.pytorch as pl
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as _Base
except ImportError:
    try:
        import pytorch_lightning as pl
        from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO as _Base
    except ImportError as e:
        raise ImportError("ckpt.integrations.lightning needs PyTorch Lightning: "
                          "pip install 'ckpt[lightning]'") from e

__all__ = ["CheckpointIO", "RankRNG", "last_checkpoint"]

RNG_KEY = "ckpt_rng"
RANKS_KEY = "ckpt_rng_ranks"
SUFFIX = ".ckpt"
_KEYS = ("global_step", "epoch")


def _numbers(checkpoint: Any) -> Tuple[Any, ...]:
    return tuple(int(checkpoint.get(k, -1)) if isinstance(checkpoint, dict) else -1 for k in _KEYS)


def last_checkpoint(directory: _files.PathLike, storage_options: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """The newest complete ``*.ckpt`` file in ``directory`` that verifies, or None.

    Ordered by Lightning's ``global_step`` then ``epoch`` (never by file time); damaged
    and half-written files are skipped with a warning. Works on URLs (fsspec).
    """
    found = _files.newest(str(directory), suffix=SUFFIX, keys=_KEYS, read_numbers=_numbers,
                          storage_options=storage_options)
    return None if found is None else str(found)


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_clone(v) for v in obj]
        return type(obj)(items) if not hasattr(obj, "_fields") else type(obj)(*items)
    return obj


class CheckpointIO(_Base):  # type: ignore[misc]  # Lightning is untyped for mypy here
    """Lightning's ``CheckpointIO`` with ckpt's commit protocol, checksums and RNG states.

    ``async_save=True`` writes on a background thread (the checkpoint's tensors are
    copied first, so training may go on). A removal (``ModelCheckpoint``'s top-k
    rotation) waits until every save started before it has committed: the previous
    file is never deleted while its successor is being written. ``storage_options`` go
    to fsspec for URLs. ``weights_only`` is the default for loads that do not say.
    """

    def __init__(self, *, async_save: bool = False, storage_options: Optional[Dict[str, Any]] = None,
                 weights_only: bool = True) -> None:
        super().__init__()
        self.async_save = async_save
        self.storage_options = storage_options
        self.weights_only = weights_only
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: List[Future[None]] = []
        self._lock = threading.Lock()
        self._dirs: Dict[str, _files.Directory] = {}  # one writer per directory (an object store's writer lease)

    def save_checkpoint(self, checkpoint: Dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        state = dict(checkpoint)
        state[RNG_KEY] = capture_rng()
        options = storage_options if storage_options is not None else self.storage_options
        if not self.async_save:
            self._write(state, path, options)
            return
        self._raise_failed()
        state = _clone(state)
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-lightning")
            self._pending.append(self._executor.submit(self._write, state, path, options))

    def _write(self, state: Dict[str, Any], path: Any, options: Optional[Any]) -> None:
        directory, name = _files.split(path)
        self._writer(directory, options).save(name, state, dict(zip(_KEYS, _numbers(state))))

    def _writer(self, directory: str, options: Optional[Any]) -> _files.Directory:
        with self._lock:
            found = self._dirs.get(directory)
            if found is None:  # a killed run's leftovers are settled once per directory
                found = self._dirs[directory] = _files.Directory(_files.store_for(directory, options))
            return found

    def load_checkpoint(self, path: Any, map_location: Optional[Callable[..., Any]] = None,
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        """Verify and load ``path``; restores the RNG states saved with it.

        A damaged file raises :class:`~ckpt.errors.CorruptCheckpointError` naming it and
        the newest checkpoint in its directory that verifies.
        """
        self.wait()
        directory, name = _files.split(path)
        store = _files.store_for(directory, self.storage_options, create=False)
        try:
            checkpoint: Dict[str, Any] = _files.load(
                store, name, map_location=map_location if map_location is not None else "cpu",
                weights_only=self.weights_only if weights_only is None else weights_only)
        except CorruptCheckpointError as e:
            good = last_checkpoint(directory, self.storage_options)
            raise _files.corrupt_error(e, str(path), PurePath(good) if good else None) from e
        rng = checkpoint.get(RNG_KEY)
        if rng is not None:
            restore_rng(rng, str(path))
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        self.wait()  # never delete the previous file while its successor is being written
        directory, name = _files.split(path)
        with self._lock:
            found = self._dirs.get(directory)
        if found is not None:
            found.remove(name)
        else:
            _files.remove(_files.store_for(directory, self.storage_options, create=False), name)

    def wait(self) -> None:
        """Block until every background save has committed; re-raise the first failure."""
        with self._lock:
            pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            raise failed

    def _raise_failed(self) -> None:
        with self._lock:
            done = [f for f in self._pending if f.done()]
            self._pending = [f for f in self._pending if not f.done()]
        failed = next((f.exception() for f in done if f.exception() is not None), None)
        if failed is not None:
            raise failed

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            with self._lock:
                executor, self._executor = self._executor, None
                dirs, self._dirs = list(self._dirs.values()), {}
            if executor is not None:
                executor.shutdown(wait=True)
            for found in dirs:  # frees an object store's writer lease at once
                if found.release is not None:
                    found.release()


class RankRNG(pl.Callback):  # type: ignore[misc]
    """Saves every rank's RNG states in the checkpoint (all-gathered to rank 0, which
    writes the file) and restores each rank's own on load. Needed only under DDP."""

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        states = [capture_rng()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: List[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, capture_rng())
            states = gathered
        checkpoint[RANKS_KEY] = states

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Dict[str, Any]) -> None:
        states = checkpoint.get(RANKS_KEY)
        rank = int(trainer.global_rank)
        if isinstance(states, list) and rank < len(states) and states[rank] is not None:
            restore_rng(states[rank], "the checkpoint")
