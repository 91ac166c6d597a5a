"""Where a sharded save writes, and how it commits: a directory, an object store, a cache.

``ckpt.distributed.sharded.save_to`` drives a target through these steps:

- ``begin()``: the ranks that own the scratch space (``owner``) clear a crashed save's
  leftovers; rank 0 refuses an existing checkpoint of that name;
- ``meta(meta)``: rank 0 writes the plain entries, checksummed as they are written;
- ``writer()``: DCP's storage writer for every rank, checksumming as it writes;
- ``commit(manifest, known)``: rank 0, once every rank's files are written and their
  sums gathered: the manifest, then the commit (a rename; or the commit record, last);
- ``after(manifest)``: every rank, once committed (a tiered store: the other nodes'
  renames, then every rank queues its uploads);
- ``discard()``: the owners, when the save failed.

A :class:`LocalTarget` writes under a scratch name and renames (see
docs/explanation/commit-protocol.md); an :class:`ObjectTarget` writes the objects
under their final keys and commits with the record; a :class:`TieredTarget` commits on
each node's cache like a :class:`LocalTarget`, and uploads in the background: each rank
its own files, rank 0 the manifest and the commit record once every rank has marked its
files uploaded in the rendezvous store (see docs/howto/fsdp2.md).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import warnings
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

from ..errors import CheckpointExistsError, StorageError
from ..format import shardfiles, torchio
from ..io.checksum import ChecksumWriter, crc32, format_checksum
from ..storage.remote_trees import COMMIT_SUFFIX
from ..storage.trees import LocalTree, ObjectTree, Tree, TreeCapabilities
from .collective import Group, sync
from .shardio import SummingWriter, Sums, fsspec_layer, write_meta

_COPY = 8 << 20


class LocalTarget:
    """A directory written as ``tmp`` and renamed to ``final`` by rank 0 (``aside``: where
    an existing ``final`` goes, an overwrite)."""

    def __init__(self, ctx: Group, tmp: Path, final: Path, aside: Path | None = None) -> None:
        self.ctx, self.tmp, self.final, self.aside = ctx, Path(tmp), Path(final), aside
        self.owner = ctx.is_leader
        self.shown: os.PathLike[str] = self.final

    def begin(self) -> None:
        if self.ctx.is_leader and self.final.exists() and self.aside is None:
            raise CheckpointExistsError("a checkpoint of that name is already committed", path=self.final,
                                        hint="save under a new (epoch, step)")
        if self.owner:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)

    def meta(self, meta: dict[str, Any]) -> dict[str, int]:
        return write_meta(self.tmp / shardfiles.META, meta)

    def writer(self) -> SummingWriter:
        return SummingWriter(self.tmp)

    def commit(self, manifest: dict[str, Any], known: Sums) -> dict[str, Any]:
        return shardfiles.commit(self.tmp, self.final, manifest, known, aside=self.aside)

    def after(self, manifest: dict[str, Any], mine: Sums) -> None:
        return None

    def discard(self) -> None:
        if self.owner:  # a stuck rank may still write here; resume's cleanup gets what is left
            shutil.rmtree(self.tmp, ignore_errors=True)


class ObjectTarget:
    """Objects written under their final keys; committed by the record, written last."""

    def __init__(self, ctx: Group, tree: ObjectTree) -> None:
        self.ctx, self.tree = ctx, tree
        self.owner = ctx.is_leader
        self.shown = tree.where()
        self.mine = False  # objects this save wrote and has not committed: discard removes them

    def begin(self) -> None:
        if not self.owner:
            return
        if self.tree.retry(lambda: self.tree.fs.exists(self.tree.key + COMMIT_SUFFIX)):
            raise CheckpointExistsError("a checkpoint of that name is already committed", path=self.shown,
                                        hint="save under a new (epoch, step)")
        _remove(self.tree)  # an unfinished save's objects (uncommitted: nobody reads them)
        self.mine = True

    def meta(self, meta: dict[str, Any]) -> dict[str, int]:
        with self.tree.fs.open(self.tree.file_key(shardfiles.META), "wb") as f:
            summed = ChecksumWriter(f)
            torchio.save(dict(meta), cast(Any, summed))
        return {"size": summed.size, "crc32": summed.crc}

    def writer(self) -> SummingWriter:
        return SummingWriter(self.tree.key, fsspec_layer(self.tree.fs))

    def commit(self, manifest: dict[str, Any], known: Sums) -> dict[str, Any]:
        manifest = {**manifest, "files": dict(sorted(known.items()))}
        data = shardfiles.encode_manifest(manifest)
        self.tree.retry(lambda: self.tree.fs.pipe_file(self.tree.file_key(shardfiles.MANIFEST), data))
        self.tree.commit(_total(manifest, data), format_checksum(crc32(data)))
        self.mine = False  # committed: a later failure must leave it whole
        return manifest

    def after(self, manifest: dict[str, Any], mine: Sums) -> None:
        return None

    def discard(self) -> None:
        if self.owner and self.mine:
            _remove(self.tree)


class TieredTarget(LocalTarget):
    """Committed on each node's cache directory, uploaded in the background (module doc).
    ``owner``: the lowest rank on each node (the ranks that share a cache directory)."""

    def __init__(self, ctx: Group, caps: TreeCapabilities, tmp: Path, *, timeout: float) -> None:
        assert caps.directory is not None and caps.objects is not None and caps.upload is not None
        super().__init__(ctx, tmp, caps.directory)
        self.remote, self.later, self.timeout = caps.objects, caps.upload, timeout
        self.shown = caps.objects.where()
        self.owner = node_owner(ctx, self.final.parent, f"save of {self.final.name} (nodes)", timeout)

    def commit(self, manifest: dict[str, Any], known: Sums) -> dict[str, Any]:
        elsewhere = {k: v for k, v in known.items() if not (self.tmp / k).is_file()}  # other nodes' caches
        return shardfiles.commit(self.tmp, self.final, manifest, known, elsewhere=elsewhere)

    def after(self, manifest: dict[str, Any], mine: Sums) -> None:
        if self.owner and not self.ctx.is_leader and self.tmp.exists():
            shutil.rmtree(self.final, ignore_errors=True)  # a leftover of an earlier save of this name
            os.replace(self.tmp, self.final)
        files = sorted(mine)  # rank 0's include .metadata and ckpt-meta.pt
        upload = _Upload(self.ctx, LocalTree(self.final), self.remote, self.tmp, upload_tag(manifest["files"]),
                         files, self.timeout)
        self.later(self.final.name, upload.run, self.ctx.is_leader)


def node_owner(ctx: Group, cache: Path, what: str, timeout: float) -> bool:
    """Collective: is this rank the lowest of the ranks that share its cache directory ``cache``?"""
    st = os.stat(cache)
    places = sync(ctx, what, timeout=timeout, payload=(socket.gethostname(), str(cache.resolve()), st.st_dev,
                                                       st.st_ino))
    return places.index(places[ctx.rank]) == ctx.rank


def upload_tag(files: dict[str, Any]) -> str:
    """The name of one upload of a checkpoint in the rendezvous store: its files' sums."""
    return f"{zlib.crc32(json.dumps(files, sort_keys=True).encode()):08x}"


def upload_again(ctx: Group, tree: Tree, tag: str, files: list[str], timeout: float) -> None:
    """Queue the upload of a sharded checkpoint committed in the caches and not on the
    store (a killed job's): this rank uploads ``files`` (those of its node's cache: the
    node's lowest rank), rank 0 the manifest and the record last."""
    caps = tree.capabilities()
    assert caps.directory is not None and caps.objects is not None and caps.upload is not None
    upload = _Upload(ctx, LocalTree(caps.directory), caps.objects, caps.directory, tag, files, timeout)
    caps.upload(caps.directory.name, upload.run, ctx.is_leader)


class _Upload:
    """One rank's background upload of its files of a tiered sharded checkpoint."""

    def __init__(self, ctx: Group, cache: LocalTree, remote: ObjectTree, tmp: Path, tag: str, files: list[str],
                 timeout: float) -> None:
        self.ctx, self.cache, self.remote, self.tmp, self.files, self.timeout = ctx, cache, remote, tmp, files, timeout
        self.prefix = f"ckpt-up/{cache.path.name}/{tag}/"

    def run(self, remote: Any) -> int:
        """This rank's files up; rank 0: then the commit record, once every file is up
        (-1: some file is in no cache, nothing committed, with a warning)."""
        store = self.ctx.store
        try:
            for rel in self.files:
                self._put(rel)
        except BaseException as e:
            if store is not None and not self.ctx.is_leader:
                store.set(f"{self.prefix}{self.ctx.rank}", f"error: {type(e).__name__}: {e}")
            raise
        if not self.ctx.is_leader:
            if store is not None:
                store.set(f"{self.prefix}{self.ctx.rank}", "ok " + json.dumps(self.files))
            return 0
        sent = set(self.files) | self._others_done()
        data = self.cache.read_bytes(shardfiles.MANIFEST)
        manifest = shardfiles.parse_manifest(data, self.cache.path / shardfiles.MANIFEST)
        missing = sorted(set(manifest["files"]) - sent)
        if missing:  # a node's cache lost its part: committing would list a checkpoint with files missing
            warnings.warn(f"{self.remote.where()}: not uploaded, {missing} are in no node's cache "
                          "(the checkpoint stays in the caches that hold it)", stacklevel=1)
            return -1
        obj = self.remote
        obj.retry(lambda: obj.fs.pipe_file(obj.file_key(shardfiles.MANIFEST), data))
        size = _total(manifest, data)
        obj.commit(size, format_checksum(crc32(data)))  # last: the checkpoint exists on the store now
        return size

    def _source(self, rel: str) -> Path:
        # final, scratch, final again: the save may rename the scratch directory in between
        for path in (self.cache.path / rel, self.tmp / rel, self.cache.path / rel):
            if path.is_file():
                return path
        raise FileNotFoundError(2, "a file of the checkpoint is gone from the cache before its upload",
                                str(self.cache.path / rel))

    def _put(self, rel: str) -> None:
        obj = self.remote

        def put() -> None:
            with open(self._source(rel), "rb") as src, obj.fs.open(obj.file_key(rel), "wb") as dst:
                shutil.copyfileobj(src, dst, _COPY)

        obj.retry(put)

    def _others_done(self) -> set[str]:
        """The files the other ranks uploaded, once every one has reported."""
        store = self.ctx.store
        if store is None or self.ctx.world_size == 1:
            return set()
        keys = [f"{self.prefix}{r}" for r in range(1, self.ctx.world_size)]
        try:
            store.wait(keys, timedelta(seconds=self.timeout))
        except Exception as e:  # noqa: BLE001 - a rank died or hangs: the upload stays uncommitted
            raise StorageError(f"not every rank uploaded its files within {self.timeout:g} s ({e})",
                               path=self.remote.where(), hint="the checkpoint stays committed in the "
                               "caches; the next save uploads a newer one") from e
        got = {k: store.get(k).decode() for k in keys}
        for k in keys:
            store.delete_key(k)
        failed = [(k, v) for k, v in got.items() if not v.startswith("ok ")]
        if failed:
            raise StorageError(f"ranks failed to upload their files: {failed}", path=self.remote.where(),
                               hint="see those ranks' warnings; the next save uploads a newer checkpoint")
        return {rel for v in got.values() for rel in json.loads(v[3:])}


def for_tree(ctx: Group, tree: Tree, tmp_name: str, *, aside: Path | None, timeout: float) -> Any:
    """The target that writes ``tree`` (``tmp_name``: the scratch name beside a local one)."""
    caps = tree.capabilities()
    if caps.objects is None:
        assert caps.directory is not None  # a tree is local files, objects, or both
        return LocalTarget(ctx, caps.directory.parent / tmp_name, caps.directory, aside)
    if caps.directory is not None:  # a node's cache, uploaded in the background
        return TieredTarget(ctx, caps, caps.directory.parent / tmp_name, timeout=timeout)
    return ObjectTarget(ctx, caps.objects)


def _total(manifest: dict[str, Any], data: bytes) -> int:
    return sum(int(f["size"]) for f in manifest["files"].values()) + len(data)


def _remove(tree: ObjectTree) -> None:
    try:
        tree.retry(lambda: tree.fs.rm(tree.key, recursive=True))
    except FileNotFoundError:
        pass
