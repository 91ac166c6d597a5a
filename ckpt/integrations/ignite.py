"""pytorch-ignite: a ``BaseSaveHandler`` with atomic, durable, checksummed files
(``pip install 'ckpt[ignite]'``).

::

    from ckpt.integrations.ignite import CkptSaver, RNGState, last_checkpoint, load
    to_save = {"model": model, "optimizer": opt, "trainer": trainer, "rng": RNGState()}
    handler = Checkpoint(to_save, CkptSaver("runs/exp1"), n_saved=2,
                         global_step_transform=global_step_from_engine(trainer))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, handler)
    path = last_checkpoint("runs/exp1")
    if path:
        Checkpoint.load_objects(to_load=to_save, checkpoint=load(path))  # or checkpoint=path

Files are what ignite's ``DiskSaver`` writes (``torch.save`` of the checkpoint dict), so
``Checkpoint.load_objects(checkpoint=path)`` reads them; a ``NAME.ckpt-sum`` sidecar
holds the size and CRC-32 that :func:`load` and :func:`last_checkpoint` verify.

ignite's ``Checkpoint`` calls ``remove`` on the evicted file *before* it saves the new
one; :class:`CkptSaver` defers every removal until the next file is committed, so a
failed or killed save never leaves the run without its previous checkpoint. ignite saves
no RNG state: track :class:`RNGState` among the objects for an exact resume.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import CorruptCheckpointError
from ..state import capture_rng, restore_rng
from . import _files

try:
    import ignite.distributed as idist
    from ignite.handlers.checkpoint import BaseSaveHandler
except ImportError as e:
    raise ImportError("ckpt.integrations.ignite needs pytorch-ignite: pip install 'ckpt[ignite]'") from e

__all__ = ["CkptSaver", "RNGState", "last_checkpoint", "load"]

_KEYS = ("iteration",)


def _numbers(checkpoint: Any) -> Tuple[Any, ...]:
    """(iteration,) of the Engine state saved in ``checkpoint``; (-1,) when none is."""
    if isinstance(checkpoint, Mapping):
        for value in checkpoint.values():
            if isinstance(value, Mapping) and isinstance(value.get("iteration"), int):
                return (int(value["iteration"]),)
    return (-1,)


class RNGState:
    """Python, NumPy, torch and CUDA RNG states as an object ignite can checkpoint."""

    def state_dict(self) -> Dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        restore_rng(state)


class CkptSaver(BaseSaveHandler):
    """Saves ignite checkpoints in ``dirname`` (a path or an fsspec URL) with ckpt's commit protocol."""

    def __init__(self, dirname: str, *, storage_options: Optional[Mapping[str, Any]] = None) -> None:
        self.dirname = str(dirname)
        self.storage_options = storage_options
        self._dir = _files.Directory(_files.store_for(self.dirname, storage_options))  # settles a killed run's
        self._evicted: List[str] = []

    def __call__(self, checkpoint: Mapping[str, Any], filename: str,
                 metadata: Optional[Mapping[str, Any]] = None) -> None:
        if idist.get_rank() == 0:
            self._dir.save(filename, checkpoint, dict(zip(_KEYS, _numbers(checkpoint))))
            evicted, self._evicted = self._evicted, []
            for name in evicted:  # only now that the new file is committed
                if name != filename:
                    self._dir.remove(name)

    def close(self) -> None:
        """Free the directory for another writer now (an object store's writer lease); a
        saver that is not closed frees it when its process ends."""
        if self._dir.release is not None:
            self._dir.release()

    def remove(self, filename: str) -> None:
        """Called by ``Checkpoint`` before it saves the next file: deferred until that commits."""
        if idist.get_rank() == 0:
            self._evicted.append(filename)


def last_checkpoint(dirname: str, storage_options: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The newest complete file (``*.pt``) in ``dirname`` that verifies, or None; ordered
    by the saved Engine's iteration. Damaged files are skipped with a warning."""
    found = _files.newest(str(dirname), suffix=".pt", keys=_KEYS, read_numbers=_numbers,
                          storage_options=storage_options)
    return None if found is None else str(found)


def load(path: str, storage_options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The checkpoint dict at ``path``, verified (pass it to ``Checkpoint.load_objects``).

    A damaged file raises :class:`~ckpt.errors.CorruptCheckpointError` naming it and
    the newest one in its directory that verifies.
    """
    directory, name = _files.split(path)
    store = _files.store_for(directory, storage_options, create=False)
    try:
        loaded: Dict[str, Any] = _files.load(store, name)
    except CorruptCheckpointError as e:
        good = last_checkpoint(directory, storage_options)
        raise _files.corrupt_error(e, str(path), PurePath(good) if good else None) from e
    return loaded
