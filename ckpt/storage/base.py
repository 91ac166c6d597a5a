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
from typing import TYPE_CHECKING, BinaryIO, Callable, Dict, List, Optional, Protocol, Tuple, runtime_checkable

if TYPE_CHECKING:
    from .trees import Tree

#: The catalog's index: the object that commits a run directory's checkpoints, so a store
#: that mirrors objects (the tiered store) sends it after the checkpoints it lists.
INDEX_NAME = "ckpt-index.json"
#: The catalog's other bookkeeping objects: the index's journal, the metric history and
#: its earlier segments (``ckpt-history-<ns>.jsonl``).
JOURNAL_NAME = "ckpt-index.log"
HISTORY_NAME = "ckpt-history.jsonl"


def bookkeeping(name: str) -> bool:
    """One of the catalog's small objects that describe a run but are not checkpoints
    (an object store writes each whole, in one request: see ckpt.storage.remote_small)."""
    return name in (INDEX_NAME, JOURNAL_NAME, HISTORY_NAME) or (
        name.startswith("ckpt-history-") and name.endswith(".jsonl") and "/" not in name)
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

    def lock(self, timeout: float = -1, *, commit: bool) -> AbstractContextManager[object]:
        """The writers' lock (``timeout=0``: try once, raise ``filelock.Timeout`` if held).
        ``commit``: held for a writer's commit, which a remote run's writer makes under its
        writer lease (taken the first time); False: a repair or a tool's change, which only
        borrows the lease (see :mod:`ckpt.storage.claim`)."""

    def clean_temporaries(self) -> List[str]:
        """Remove what crashed writers left (only when no writer holds the lock); their names."""

    def tree(self, name: str) -> Tree:
        """The sharded checkpoint ``name``, a directory of files (:mod:`ckpt.storage.trees`)."""


# -- capabilities: what some stores can do beyond the Store protocol -------------------
#
# A caller never probes a store (``getattr``, ``isinstance`` against a back-end); it asks
# :func:`capabilities` once and uses what it gets (None: the store cannot).


@runtime_checkable
class Identifies(Protocol):
    """Tells whether a file changed without reading it (a local directory)."""

    def identity(self, name: str) -> Optional[Tuple[int, int, int]]:
        """(inode, size, mtime_ns) of ``name`` (``"."``: the directory itself), None when absent."""


@runtime_checkable
class Appends(Identifies, Protocol):
    """Appends durably to a file, and tells when it changed: what the index's journal needs."""

    def append(self, name: str, data: bytes) -> None:
        """Append ``data`` to ``name`` durably (created if absent)."""


@runtime_checkable
class ListsDirectories(Protocol):
    """Lists directories (sharded checkpoints) beside the files."""

    def list_dirs(self, prefix: str = "") -> Dict[str, int]:
        """Committed directories starting with ``prefix`` and their total sizes."""


@runtime_checkable
class Flushes(Protocol):
    """Has work of its own in the background (a tiered store's uploads)."""

    def flush(self) -> None:
        """Wait until that work is done; raise its error."""


@runtime_checkable
class Releases(Protocol):
    """Holds a claim on the run directory beyond its lock (a remote writer's)."""

    def release(self) -> None:
        """Give the run directory up: the next writer may take it at once."""


@runtime_checkable
class RecordsChecksums(Protocol):
    """Keeps each object's checksum beside it (an object store's commit record)."""

    def recorded_checksum(self, name: str) -> Optional[str]:
        """The checksum recorded when ``name`` was committed, None when there is none."""


@runtime_checkable
class Caches(Protocol):
    """A local cache in front of the run (a tiered store): each node of a job has its own."""

    def clean_cache(self) -> List[str]:
        """Remove what crashed writers left in the cache alone; their names."""

    def unsent_dirs(self) -> List[str]:
        """Sharded checkpoints committed in the cache and not on the remote tier."""


@dataclass(frozen=True)
class Capabilities:
    """What one store can do beyond :class:`Store`, each None (or False) where it cannot."""

    #: See :class:`Identifies`.
    identity: Optional[Callable[[str], Optional[Tuple[int, int, int]]]] = None
    #: See :class:`Appends` (only with ``identity``).
    append: Optional[Callable[[str, bytes], None]] = None
    #: See :class:`ListsDirectories`.
    list_dirs: Optional[Callable[[str], Dict[str, int]]] = None
    #: See :class:`Flushes`.
    flush: Optional[Callable[[], None]] = None
    #: See :class:`Releases`.
    release: Optional[Callable[[], None]] = None
    #: See :class:`RecordsChecksums`.
    recorded_checksum: Optional[Callable[[str], Optional[str]]] = None
    #: See :class:`Caches`.
    cache: Optional[Caches] = None
    #: The run directory is this real (local or shared POSIX) directory: files can be
    #: opened, appended to and hold directories (the metrics history, sharded checkpoints).
    local_root: Optional[Path] = None
    #: A directory holding a local copy of each file the store has (a local directory;
    #: a tiered store's cache): a file there unchanged since it was checked is not read again.
    local_copies: Optional[Path] = None
    #: The writers' lock excludes every other writer (not only a second manager of this
    #: process), so files no commit references yet are a crashed writer's.
    exclusive_lock: bool = False


@runtime_checkable
class DescribesItself(Protocol):
    """A store that says its capabilities itself (a local directory, a wrapper forwarding
    those of what it wraps)."""

    def capabilities(self) -> Capabilities:
        """This store's :class:`Capabilities`."""


def capabilities(store: object) -> Capabilities:
    """What ``store`` can do beyond :class:`Store` (compute it once and keep it)."""
    if isinstance(store, DescribesItself):
        return store.capabilities()
    return probed(store)


def probed(store: object) -> Capabilities:
    """The capabilities ``store``'s methods give (each Protocol above); no local files, no
    exclusive lock. A store that has more says so in its own ``capabilities()``."""
    return Capabilities(
        identity=store.identity if isinstance(store, Identifies) else None,
        append=store.append if isinstance(store, Appends) else None,
        list_dirs=store.list_dirs if isinstance(store, ListsDirectories) else None,
        flush=store.flush if isinstance(store, Flushes) else None,
        release=store.release if isinstance(store, Releases) else None,
        recorded_checksum=store.recorded_checksum if isinstance(store, RecordsChecksums) else None,
        cache=store if isinstance(store, Caches) else None)
