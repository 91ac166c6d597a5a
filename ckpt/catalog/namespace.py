"""The names ckpt keeps for itself in a run directory, and the guard that keeps every
other writer (``save_model``, ``save_safetensors``, ``ckpt.export``, ``ckpt export``)
off them: a mistyped or tab-completed output path never replaces a committed
checkpoint, a blob it references, or the index."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .. import schema
from ..errors import CheckpointExistsError, CkptError, ConfigError
from ..storage.local import LOCK_NAME, TMP_PREFIX, LocalStore
from . import index


def reserved(name: str) -> bool:
    """A name the catalog reads or writes in a run directory."""
    return (schema.parse_name(name) is not None or bool(schema.BLOB_RE.fullmatch(name))
            or name.startswith(("ckpt-index", "ckpt-history", TMP_PREFIX)) or name == LOCK_NAME)


def committed(path: Path) -> Optional[str]:
    """What of the run ``path`` is (a checkpoint, or a blob one references), if the
    index of its directory lists it."""
    try:
        store = LocalStore(path.parent, create=False)
        records = index.read(store, index.read_raw(store)) or []
    except (CkptError, OSError, ValueError, TypeError, UnicodeDecodeError):
        return None
    for r in records:
        if r.name == path.name:
            return f"committed checkpoint (epoch {r.epoch}, step {r.step})"
        if any(blob == path.name for blob, _ in r.blobs):
            return f"tensor file that checkpoint {r.name} references"
    return None


def refuse_run_file(path: Path, what: str) -> None:
    """Raise before ``what`` is written to ``path`` when that would replace a file of a
    run directory: :class:`CheckpointExistsError` for one that is there, else
    :class:`ConfigError` for a name the catalog would take for its own."""
    in_run = os.path.lexists(path.parent / LOCK_NAME) or os.path.lexists(path.parent / index.INDEX_NAME)
    found = committed(path) if in_run else None
    if found is None and not (in_run and reserved(path.name)):
        return
    hint = (f"write {what} to another path (e.g. {path.parent / ('exported-' + path.stem + '.safetensors')}); "
            "to drop a checkpoint, use `ckpt prune`")
    if found is not None or path.exists():
        raise CheckpointExistsError(f"is a {found or 'file of the run directory'}; writing {what} there would "
                                    "replace it, so nothing was written", path=path, hint=hint)
    raise ConfigError(f"is a name ckpt keeps for the run's own files; {what} written there would be taken "
                      "for one of them, so nothing was written", path=path, hint=hint)
