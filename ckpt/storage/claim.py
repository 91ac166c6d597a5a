"""One writer per remote run directory: the store's side of the writer lease.

A manager takes the lease (:mod:`ckpt.storage.lease`) at its first commit and checks it at
each later one: a second writer is refused with
:class:`~ckpt.errors.WriterConflictError`, and a writer whose lease was taken over (it
stopped renewing it for a whole time to live) stops at its next commit. While the
lease is held, the store knows the run as only its writer can change it: what it
listed, wrote and deleted (:meth:`WriterClaim.identity`), so a commit needs no listing
of the run. A clean ``close()`` frees the lease at once. A tool (``ckpt prune``), or a
writer's short repair when opening the run (``lock(commit=False)``), borrows the lease for
the duration of the lock only, and never takes it from a live writer.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Dict, Iterator, Optional, Set, Tuple, TypeVar

from filelock import Timeout

from ..errors import WriterConflictError
from .lease import Lease

T = TypeVar("T")


class WriterClaim:
    """Mixin of :class:`ckpt.storage.remote.FsspecStore`: the writer lease of its run directory."""

    url: str
    fs: Any
    writer: bool
    lease: Lease
    _known: Optional[Dict[str, int]]  # names with a commit record -> generation, while the lease is held
    _generation: int

    def lock(self, timeout: float = -1, *, commit: bool) -> AbstractContextManager[object]:
        return self._writer_check(commit)

    @contextmanager
    def _writer_check(self, commit: bool) -> Iterator[object]:
        """A writer's commit: take the lease (the first time; waiting for a dead writer's
        lease to expire) or check it. A tool, or a writer's repair without the lease: borrow it."""
        if self.writer and (commit or self.lease.held):
            if self.lease.held:
                self.lease.check()
            else:
                self.lease.acquire(wait=True)
            yield self
            return
        try:
            self.lease.acquire(wait=False)
        except WriterConflictError:
            if self.writer:
                raise Timeout(self.url) from None  # a writer's repair when opening: skipped
            raise
        try:
            yield self
        finally:
            self.release()

    def release(self) -> None:
        """Free the run directory if this process holds it (a clean close); best effort."""
        self.lease.release()
        self._known = None

    def lost(self) -> bool:
        """Taken over (known without a request: the heartbeat or a commit saw it)."""
        return self.lease.lost is not None

    # -- what the lease holder knows of its run ----------------------------------------

    def identity(self, name: str) -> Optional[Tuple[int, int, int]]:
        """``name``'s identity as this writer last changed or listed it, None when the
        lease is not held (then nothing is known: callers read and list) or the name
        is absent. ``"."``: the run's, changed by every write and delete of this store."""
        known = self._known
        if known is None or not self.lease.held:
            return None
        if name == ".":
            return (self.lease.epoch, 0, self._generation)
        gen = known.get(name)
        return None if gen is None else (self.lease.epoch, 1, gen)

    def _noted(self, name: str, present: bool) -> None:
        """This store wrote (``present``) or deleted ``name``."""
        self._generation += 1
        if self._known is not None:
            if present:
                self._known[name] = self._generation
            else:
                self._known.pop(name, None)

    def _listed(self, recorded: Set[str], held: bool, epoch: int) -> None:
        """A listing found these names with a commit record (taken while the lease was
        ``held`` under ``epoch``): remembered while the lease is still held."""
        if held and self.lease.held and self.lease.epoch == epoch:
            self._generation += 1
            self._known = {n: self._generation for n in recorded}
