"""One writer per remote run directory: the writer claim (a small object, ``.ckpt-writer``).

A manager claims the run on its first commit and checks, at each later one, that the
claim is still its own: a second writer that took the run over makes the first one's
saves fail with a clear "another writer" error, never race it. A clean ``close()``
frees the claim at once; a killed writer's claim is simply replaced by the restarted
job (a writer always takes over), so nothing is locked out. A tool (``ckpt prune``)
never takes over: it refuses while a writer holds the run.
"""

from __future__ import annotations

import os
import secrets
import time
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any, Callable, Iterator, Optional, TypeVar

from ..errors import StorageError

T = TypeVar("T")
WRITER_NAME = ".ckpt-writer"


class WriterClaim:
    """Mixin of :class:`ckpt.storage.remote.FsspecStore`: the writer claim of its run directory."""

    url: str
    fs: Any
    writer: bool
    _token: Optional[str]

    def _key(self, name: str) -> str:
        raise NotImplementedError

    def _retry(self, fn: Callable[[], T], name: str = "", action: str = "accessing the store") -> T:
        raise NotImplementedError

    def abort_uploads(self, before: float) -> int:
        raise NotImplementedError

    def lock(self, timeout: float = -1) -> AbstractContextManager[object]:
        return self._writer_check()

    @contextmanager
    def _writer_check(self) -> Iterator[object]:
        """Claim the run directory on the first lock; on later ones check no one else has.
        Not a writer (a tool): refuse while a writer holds the run, else claim it for the
        duration of the lock only."""
        if not self.writer:
            with self._borrowed():
                yield self
            return
        if self._token is None:
            token = f"{os.getpid()}-{secrets.token_hex(8)}"
            self._retry(lambda: self.fs.pipe_file(self._key(WRITER_NAME), token.encode()), WRITER_NAME,
                        "claiming the run directory")
            self._token = token
            self.abort_uploads(before=time.time())  # a previous writer's: it is dead or taken over
        elif self._claimant() != self._token:
            raise self._conflict()
        yield self

    @contextmanager
    def _borrowed(self) -> Iterator[None]:
        holder = self._claimant()
        if holder is not None:
            raise StorageError(f"a writer holds this run directory (claim {holder!r} in {WRITER_NAME}); "
                               "changing it now would take the run over and fail that writer's saves",
                               path=self.url, hint="run this once the writer closed its CheckpointManager (a "
                                                   "clean close() frees the run); if the writer was killed, "
                                                   f"delete {self.url}/{WRITER_NAME} first")
        self._token = f"tool-{os.getpid()}-{secrets.token_hex(8)}"
        self._retry(lambda: self.fs.pipe_file(self._key(WRITER_NAME), str(self._token).encode()), WRITER_NAME,
                    "claiming the run directory")
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        """Free the run directory if this process holds it (a clean close); best effort."""
        token, self._token = self._token, None
        if token is not None:
            with suppress(Exception):
                if self._claimant() == token:
                    self.fs.rm_file(self._key(WRITER_NAME))

    def _claimant(self) -> Optional[str]:
        """The token of the writer that holds the run directory now (None: nobody)."""
        try:
            raw: bytes = self._retry(lambda: self.fs.cat_file(self._key(WRITER_NAME)), WRITER_NAME,
                                     "checking the run directory's writer")
            return raw.decode(errors="replace")
        except FileNotFoundError:
            return None

    def _conflict(self, what: str = "") -> StorageError:
        error = StorageError("another writer has taken over this run directory" + (f" ({what})" if what else ""),
                             path=self.url, hint="one writer per run directory on object stores: stop "
                                                 "the other process, or give each run its own prefix")
        error.writer_conflict = True  # type: ignore[attr-defined]
        return error

