"""Hugging Face ``Trainer``: durable, verified ``checkpoint-N`` directories
(``pip install 'ckpt[transformers]'``).

::

    from ckpt.integrations.transformers import CheckpointCallback, last_checkpoint
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[CheckpointCallback()])
    trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir))

The Trainer writes ``checkpoint-N`` in place, with no fsync; its own resume takes the
highest N whether or not it is complete. Once the Trainer has written a checkpoint
(``on_save``), :class:`CheckpointCallback` fsyncs every file and directory in it and
commits ``ckpt-manifest.json`` (every file's size and CRC-32) atomically: that commit is
what makes the directory a checkpoint for :func:`last_checkpoint`. A directory without a
manifest, with ``checkpoint-is-incomplete.txt`` (transformers' JIT checkpoint marker), or
whose files no longer match their manifest is skipped with a warning. Files keep the
Trainer's format: dropping ckpt loses nothing.

Retention: ``save_total_limit`` deletes old checkpoints inside the Trainer's save,
before this callback commits the new one. So the callback takes it over (at the start
of training it moves ``save_total_limit`` to its own ``keep_last`` and sets the
argument to ``None``), and applies ckpt's policy (``keep_last``, ``keep_best`` with
``monitor``) after each commit: the newest committed checkpoint, the best model
checkpoint and the one the run resumed from are never deleted before a newer commit.

Preemption: transformers' ``enable_jit_checkpoint`` traps SIGTERM in each process and
saves through ``_save_checkpoint`` without calling ``on_save``; the callback commits
such a checkpoint at ``on_train_end`` (only folders this run wrote, without the
incomplete marker). ckpt adds no agreement across ranks to it (see
docs/howto/transformers.md). Under DDP, saving (and so this callback's commit) happens
on the main process only. The Trainer writes local folders; :func:`last_checkpoint`
and :func:`verify_directory` also read committed folders copied to an fsspec URL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..errors import CorruptCheckpointError
from ..io.checksum import file_checksum
from ..io.posix import fsync_dir
from ..policy import RetentionPolicy, select_kept
from ..storage.local import atomic_write
from ..storage.trees import checksum, open_tree

try:
    from transformers import TrainerCallback
except ImportError as e:
    raise ImportError("ckpt.integrations.transformers needs the Hugging Face transformers Trainer: "
                      "pip install 'ckpt[transformers]'") from e

__all__ = ["CheckpointCallback", "last_checkpoint", "commit_directory", "verify_directory", "MANIFEST"]

MANIFEST = "ckpt-manifest.json"
INCOMPLETE = "checkpoint-is-incomplete.txt"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def _files(directory: Path) -> List[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_directory(directory: Union[str, os.PathLike[str]], info: Optional[Mapping[str, Any]] = None) -> Path:
    """Make the checkpoint directory durable and commit its manifest; the manifest's path."""
    directory = Path(directory)
    entries: Dict[str, Dict[str, Any]] = {}
    for path in _files(directory):
        _fsync_file(path)
        entries[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size,
                                                           "checksum": file_checksum(path)}
    for sub in sorted({p.parent for p in directory.rglob("*")} | {directory}, reverse=True):
        fsync_dir(sub)
    data = json.dumps({"files": entries, "time": time.time(), **(info or {})}, sort_keys=True).encode()
    atomic_write(directory, MANIFEST, lambda f: f.write(data))
    fsync_dir(directory.parent)
    return directory / MANIFEST


def verify_directory(directory: Union[str, os.PathLike[str]],
                     storage_options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The manifest of a committed, intact checkpoint directory (a path or an fsspec URL);
    raises :class:`~ckpt.errors.CorruptCheckpointError` naming what is missing or damaged."""
    folder = open_tree(directory, storage_options)
    shown = folder.where()
    if folder.size(INCOMPLETE) is not None:
        raise CorruptCheckpointError(f"{INCOMPLETE} is there: the save was interrupted", path=shown,
                                     hint="resume from an earlier checkpoint (last_checkpoint(output_dir))")
    try:
        manifest = json.loads(folder.read_bytes(MANIFEST))
        files = manifest["files"]
    except FileNotFoundError as e:
        raise CorruptCheckpointError("no commit manifest: the save did not finish", path=shown,
                                     hint="resume from an earlier checkpoint (last_checkpoint(output_dir))") from e
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"the commit manifest is damaged ({e})", path=shown) from e
    for rel, entry in files.items():
        if folder.size(rel) != entry["size"]:
            raise CorruptCheckpointError(f"{rel} is missing or has the wrong size", path=shown,
                                         hint="the checkpoint was damaged (or only partly copied) after it was saved")
        if checksum(folder, rel) != entry["checksum"]:
            raise CorruptCheckpointError(f"{rel} fails its checksum: the file is damaged", path=shown,
                                         hint="the checkpoint was damaged after it was saved")
    return dict(manifest)


def _checkpoints(output_dir: Path) -> List[Path]:
    """``checkpoint-N`` directories, highest N first."""
    try:
        found = [p for p in output_dir.iterdir() if _CHECKPOINT.fullmatch(p.name) and p.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def last_checkpoint(output_dir: Union[str, os.PathLike[str]],
                    storage_options: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """The newest committed ``checkpoint-N`` under ``output_dir`` (a path or an fsspec
    URL) whose files verify, or None.

    Half-written directories (no manifest, or ``checkpoint-is-incomplete.txt``) and
    damaged ones are skipped with a warning.
    """
    root = open_tree(output_dir, storage_options)
    found = sorted((n for n in root.folders() if _CHECKPOINT.fullmatch(n)), key=lambda n: int(n.split("-")[1]),
                   reverse=True)
    for name in found:
        where = str(root.sub(name).where())
        try:
            verify_directory(where, storage_options)
        except CorruptCheckpointError as e:
            warnings.warn(f"skipping {where}: {e}", stacklevel=2)
            continue
        return where
    return None


def _written_since(directory: Path, began: float, committed: Optional[float]) -> bool:
    """Whether every file in ``directory`` was written at or after ``began`` (by this run)
    and, if it has a manifest (written at ``committed``), some file after that."""
    times = [p.stat().st_mtime for p in _files(directory)]
    return bool(times) and min(times) >= began and (committed is None or max(times) > committed)


@dataclass(frozen=True)
class _Record:
    epoch: int
    step: int
    mid_epoch: bool = True
    metrics: Mapping[str, float] = field(default_factory=dict)


def _metrics_at(state: Any) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for entry in getattr(state, "log_history", []):
        if entry.get("step") == state.global_step:
            out.update({k: float(v) for k, v in entry.items() if isinstance(v, (int, float))})
    return out


class CheckpointCallback(TrainerCallback):
    """Commits each ``checkpoint-N`` the Trainer writes; optional ckpt retention.

    ``keep_last`` / ``keep_best`` with ``monitor`` (a logged metric, such as
    ``"eval_loss"``) and ``mode``: see ckpt's retention rules. Without them (and without
    ``save_total_limit``) nothing is deleted.
    """

    def __init__(self, *, keep_last: Optional[int] = None, keep_best: Optional[int] = None,
                 monitor: Optional[str] = None, mode: str = "min") -> None:
        self.policy = RetentionPolicy(keep_last=keep_last, keep_best=keep_best, monitor=monitor, mode=mode)
        self._resumed: Optional[str] = None
        self._began = time.time()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        limit = getattr(args, "save_total_limit", None)
        if limit:  # the Trainer's rotation runs before the new checkpoint is committed
            keep = max(limit, self.policy.keep_last or 0)
            self.policy = RetentionPolicy(keep_last=keep, keep_best=self.policy.keep_best,
                                          monitor=self.policy.monitor, mode=self.policy.mode)
            args.save_total_limit = None
        self._resumed = last_checkpoint(args.output_dir) if state.global_step else None
        self._began = time.time()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Commit the checkpoints this run wrote without calling ``on_save``: transformers'
        ``enable_jit_checkpoint`` saves on SIGTERM straight through ``_save_checkpoint``
        (its marker removed once the save is complete)."""
        if not args.should_save:
            return
        committed = False
        for directory in _checkpoints(Path(args.output_dir)):
            manifest = directory / MANIFEST
            after = manifest.stat().st_mtime if manifest.exists() else None  # rewritten in place after its commit?
            if (directory / INCOMPLETE).exists() or not _written_since(directory, self._began, after):
                continue  # a killed earlier run's leftover stays uncommitted
            commit_directory(directory, {"global_step": int(directory.name.split("-")[1]), "jit": True})
            committed = True
        if committed:
            self._resumed = None
            self._apply_retention(Path(args.output_dir), state)

    def _uncommit(self, args: Any, state: Any, control: Any) -> None:
        """Before the Trainer rewrites ``checkpoint-N`` in place, its old manifest goes."""
        if control.should_save and args.should_save:
            old = Path(args.output_dir) / f"checkpoint-{state.global_step}" / MANIFEST
            if old.exists():
                old.unlink()
                fsync_dir(old.parent)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._uncommit(args, state, control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._uncommit(args, state, control)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not args.should_save:
            return
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not directory.is_dir():
            return
        metrics = _metrics_at(state)
        commit_directory(directory, {"global_step": state.global_step, "epoch": state.epoch, "metrics": metrics})
        self._resumed = None  # a newer checkpoint is committed: the resume point may go
        self._apply_retention(Path(args.output_dir), state)

    def _apply_retention(self, output_dir: Path, state: Any) -> None:
        if not self.policy.deletes:
            return
        records: List[Tuple[_Record, Path]] = []
        for directory in _checkpoints(output_dir):
            try:
                manifest = json.loads((directory / MANIFEST).read_bytes())
            except (FileNotFoundError, ValueError):
                continue  # never committed: not ckpt's to delete (and not a resume point)
            step = int(directory.name.split("-")[1])
            records.append((_Record(0, step, metrics=manifest.get("metrics") or {}), directory))
        protected = {(0, int(Path(p).name.split("-")[1])) for p in (self._resumed, state.best_model_checkpoint) if p}
        kept = select_kept([r for r, _ in records], self.policy, protected)
        for record, directory in records:
            if (record.epoch, record.step) not in kept:
                (directory / MANIFEST).unlink()  # uncommitted first: a crash mid-delete leaves no half resume point
                fsync_dir(directory)
                shutil.rmtree(directory)
