"""Typed errors.

Every error subclasses :class:`CkptError` *and* the builtin a caller would already
catch (``ValueError``, ``FileNotFoundError``, ...), names the path involved, says what
was expected, and ends with a hint on how to fix it. Causes are chained by the raiser.
"""

from __future__ import annotations

import errno
import os
import pickle
from typing import Any, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class CkptError(Exception):
    """Base class of every error ckpt raises on purpose."""

    def __init__(self, message: str, *, path: Optional[PathLike] = None, hint: str = "") -> None:
        self.path = os.fspath(path) if path is not None else None
        self.message = message  # without the path and the hint, for an error that quotes this one
        self.hint = hint
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
