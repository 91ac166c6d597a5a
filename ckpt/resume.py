"""Which checkpoint a restore means, decided over the committed records.

``restore(which)`` names a checkpoint as ``"latest"``, ``"best"``, an epoch (``step=``
narrows it, or picks by step alone), a path or URL, or a record: :func:`find` turns
that into a committed record, or into the path of a file outside the index, which
:func:`read_file` reads once (ckpt's own layout or a foreign one). After ``restore()``
of an older checkpoint its counters are the manager's, so a save without numbers
collides with it: :func:`restored_older` says so. ``resume()`` takes the newest
checkpoint that loads: :func:`newest_valid`.

Functions of records and arguments; the only I/O is looking at a path the caller
named (``find``), reading it (``read_file``), and what the caller's functions do
(``newest_valid``). The manager decides when they run and
applies what they return.
"""

from __future__ import annotations

import warnings
from pathlib import Path, PurePath
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import policy, schema
from . import record as records
from .cadence import Cadence
from .catalog import Catalog, differential
from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptError,
    ConfigError,
    CorruptCheckpointError,
    PathLike,
    StateMismatchError,
    StorageError,
)
from .format import torchfile
from .record import CheckpointRecord
from .storage import is_url
from .verdicts import Quarantine, Quarantined

Which = Union[str, int, PathLike, CheckpointRecord]

#: How often resume() reads the directory again when another process replaced or
#: deleted the checkpoint it was loading (then it falls back to older ones).
RESUME_PASSES = 5


def newest_valid(refresh: Callable[[], List[CheckpointRecord]], load: Callable[[CheckpointRecord], Any],
                 skip: Callable[[CheckpointRecord, BaseException], bool],
                 directory: PurePath) -> Optional[Tuple[CheckpointRecord, Any]]:
    """The newest committed checkpoint that ``load`` reads, and what it read (None when
    there is none). One that fails to load goes to ``skip`` (True: it was moved aside
    as damaged); one replaced or deleted meanwhile (``skip`` says False) sends the
    search back to ``refresh`` (a few times, then it is left out too). Raises
    :class:`CheckpointNotFoundError` when every checkpoint failed."""
    damaged: List[str] = []
    moved = 0
    for attempt in range(RESUME_PASSES):
        for record in reversed(refresh()):
            try:
                obj = load(record)
            except (CorruptCheckpointError, FileNotFoundError) as e:
                aside = skip(record, e)
                if not aside and attempt < RESUME_PASSES - 1:
                    break  # replaced or deleted by another process: read the directory again
                damaged.append(str(record.path))
                moved += aside
                continue
            return record, obj
        else:
            break
    if damaged:
        raise CheckpointNotFoundError(
            f"no valid checkpoint to resume from; damaged or gone: {', '.join(damaged)}",
            path=directory, hint=_kept_hint(moved, len(damaged)) + "start a fresh run or restore one by path")
    return None


def _kept_hint(moved: int, damaged: int) -> str:
    """What happened to the damaged files: say *.corrupt only for those really moved."""
    if moved == damaged:
        return "the damaged files were kept as *.corrupt; "
    if moved == 0:
        return "nothing was moved or deleted; "
    return f"{moved} of them were kept as *.corrupt, the others left in place; "


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
    try:
        obj = torchfile.load(path, map_location=map_location, weights_only=weights_only, check_records=True)
    except (CkptError, FileNotFoundError):
        raise
    except OSError as e:  # EIO, EISDIR, a device or /proc file: not a checkpoint file ckpt can read
        raise StorageError(f"cannot read the file: {e.strerror or e}", path=path,
                           hint="pass the path of a checkpoint file (ckpt ls lists a run's checkpoints)") from e
    obj = differential.resolve_beside(path, obj, map_location=map_location)  # references: the files beside it
    return foreign.record_of(obj, path, weights_only=weights_only), foreign.as_checkpoint(obj, trackables, str(path))


def skip(catalog: Catalog, record: CheckpointRecord, error: BaseException) -> bool:
    """Leave out a checkpoint that failed to load, with a warning; a damaged one (not a
    missing one) is renamed ``*.corrupt`` and dropped from the index so that no save
    collides with it. True if it was moved aside; False if it is gone, or was replaced
    meanwhile. The warnings point at the caller of ``resume()``."""
    if not isinstance(error, CorruptCheckpointError):
        warnings.warn(f"skipping checkpoint {record.path}: {error}", stacklevel=6)
        return False
    done = catalog.quarantine(record, error)
    moved = record.name not in catalog.store.list(record.name)
    warnings.warn(f"skipping damaged checkpoint {record.path}: {error}{_quarantined(done)}", stacklevel=6)
    return moved


_LEFT = {Quarantined.GONE: "; it is gone (a concurrent writer's retention)",
         Quarantined.REPLACED: "; a writer has replaced it since: left as it is",
         Quarantined.READS_NOW: "; it reads now (a concurrent replace): left as it is"}


def _quarantined(done: Quarantine) -> str:
    """What the quarantine did, for the warning."""
    if done.outcome is Quarantined.MOVED:
        return f"; kept as {done.where}"
    if done.outcome is Quarantined.FAILED:
        return f"; could not move it aside ({done.where}), so it will be skipped again"
    return _LEFT[done.outcome]


def applied(obj: Dict[str, Any], record: CheckpointRecord,
            cadence: Cadence) -> Tuple[CheckpointRecord, Cadence]:
    """``record``, restored from its dict ``obj``, with its ``extra`` (a copy); and the
    save cadence with the saved state loaded (a fresh one, measuring again, when that
    state is damaged)."""
    extra = obj.get("extra")
    state = obj["ckpt"].get("cadence") if schema.is_checkpoint(obj) else None
    if isinstance(state, dict):
        try:
            cadence.load_state_dict(state, step=record.step)
        except (StateMismatchError, ValueError, TypeError) as e:  # damaged: measure afresh
            cadence = cadence.fresh()
            warnings.warn(f"{record.path}: save cadence state ignored and reset "
                          f"({getattr(e, 'message', e)}); the interval is measured again", stacklevel=4)
    return records.with_extra(record, dict(extra) if isinstance(extra, dict) else {}), cadence


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
