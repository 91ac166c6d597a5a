"""Typed errors.

Every error subclasses :class:`CkptError` *and* the builtin a caller would already
catch (``ValueError``, ``FileNotFoundError``, ...), names the path involved, says what
was expected, and ends with a hint on how to fix it. Causes are chained by the raiser;
an error that wraps another (:func:`wrapped`) quotes it without its hint: one hint each.
"""

from __future__ import annotations

import errno
import os
import pickle
from typing import Any, Dict, Optional, Tuple, Type, TypeVar, Union

PathLike = Union[str, "os.PathLike[str]"]
E = TypeVar("E", bound="CkptError")


class CkptError(Exception):
    """Base class of every error ckpt raises on purpose."""

    #: Under a process group: the rank this error happened on, when another rank raises it
    #: (rebuilt by :func:`from_wire`); None: it happened in this process.
    rank: Optional[int] = None

    def __init__(self, message: str, *, path: Optional[PathLike] = None, hint: str = "",
                 summary: str = "") -> None:
        self.path = os.fspath(path) if path is not None else None
        self.message = message  # without the path and the hint, for an error that quotes this one
        self.hint = hint
        #: What went wrong in a few words, for a table column (``ckpt ls``); the message by default.
        self.summary = summary or message
        #: The path the text starts with (None: no path, or the message names it already).
        self.lead: Optional[str] = self.path if self.path is not None and self.path not in message else None
        text = message if self.lead is None else f"{self.lead}: {message}"
        if hint:
            text = f"{text}\n  hint: {hint}"
        super().__init__(text)

    def __str__(self) -> str:  # builtins such as OSError format args differently
        return str(self.args[0]) if self.args else ""

    @property
    def what(self) -> str:
        """What went wrong: the message, without the path and the hint."""
        return self.message

    def headline(self, shown: Optional[PathLike] = None) -> str:
        """The path and what went wrong, for a reader already shown ``shown`` (its path then
        left out); no hint. Made from the fields (see :func:`one_line`)."""
        return headline(self.lead, self.message, shown)

    def short(self, shown: Optional[PathLike] = None) -> str:
        """:meth:`headline` with the :attr:`summary` for the message."""
        return headline(self.lead, self.summary, shown)


def headline(lead: Optional[str], what: str, shown: Optional[PathLike] = None) -> str:
    """``lead: what``, or ``what`` alone without a lead path or when it is ``shown``."""
    if lead is None or (shown is not None and lead == os.fspath(shown)):
        return what
    return f"{lead}: {what}"


def one_line(e: BaseException) -> str:
    """An error as one line: its path and what went wrong, then ``(hint: ...)``; from a
    ckpt error's fields, else the first line of another error's text (it has no fields)."""
    if isinstance(e, CkptError):
        return f"{e.headline()} (hint: {e.hint})" if e.hint else e.headline()
    return (str(e).splitlines() or [type(e).__name__])[0]


def wrapped(kind: Type[E], what: str, cause: BaseException, *, path: Optional[PathLike] = None,
            hint: str = "") -> E:
    """A ``kind`` error saying ``what`` went wrong because of ``cause``, quoted in one line
    without its hint: the result carries exactly one hint, ``hint`` when given, else the
    cause's; its summary is ``what``. Chained to ``cause``."""
    quoted = cause.headline() if isinstance(cause, CkptError) else one_line(cause)
    err = kind(f"{what}: {quoted}", path=path, hint=hint or getattr(cause, "hint", "") or "", summary=what)
    err.__cause__ = cause
    return err


class ConfigError(CkptError, ValueError):
    """An option or argument is invalid; raised before anything is written."""


class CheckpointNotFoundError(CkptError, FileNotFoundError):
    """No checkpoint matches the request (missing file, empty directory, no such epoch)."""


class CheckpointExistsError(CkptError, FileExistsError):
    """A checkpoint for the same (epoch, step) is already committed."""


class CorruptCheckpointError(CkptError, ValueError):
    """A checkpoint file is truncated, damaged, or not a ckpt checkpoint."""


class FormatVersionError(CkptError, ValueError):
    """A checkpoint was written by a newer, incompatible format version."""


class UnsafeCheckpointError(CkptError, pickle.UnpicklingError):
    """A file's pickle names a type outside the ``weights_only`` allow-list."""


class StateMismatchError(CkptError, RuntimeError):
    """Saved state does not fit the object it is loaded into (keys or shapes differ)."""


class StorageError(CkptError, OSError):
    """The directory cannot be used (not a directory, not writable, disk full, ...)."""


class WriterConflictError(StorageError):
    """Another writer holds the remote run directory (its writer lease), or took it over
    from this one: one writer per run (see docs/explanation/remote-runs.md)."""

    writer_conflict = True


class UntrustedModuleError(UnsafeCheckpointError):
    """A model spec names a module the caller has not trusted; nothing was imported."""


class ArchitectureError(CkptError, ValueError):
    """A model's architecture cannot be recorded, or cannot be built again from its spec."""


class ExportError(CkptError, RuntimeError):
    """``torch.export`` or TorchScript cannot turn the model into a class-free program."""


class CollectiveTimeoutError(CkptError, TimeoutError):
    """A rank did not arrive at a ckpt collective within its timeout; every rank raises."""


class CollectiveError(CkptError, RuntimeError):
    """Another rank failed its part of a collective operation, or called a different one."""


class RankLostError(CollectiveError):
    """A rank stopped answering during a collective (its process died, or its machine is
    gone): every surviving rank raises this at once, naming it, instead of waiting for it."""

    #: The ranks that stopped answering.
    lost: Tuple[int, ...] = ()
    #: The checkpoint that was committed all the same (every rank's part was in: the loss
    #: came after), which a resume restarts from; None: the save lost nothing committed.
    committed: Optional[str] = None
    #: ckpt's own: in a broadcast, what its source rank (alive) had sent when this rank gave
    #: up (rank 0's commit outcome, for :attr:`committed`); None: nothing arrived.
    sent: Any = None


#: An error as one rank tells the others of it: plain values only, never a pickled class.
Wire = Dict[str, Any]


def to_wire(e: BaseException) -> Wire:
    """``e`` as plain values for another rank: ``kind`` is the ckpt error class it is (or
    derives from) in this module, None for any other exception; ``text`` its one-line form."""
    kind = next((c for c in type(e).__mro__ if _ours(c.__name__) is c), None) if isinstance(e, CkptError) else None
    wire: Wire = {"kind": None, "type": type(e).__name__, "text": f"{type(e).__name__}: {e}"}
    if kind is not None and isinstance(e, CkptError):
        wire.update(kind=kind.__name__, path=e.path, lead=e.lead, what=e.message, hint=e.hint,
                    summary=e.summary, errno=getattr(e, "errno", None))
    return wire


def from_wire(wire: Wire, rank: int, during: str) -> CkptError:
    """The error rank ``rank`` sent (:func:`to_wire`) during ``during``, raised here: the same
    ckpt error class with the same path, lead, what, hint and summary, its text saying where it
    happened; a non-ckpt exception becomes a :class:`CollectiveError` naming its type.
    Only classes of this module are rebuilt, looked up by name."""
    kind = _ours(wire.get("kind"))
    if kind is None:
        return CollectiveError(f"{during} failed on rank {rank}: {wire['text']}",
                               hint=f"rank {rank}'s own error (and traceback) is in its log")
    err = kind(wire["what"], path=wire["path"], hint=wire["hint"], summary=wire.get("summary", ""))
    err.lead, err.rank = wire["lead"], rank
    text = f"{during} failed on rank {rank}: {headline(err.lead, err.message)}"
    err.args = (f"{text}\n  hint: {err.hint}" if err.hint else text,)
    if isinstance(err, OSError) and wire.get("errno") is not None:
        err.errno = wire["errno"]
    return err


def _ours(name: Any) -> Optional[type[CkptError]]:
    """The ckpt error class of this module called ``name``, or None."""
    found = globals().get(name) if isinstance(name, str) else None
    return found if isinstance(found, type) and issubclass(found, CkptError) and found.__module__ == __name__ \
        else None


def storage_error(e: OSError, path: Any, action: str) -> StorageError:
    """Wrap an OSError raised while committing, keeping its errno and a useful hint."""
    if e.errno == errno.ENOSPC:
        hint = "the disk is full: free space or lower keep_last/keep_best; earlier checkpoints are intact"
    elif isinstance(e, PermissionError) or e.errno == errno.EROFS:
        hint = "the directory is not writable (permissions or a read-only mount): fix it or choose another directory"
    else:
        hint = "earlier checkpoints and the index are unchanged; fix the cause and save again"
    err = StorageError(f"{action} failed: {e.strerror or e}", path=path, hint=hint)
    err.errno = e.errno
    return err
