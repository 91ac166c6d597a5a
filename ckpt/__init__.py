"""ckpt: checkpoints for PyTorch training loops that you can trust.

    from ckpt import CheckpointManager
    mgr = CheckpointManager("runs/exp1", model=model, optimizer=opt, keep_last=3)
    start = mgr.resume()
    for epoch in range(start, epochs):
        ...
        mgr.save(epoch=epoch, metrics={"val_loss": val_loss})
"""

__version__ = "0.1.0"

from .errors import (CheckpointExistsError, CheckpointNotFoundError, CkptError, ConfigError,  # noqa: E402
                     CorruptCheckpointError, FormatVersionError, StateMismatchError, StorageError,
                     UnsafeCheckpointError)
from .data import ResumableSampler  # noqa: E402
from .manager import CheckpointManager  # noqa: E402
from .preemption import Preempted  # noqa: E402
from .record import CheckpointRecord  # noqa: E402
from .architecture import rebuildable  # noqa: E402
from .errors import ArchitectureError, ExportError, UntrustedModuleError  # noqa: E402
from .exporting import export, load_exported  # noqa: E402
from .interop import save_safetensors  # noqa: E402
from .models import load_model, save_model  # noqa: E402

__all__ = [
    "CheckpointManager", "CheckpointRecord", "CkptError", "ConfigError", "CheckpointNotFoundError",
    "CheckpointExistsError", "CorruptCheckpointError", "FormatVersionError", "UnsafeCheckpointError",
    "StateMismatchError", "StorageError", "__version__",
    "save_model", "load_model", "rebuildable", "export", "load_exported", "save_safetensors",
    "ArchitectureError", "ExportError", "UntrustedModuleError",
    "ResumableSampler", "Preempted",
]
