"""What the commands share: opening a run directory or a file, retention flags, tensors."""

from __future__ import annotations

import argparse
import warnings
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch

from .. import policy
from ..catalog import Catalog, differential, history, index
from ..errors import CkptError
from ..format import torchfile
from ..storage import LocalStore, is_url, open_existing
from ..verdicts import Detail, MissingFilesWarning, UnindexedFileWarning

Key = Tuple[int, int]


class UsageError(CkptError):
    """A user mistake on the command line (exit status 2)."""


def run_directory(text: str) -> Any:
    """A run directory the user named (a path, or a URL such as ``s3://bucket/run``, whose
    credentials come from the environment); :class:`UsageError` for a file or nothing."""
    if is_url(text):
        return text  # checked when the store opens
    path = Path(text)
    if not path.exists():
        raise UsageError("no such directory", path=path, hint="pass the run directory (the one given to "
                                                               "CheckpointManager)")
    if not path.is_dir():
        raise UsageError("is a file, not a run directory", path=path,
                         hint=f"pass its directory ({path.parent}), or use `ckpt show {path}` for one file")
    return path


@contextmanager
def fetched(text: str) -> Iterator[Path]:
    """A local file holding the checkpoint ``text`` names: the file itself, or for a URL a
    temporary download (deleted afterwards)."""
    if not is_url(text):
        yield checkpoint_file(text)
        return
    parent, _, name = text.rstrip("/").rpartition("/")
    with open_existing(parent).local_path(name) as local:
        yield Path(local)


def checkpoint_file(text: str) -> Path:
    """A checkpoint file the user named; :class:`UsageError` for a directory or nothing."""
    path = Path(text)
    if path.is_dir():
        raise UsageError("is a directory, not a checkpoint file", path=path,
                         hint=f"list its checkpoints with `ckpt ls {path}`, then pass one file")
    if not path.exists():
        raise UsageError("no such file", path=path, hint="list a run's checkpoints with `ckpt ls DIR`")
    return path


#: Catalog warnings that ``ls`` and ``verify`` report in their own output.
REPORTED = (MissingFilesWarning, UnindexedFileWarning)


@contextmanager
def quiet() -> Iterator[None]:
    """Drop the catalog's warnings that the command reports itself (by their category);
    pass the others on (an unreadable index, say), to be printed as notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if not issubclass(w.category, REPORTED):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def message(e: Union[CkptError, str], path: PurePath) -> str:
    """An error (or a verdict's detail) without the path the caller already shows and
    without its hint, made from its fields (:meth:`ckpt.errors.CkptError.headline`); a
    plain detail, written for this display, as it is."""
    if isinstance(e, (CkptError, Detail)):
        return e.headline(path)
    return e


def short(detail: str, path: PurePath) -> str:
    """A verdict's detail in a few words, for a table column: a :class:`Detail`'s
    :meth:`~ckpt.verdicts.Detail.short`; a plain detail, written for this display, as it is."""
    return detail.short(path) if isinstance(detail, Detail) else detail


def catalog(directory: Any) -> Catalog:
    """A read-only view of a run directory, local or a URL (nothing is created or rewritten)."""
    return Catalog(open_existing(directory))


def add_retention(p: argparse.ArgumentParser) -> None:
    """The manager's retention options, spelled as on the command line."""
    g = p.add_argument_group("retention (as CheckpointManager's options)")
    g.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest checkpoints")
    g.add_argument("--keep-best", type=int, metavar="K", help="keep the K best by --monitor")
    g.add_argument("--monitor", metavar="METRIC", help="the metric --keep-best ranks by (e.g. val_loss)")
    g.add_argument("--mode", choices=("min", "max"), help="min for a loss, max for an accuracy (default min)")
    g.add_argument("--keep-every", type=int, metavar="E", help="keep the end-of-epoch checkpoint of every E-th epoch")


def given_policy(args: argparse.Namespace) -> Optional[policy.RetentionPolicy]:
    """The policy spelled by the flags, None when none was given."""
    values = {k: getattr(args, k) for k in ("keep_last", "keep_best", "monitor", "keep_every")}
    if all(v is None for v in values.values()) and args.mode is None:
        return None
    return policy.RetentionPolicy(**values, mode=args.mode or "min")


def recorded(cat: Catalog) -> Tuple[Optional[policy.RetentionPolicy], Tuple[Key, ...]]:
    """The retention policy and protected keys of the directory's last recorded save."""
    entry = history.last(cat.store)
    return (entry.retention, entry.protected) if entry is not None else (None, ())


def load_file(path: Path, *, progress: Optional[bool] = None) -> Any:
    """A file's object, loaded safely (``weights_only``), its own CRCs or its indexed
    checksum verified first: never runs code, damage raises."""
    checksum = indexed_checksum(path)
    obj = torchfile.load(path, weights_only=True, checksum=checksum, check_records=checksum is None,
                         progress=progress, mmap=True)
    return differential.resolve_beside(path, obj)  # a differential checkpoint: its tensors, not references


def indexed_checksum(path: Path) -> Optional[str]:
    """The checksum the run directory's index records for ``path``, if any."""
    try:
        store = LocalStore(path.parent, create=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an odd index: the file's own CRCs are checked instead
            records = index.read(store, index.read_raw(store)) or []
    except (ValueError, TypeError, UnicodeDecodeError, CkptError):
        return None
    return next((r.checksum for r in records if r.name == path.name), None)


def tensors(obj: Any, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """Every tensor in a nested structure, with a dotted name."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}.{i}" if prefix else str(i))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def objects(obj: Any) -> Dict[str, Any]:
    """The tracked objects of a ckpt checkpoint, or the top-level entries of a plain file."""
    if isinstance(obj, dict):
        meta = obj.get("ckpt")
        if isinstance(meta, dict) and isinstance(meta.get("objects"), list):
            return {str(n): obj[n] for n in meta["objects"] if n in obj}
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {"(state dict)": obj}
        return {str(k): v for k, v in obj.items()}
    return {"(object)": obj}


def shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")

