"""What ckpt finds wrong with a checkpoint, as values: callers branch on these, never on
message text.

:class:`Status` is a checkpoint's state in a report (``verify()``, ``ckpt ls``,
``ckpt verify``), :class:`Verdict` a status with its detail; :class:`Quarantine` says
what moving a damaged checkpoint aside did. The catalog's listing warns with the
categories below, so a caller that reports those problems itself (the command line)
filters them by type. The text for people is made where a value is shown.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, NamedTuple, Optional

from . import errors

if TYPE_CHECKING:
    from .errors import CkptError, PathLike


class Status(str, enum.Enum):
    """A checkpoint's state; equal to (and printed as) its lowercase word."""

    OK = "ok"
    VERIFIED = "verified"  #: ``ckpt ls --verify``: its checksum was read and matches
    DAMAGED = "damaged"
    MISSING = "missing"
    UNSAFE = "unsafe"  #: its pickle names a type outside the ``weights_only`` allow-list
    QUARANTINED = "quarantined"  #: moved aside as damaged (``*.corrupt``)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def bad(self) -> bool:
        """Damaged or missing: a check that finds it fails (exit status 1)."""
        return self in (Status.DAMAGED, Status.MISSING)


class Detail(str):
    """A verdict's detail taken from an error: the error's text (what ``str`` gives and
    reports print as JSON; its :meth:`headline` for a reader shown a path) with its fields
    kept, so a display picks from them (:meth:`headline`, :meth:`short`) instead of
    cutting the text apart."""

    lead: Optional[str]  #: the path the text starts with (see :class:`ckpt.errors.CkptError`)
    what: str  #: what went wrong
    hint: str
    summary: str  #: what went wrong in a few words (:attr:`ckpt.errors.CkptError.summary`)

    @classmethod
    def of(cls, error: CkptError, shown: Optional[PathLike] = None) -> Detail:
        """``error``'s detail; given ``shown``, its text is ``error.headline(shown)``."""
        detail = cls(str(error) if shown is None else error.headline(shown))
        detail.lead, detail.what, detail.hint, detail.summary = error.lead, error.message, error.hint, error.summary
        return detail

    def headline(self, shown: Optional[PathLike] = None) -> str:
        """The path (unless it is ``shown``) and what went wrong, no hint."""
        return errors.headline(self.lead, self.what, shown)

    def short(self, shown: Optional[PathLike] = None) -> str:
        """The path (unless it is ``shown``) and what went wrong in a few words."""
        return errors.headline(self.lead, self.summary, shown)


class Verdict(NamedTuple):
    """A checkpoint's :class:`Status` and what was found (``""`` when it is ok)."""

    status: Status
    detail: str = ""


class Quarantined(enum.Enum):
    """What moving a checkpoint that failed to load aside did."""

    MOVED = "moved"  #: renamed ``*.corrupt`` and dropped from the index
    GONE = "gone"  #: not there any more (a concurrent writer's retention)
    REPLACED = "replaced"  #: a writer replaced it since (another checksum): left as it is
    READS_NOW = "reads now"  #: it loads under the lock (a concurrent replace): left as it is
    FAILED = "failed"  #: it could not be moved (it will be skipped again)


class Quarantine(NamedTuple):
    """A :class:`Quarantined` outcome; ``where`` is the new path (``MOVED``) or the error
    that kept it in place (``FAILED``)."""

    outcome: Quarantined
    where: str = ""


class CatalogWarning(UserWarning):
    """A problem the catalog's listing found, left out of the listing and warned about."""


class MissingFilesWarning(CatalogWarning):
    """Indexed checkpoints whose files are gone from disk."""


class UnindexedFileWarning(CatalogWarning):
    """A checkpoint-named file the index does not list that is damaged or unreadable."""
