"""One plain file out of a sharded checkpoint (``ckpt.export_sharded``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import PathLike
from .sharded import export_single


def export_sharded(directory: PathLike, out: PathLike, *, verify: bool = True) -> Path:
    """Write the full state of the sharded checkpoint ``directory`` (a ``ckpt-...dcp``
    directory) as one ``torch.save`` file in the single-process layout: it loads with
    ``torch.load(path, weights_only=True)`` and restores in a single process with
    ``CheckpointManager.restore(path)``. Every file is checked against its CRC-32
    first (``verify``). Runs in one process and holds the whole state in memory."""
    return export_single(Path(directory), Path(out), verify=verify)
