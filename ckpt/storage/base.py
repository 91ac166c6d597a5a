"""The storage seam: what ckpt needs from a place that holds a run's checkpoints.

Everything above this interface (index, commit, catalog, manager) speaks in names
relative to the run directory and never touches ``os`` or a path; a local directory,
an object store (no rename, no fsync, no lock) and a local cache in front of a remote
store implement it. The contract of :meth:`Store.write` is the commit protocol
(see docs/explanation/commit-protocol.md) for that medium: until it returns, nothing is
visible under ``name``
(listings and readers see the old state); once it returns, the bytes are durable.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, BinaryIO, Callable, Dict, List, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .trees import Tree

#: The catalog's index: the object that commits a run directory's checkpoints, so a store
#: that mirrors objects (the tiered store) sends it after the checkpoints it lists.
INDEX_NAME = "ckpt-index.json"
#: Called with the byte count of each chunk written or read (progress bars).
OnBytes = Optional[Callable[[int], object]]
#: Writes a whole object into the file-like it is given.
Produce = Callable[[BinaryIO], object]


@dataclass(frozen=True)
class Written:
    """What a committed write produced: its name, size and checksum (``crc32:xxxxxxxx``)."""

    name: str
    size: int
    checksum: str


@runtime_checkable
class Store(Protocol):
    """A run directory: atomic writes, listing, reading, deleting and a writer lock."""

    #: Where the run lives, for messages (a path or a URL).
    url: str

    def where(self, name: str) -> PurePath:
        """The location of ``name`` as shown to users and kept in records (a local
        :class:`~pathlib.Path`, or a pure path that prints as the object's URL)."""

    def write(self, name: str, produce: Produce, *, on_write: OnBytes = None) -> Written:
        """Commit ``produce``'s bytes as ``name``, atomically and durably (see the module doc)."""

    def read_bytes(self, name: str) -> bytes:
        """The whole object (small ones: the index); :class:`FileNotFoundError` when absent."""

    def local_path(self, name: str) -> AbstractContextManager[Path]:
        """A local file holding ``name``'s bytes while the context is open (torch maps it)."""

    def list(self, prefix: str = "") -> Dict[str, int]:
        """Committed names starting with ``prefix`` and their sizes (temporaries excluded)."""

    def delete(self, name: str) -> None:
        """Remove a committed object; one that is already gone is not an error."""

    def move(self, src: str, dst: str) -> None:
        """Rename an object (quarantine, putting a kept copy back); ``dst`` is replaced."""

    def keep_aside(self, name: str) -> Optional[str]:
        """A temporary second name for ``name``'s current bytes (to undo an overwrite), or None."""

    def lock(self, timeout: float = -1) -> AbstractContextManager[object]:
        """The writers' lock (``timeout=0``: try once, raise ``filelock.Timeout`` if held)."""

    def clean_temporaries(self) -> List[str]:
        """Remove what crashed writers left (only when no writer holds the lock); their names."""

    def tree(self, name: str) -> Tree:
        """The sharded checkpoint ``name``, a directory of files (:mod:`ckpt.storage.trees`)."""
