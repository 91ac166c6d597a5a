"""ckpt: checkpoints for PyTorch training loops that you can trust.

    from ckpt import CheckpointManager
    mgr = CheckpointManager("runs/exp1", model=model, optimizer=opt, keep_last=3)
    start = mgr.resume()
    for epoch in range(start, epochs):
        ...
        mgr.save(epoch=epoch, metrics={"val_loss": val_loss})

Model portability (``save_model``, ``load_model``, ``export``, ``load_exported``,
``save_safetensors``) is imported on first use, so a training loop that only saves
and resumes never loads that code.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .errors import (
    ArchitectureError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptError,
    CollectiveError,
    CollectiveTimeoutError,
    ConfigError,
    CorruptCheckpointError,
    ExportError,
    FormatVersionError,
    RankLostError,
    StateMismatchError,
    StorageError,
    UnsafeCheckpointError,
    UntrustedModuleError,
    WriterConflictError,
)
from .manager import CheckpointManager
from .preemption import Preempted
from .record import CheckpointRecord
from .sampler import ResumableSampler
from .spec import rebuildable

_LAZY = {
    "save_model": "ckpt.models.files", "load_model": "ckpt.models.files",
    "export": "ckpt.models.export", "load_exported": "ckpt.models.export",
    "save_safetensors": "ckpt.interop.safetensors",
    "export_sharded": "ckpt.distributed.export",
}

__all__ = [
    "CheckpointManager", "CheckpointRecord", "CkptError", "ConfigError", "CheckpointNotFoundError",
    "CheckpointExistsError", "CorruptCheckpointError", "FormatVersionError", "UnsafeCheckpointError",
    "StateMismatchError", "StorageError", "__version__",
    "save_model", "load_model", "rebuildable", "export", "load_exported", "save_safetensors",
    "ArchitectureError", "ExportError", "UntrustedModuleError",
    "ResumableSampler", "Preempted", "CollectiveError", "CollectiveTimeoutError", "RankLostError", "export_sharded",
    "WriterConflictError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
