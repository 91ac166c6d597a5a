"""Which checkpoint a restore means, decided over the committed records.

``restore(which)`` names a checkpoint as ``"latest"``, ``"best"``, an epoch (``step=``
narrows it, or picks by step alone), a path or URL, or a record: :func:`find` turns
that into a committed record, or into the path of a file outside the index, which
:func:`read_file` reads once (ckpt's own layout or a foreign one). After ``restore()``
of an older checkpoint its counters are the manager's, so a save without numbers
collides with it: :func:`restored_older` says so.

Functions of records and arguments; the only I/O is looking at a path the caller
named (``find``) and reading it (``read_file``). The manager decides when they run and
applies what they return.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from . import policy
from .errors import CheckpointExistsError, CheckpointNotFoundError, ConfigError, PathLike
from .record import CheckpointRecord
from .store import differential, is_url, torchfile

Which = Union[str, int, PathLike, CheckpointRecord]


def best(records: Sequence[CheckpointRecord], retention: policy.RetentionPolicy) -> Optional[CheckpointRecord]:
    """The best record by ``monitor``/``mode`` (None without a monitor or metric)."""
    if not retention.monitor:
        return None
    ranked = policy.best(records, retention.monitor, retention.mode, 1)
    return ranked[0] if ranked else None


def find(records: Sequence[CheckpointRecord], which: Which, step: Optional[int], *,
         retention: policy.RetentionPolicy, url: str, directory: PurePath) -> Union[CheckpointRecord, Path]:
    """The committed record ``which`` names, or the path of an existing file outside
    the index (read it with :func:`read_file`); :class:`CheckpointNotFoundError` when
    nothing matches. ``records`` are oldest first; ``url`` is the run directory as
    given, ``directory`` as the manager shows it."""
    if isinstance(which, CheckpointRecord):
        return which
    found: Optional[CheckpointRecord] = None
    if which == "latest" and step is None:
        found = records[-1] if records else None
    elif which == "best":
        if not retention.monitor:
            raise ConfigError("restore('best') needs a monitored metric",
                              hint="create the manager with monitor='val_loss' (and mode=)")
        found = best(records, retention)
    elif isinstance(which, int) and not isinstance(which, bool) or which == "latest":
        matches = [r for r in records
                   if (which == "latest" or r.epoch == which) and (step is None or r.step == step)]
        found = matches[-1] if matches else None
    elif isinstance(which, (str, Path)) or hasattr(which, "__fspath__"):
        return _by_path(records, which, url)
    if found is None:
        have = ", ".join(f"e{r.epoch}/s{r.step}" for r in records) or "none"
        raise CheckpointNotFoundError(f"no checkpoint matches {which!r}"
                                      + (f" with step {step}" if step is not None else "")
                                      + f" (committed: {have})", path=directory,
                                      hint="list them with mgr.checkpoints or `ckpt ls DIR`")
    return found


def _by_path(records: Sequence[CheckpointRecord], which: PathLike, url: str) -> Union[CheckpointRecord, Path]:
    """A record by its path (or, in a remote run, its URL or name), else an existing file."""
    if isinstance(which, str) and is_url(url):  # a remote run: a record by URL or name
        known = next((r for r in records if which in (str(r.path), r.name)), None)
        if known is None:
            raise CheckpointNotFoundError(f"no committed checkpoint {which!r}", path=url,
                                          hint="pass 'latest', 'best', an epoch or a listed record")
        return known
    path = Path(which)
    known = next((r for r in records if isinstance(r.path, Path) and r.path.resolve() == path.resolve()), None)
    if known is not None:
        return known
    if not path.is_file():
        raise CheckpointNotFoundError("no such checkpoint file", path=path,
                                      hint="pass 'latest', 'best', an epoch number or an existing path")
    return path


def read_file(path: Path, trackables: Mapping[str, Any], *, map_location: Any,
              weights_only: bool) -> Tuple[CheckpointRecord, Dict[str, Any]]:
    """A file outside the index, read once: its record, and its dict in ckpt's layout
    (a foreign layout is mapped onto the ``trackables``' names)."""
    from .interop import foreign  # files ckpt did not write: loaded on use only
    obj = torchfile.load(path, map_location=map_location, weights_only=weights_only, check_records=True)
    obj = differential.resolve_beside(path, obj, map_location=map_location)  # references: the files beside it
    return foreign.record_of(obj, path, weights_only=weights_only), foreign.as_checkpoint(obj, trackables, str(path))


def restored_older(error: CheckpointExistsError, key: Tuple[int, int], resumed: Optional[CheckpointRecord],
                   newest: Optional[CheckpointRecord]) -> CheckpointExistsError:
    """The collision of a save at ``key`` after ``restore()`` of that older checkpoint
    (``resumed``; its counters were restored), explained as such; any other collision
    (``error``) unchanged."""
    if resumed is None or resumed.key != key or newest is None or newest.key <= key:
        return error
    return CheckpointExistsError(
        f"a checkpoint for epoch {key[0]}, step {key[1]} already exists: restore() of that older "
        f"checkpoint set mgr.epoch, mgr.step = {key[0]}, {key[1]} (the newest is epoch {newest.epoch}, "
        f"step {newest.step})", path=error.path,
        hint="restoring a checkpoint restores its counters, so save() without numbers saves under "
             f"them again; pass new ones (e.g. save(epoch={newest.epoch + 1}, step=...)) to continue "
             "from it, or overwrite=True to replace it")
