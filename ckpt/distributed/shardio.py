"""DCP storage of ckpt's own: each file's size and CRC-32 taken as its bytes stream out.

:class:`SummingWriter` is ``torch.distributed.checkpoint``'s ``FileSystemWriter`` over
a file layer that wraps every stream it opens for writing in ckpt's checksum writer
(:class:`ckpt.io.checksum.ChecksumWriter`: the CRC-32 runs beside the write, and
completed ranges go to the kernel's writeback early). When DCP closes a file, its size
and CRC-32 are in :attr:`SummingWriter.sums`, keyed by the file's name in the
checkpoint directory: nothing is read back to checksum it. The files, their names
and ``.metadata`` are DCP's own, byte for byte (see docs/howto/fsdp2.md).

Durability: on a local disk DCP fsyncs each file it writes once (``sync_files``);
nothing else does. On an object store (:func:`fsspec_layer`) there is no fsync: an
object exists, whole, once its upload completed; ``sync_files`` is off there (DCP would
otherwise fall back to ``os.sync()``, the whole machine's page cache).

:class:`TreeReader` reads the same directory through either layer for ``dcp.load``.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Generator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemBase, FileSystemReader, FileSystemWriter

from ..format import torchio
from ..io.checksum import ChecksumWriter

Sums = dict[str, dict[str, int]]


class _Summed(ChecksumWriter):
    """The stream DCP writes a file through: ckpt's checksum writer, with the position DCP asks for."""

    def tell(self) -> int:
        return self.size  # every file is written from its start ("wb")

    def close(self) -> None:
        self.flush()  # the file itself is closed by the layer that opened it

    def seekable(self) -> bool:
        return False


class _SummingLayer(FileSystemBase):
    """DCP's file layer ``inner``, with the size and CRC-32 of each file written kept in ``sums``."""

    def __init__(self, inner: FileSystemBase) -> None:
        self.inner = inner
        self.sums: Sums = {}
        self._lock = threading.Lock()  # DCP may write from several threads

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        with self.inner.create_stream(path, mode) as raw:
            if "w" not in mode and "a" not in mode:
                yield raw
                return
            summed = _Summed(cast(Any, raw))
            yield cast(io.IOBase, summed)
            summed.flush()
            with self._lock:
                self.sums[_name(path)] = {"size": summed.size, "crc32": summed.crc}

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str | os.PathLike[str]:
        return self.inner.concat_path(path, suffix)

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        self.inner.rename(path, new_path)  # DCP's .metadata.tmp -> .metadata
        with self._lock:
            if _name(path) in self.sums:
                self.sums[_name(new_path)] = self.sums.pop(_name(path))

    def init_path(self, path: str | os.PathLike[str]) -> str | os.PathLike[str]:
        return self.inner.init_path(path)

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        self.inner.mkdir(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def exists(self, path: str | os.PathLike[str]) -> bool:
        return self.inner.exists(path)

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        self.inner.rm_file(path)
        with self._lock:
            self.sums.pop(_name(path), None)


class _FsspecLayer(FileSystemBase):
    """DCP's file layer over an fsspec filesystem that ckpt opened already (its options,
    its credentials); keys are ``<root>/<checkpoint>/<file>``. A failed write removes
    what it left (an object store keeps no partial object, but a local fsspec may)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        key = os.fspath(path)
        with self.fs.open(key, mode) as stream:
            try:
                yield stream
            except BaseException:
                if "r" not in mode:
                    _discard(stream)
                raise

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str | os.PathLike[str]:
        return f"{os.fspath(path).rstrip('/')}/{suffix}"

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        self.fs.mv(os.fspath(path), os.fspath(new_path))

    def init_path(self, path: str | os.PathLike[str]) -> str | os.PathLike[str]:
        return os.fspath(path)

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        self.fs.makedirs(os.fspath(path), exist_ok=True)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return True

    def exists(self, path: str | os.PathLike[str]) -> bool:
        return bool(self.fs.exists(os.fspath(path)))

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        self.fs.rm_file(os.fspath(path))


def fsspec_layer(fs: Any) -> FileSystemBase:
    """DCP's file layer for keys of the fsspec filesystem ``fs``."""
    return _FsspecLayer(fs)


class SummingWriter(FileSystemWriter):
    """``FileSystemWriter`` into ``path`` whose files are checksummed as they are written
    (:attr:`sums`). ``layer``: an fsspec layer (:func:`fsspec_layer`) for an object store;
    the local disk by default, each file fsynced once."""

    def __init__(self, path: str | os.PathLike[str], layer: FileSystemBase | None = None) -> None:
        super().__init__(path, sync_files=layer is None, overwrite=True)
        self._layer = _SummingLayer(layer if layer is not None else FileSystem())
        self.fs = self._layer  # type: ignore[assignment]  # DCP types it FileSystem, uses FileSystemBase
        self.path = self._layer.init_path(path)

    @property
    def sums(self) -> Sums:
        """Size and CRC-32 of every file this writer wrote, by name."""
        return dict(self._layer.sums)


class TreeReader(FileSystemReader):
    """``FileSystemReader`` of the checkpoint directory ``path`` through ``layer``
    (local files by default, an fsspec layer for an object store)."""

    def __init__(self, path: str | os.PathLike[str], layer: FileSystemBase | None = None) -> None:
        super().__init__(path)
        if layer is not None:
            self.fs = layer  # type: ignore[assignment]  # as in DCP's own FsspecReader
            self.path = layer.init_path(path)


class _TieredLayer(_FsspecLayer):
    """Reads each file from the node's cache directory when it holds it, else from the store."""

    def __init__(self, local: Path, fs: Any, key: str) -> None:
        super().__init__(fs)
        self.local, self.key = local, key

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        rel = _name(path)
        if (self.local / rel).is_file():
            with open(self.local / rel, mode) as f:
                yield cast(io.IOBase, f)
            return
        with super().create_stream(f"{self.key}/{rel}", mode) as stream:
            yield stream


def tiered_layer(local: Path, fs: Any, key: str) -> FileSystemBase:
    """DCP's file layer reading a node's cached files, else the store's objects."""
    return _TieredLayer(local, fs, key)


def write_meta(path: Path, meta: Mapping[str, Any]) -> dict[str, int]:
    """Write the plain entries to ``path`` (``torch.save``), fsynced once; its size and CRC-32."""
    with open(path, "wb") as f:
        summed = ChecksumWriter(f)
        torchio.save(dict(meta), cast(Any, summed))
        f.flush()
        os.fsync(f.fileno())
    return {"size": summed.size, "crc32": summed.crc}


def _name(path: str | os.PathLike[str]) -> str:
    return os.fspath(path).replace("\\", "/").rsplit("/", 1)[-1]


def _discard(stream: Any) -> None:
    """Abort an unfinished upload, so closing it does not commit a partial object."""
    with suppress(Exception):  # best effort: the write's own error is raised
        stream.discard()  # fsspec's buffered files; a local file has none (and keeps no upload)

