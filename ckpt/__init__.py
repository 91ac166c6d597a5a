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
from .manager import CheckpointManager  # noqa: E402
from .record import CheckpointRecord  # noqa: E402

__all__ = [
    "CheckpointManager", "CheckpointRecord", "CkptError", "ConfigError", "CheckpointNotFoundError",
    "CheckpointExistsError", "CorruptCheckpointError", "FormatVersionError", "UnsafeCheckpointError",
    "StateMismatchError", "StorageError", "__version__",
]
