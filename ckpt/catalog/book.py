"""The writer's copy of the index: a save's bookkeeping that does not grow with the run.

Without it, every commit would read and parse the whole index, list the directory and
rewrite the index: linear in the number of checkpoints. A :class:`Book` keeps the
records this process last saw committed and the index files' identity (inode, size,
mtime). Under the writers' lock an unchanged identity means no other writer has
committed since, so the records are current without reading anything; a changed one
(another writer, a hand edit) sends the caller back to a full scan. A commit appends
one journal line instead of rewriting the index; the journal is folded into the
snapshot once it outgrows it (amortised constant cost), and a small index is simply
rewritten whole, so a short run's directory holds one plain JSON file.

A file added or removed by hand changes the directory's identity too, so the next
commit scans; on a filesystem with coarse timestamps a change within the same clock
tick as this process's last commit may be seen only at the next scan (opening the
directory, ``refresh``, ``resume``).

Stores that cannot append or identify a file (object stores) get the full rewrite
and a scan on every commit, as before.
"""

from __future__ import annotations

import threading
from typing import List, Optional, Tuple

from ..record import CheckpointRecord
from ..storage.base import Store, capabilities
from . import index

#: Below this snapshot size (about 50 checkpoints) the index is rewritten whole.
JOURNAL_MIN = 16 << 10


#: What a commit changed: the records it added, the file names it dropped.
Change = Tuple[List[CheckpointRecord], List[str]]


class Book:
    """The records this process last saw committed -- the one list a manager shows (its
    ``checkpoints``) -- and whether they are what the index holds now: they are, while
    the index is unchanged since this book wrote or read it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._caps = capabilities(store)
        self._journal = self._caps.append is not None  # the journal needs appends
        self._lock = threading.Lock()
        self._records: List[CheckpointRecord] = []  # sorted by key: the committed records, as last seen
        self._known = False  # _records are what the index of identity _seen holds
        self._seen: Optional[index.Identity] = None
        self._dir: Optional[Tuple[int, int, int]] = None  # the directory's identity after our last change
        self._snapshot = 0  # snapshot size
        self._tail = 0  # journal bytes in whole lines
        self._appendable = False  # the files on disk hold exactly _records, with no torn line

    @property
    def records(self) -> List[CheckpointRecord]:
        """The committed records this process last saw (wrote, scanned or was told of),
        oldest first; possibly stale: :meth:`current` says whether they still are."""
        with self._lock:
            return list(self._records)

    def show(self, records: List[CheckpointRecord]) -> None:
        """``records`` (sorted) are the committed records now, as a scan that did not
        :meth:`remember` them found, or as another process (rank 0) says: unless they are
        the ones this book holds, it no longer knows the index."""
        with self._lock:
            if records != self._records:
                self._records, self._known = list(records), False

    def current(self) -> Optional[List[CheckpointRecord]]:
        """The committed records if no writer changed the index since this book saw it
        (the caller holds the writers' lock), else None: scan and :meth:`remember`."""
        with self._lock:
            if (not self._known or self._seen is None or index.identity(self.store, self._caps) != self._seen
                    or self._dir is None or self._directory() != self._dir):
                self._known = False
                return None
            return list(self._records)

    def seal(self) -> None:
        """This process's commit is over: remember the directory as it left it, so that
        a file added or removed by hand since sends the next commit to a full scan."""
        with self._lock:
            self._dir = self._directory()

    def directory(self) -> Optional[Tuple[int, int, int]]:
        """The run directory's identity (None where the store cannot tell)."""
        return self._directory()

    def _directory(self) -> Optional[Tuple[int, int, int]]:
        ident = self._caps.identity
        return ident(".") if ident is not None else None

    def peek(self, seen: Optional[index.Identity]) -> Optional[Tuple[List[CheckpointRecord], int]]:
        """What the index of identity ``seen`` holds, if this book knows it exactly (a
        reader then skips decoding it), and the journal bytes applied."""
        with self._lock:
            if seen is None or seen != self._seen or not self._known or not self._appendable:
                return None
            return list(self._records), self._tail

    def remember(self, records: List[CheckpointRecord], raw: index.Raw, seen: Optional[index.Identity], *,
                 stale: bool, applied: int = 0, directory: Optional[Tuple[int, int, int]] = None) -> None:
        """A scan found ``records`` (sorted) with the index ``raw`` of identity ``seen``;
        ``stale``: the index does not say exactly that (the next write rewrites it);
        ``applied``: the journal bytes that were whole lines; ``directory``: the
        directory's identity taken before the listing (a change after it is seen)."""
        with self._lock:
            self._records, self._known = list(records), seen is not None
            self._seen = seen
            self._dir = directory
            self._snapshot = len(raw.snapshot or b"")
            self._tail = applied
            self._appendable = not stale and applied == len(raw.journal or b"")

    def write(self, records: List[CheckpointRecord], change: Optional[Change] = None) -> None:
        """Commit the index as ``records`` (sorted by key). With ``change`` (what differs
        from the records this book holds) that is one journal line, unless the journal
        would outgrow the snapshot; without, the whole snapshot."""
        with self._lock:
            line = b""
            if (change is not None and self._known and self._journal and self._appendable
                    and self._snapshot >= JOURNAL_MIN):
                line = index.encode_line(*change)
            self._known = False  # until the write has succeeded
            append = self._caps.append
            if line and append is not None and self._tail + len(line) <= self._snapshot:
                append(index.JOURNAL_NAME, line)
                self._tail += len(line)
            else:
                self._snapshot, self._tail = index.write(self.store, records), 0
            self._appendable = True
            self._records, self._known = list(records), True
            self._seen = index.identity(self.store, self._caps)

    def restore(self, before: List[CheckpointRecord]) -> None:
        """Put the index back to ``before``, the records when the commit started (the
        caller is raising the original error; if this fails too, the next scan repairs
        what it finds)."""
        with self._lock:
            self._records, self._known = list(before), False
            try:
                if before:
                    index.write(self.store, before)
                else:
                    self.store.delete(index.INDEX_NAME)
                    self.store.delete(index.JOURNAL_NAME)
            except OSError:
                pass
