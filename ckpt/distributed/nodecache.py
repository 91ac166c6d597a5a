"""What a killed job left in each node's cache, put right when the run is opened again.

Under a process group rank 0 alone opens the run (:mod:`ckpt.engine.collective`), and
with ``cache_dir`` each node has a cache of its own. So after rank 0 opened it, every
rank with a cache (:func:`reopen`):

- the other nodes' ranks clean their own cache: a sharded save's scratch directory
  (staged, never committed) goes, under the cache's lock, one rank of a node at a time;
  but the scratch directory of a checkpoint rank 0 committed (the node was killed
  before its own rename) holds that node's part of it: it is renamed into place;
- a sharded checkpoint committed in the caches whose upload did not finish (no commit
  record on the store, :func:`backlog`) is uploaded again, each node's lowest rank its
  cache's files, rank 0 the manifest and the record last, and the open waits for it:
  its files are spread over the nodes' caches, so no rank could load it before
  (docs/explanation/remote-runs.md).
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path
from typing import Any

from .. import schema
from ..errors import CkptError, StorageError
from ..format.shardfiles import read_manifest
from ..record import CheckpointRecord
from ..storage.base import Store, capabilities
from ..storage.local import scratch_dir
from .collective import Group
from .targets import node_owner, upload_again, upload_tag

#: (name, upload tag, its files but the manifest) of a checkpoint to upload again.
Unsent = tuple[str, str, list[str]]


def backlog(store: Store, records: list[CheckpointRecord]) -> list[Unsent]:
    """Rank 0, once the run is open: the listed sharded checkpoints committed in its cache
    and not on the store, oldest first."""
    cache = capabilities(store).cache
    if cache is None:
        return []
    listed = {r.name for r in records}
    out: list[Unsent] = []
    for name in cache.unsent_dirs():
        directory = store.tree(name).capabilities().directory
        if name not in listed or directory is None:
            continue
        try:
            files = read_manifest(directory)["files"]
        except (CkptError, OSError):
            continue  # damaged: the listing skips it too
        out.append((name, upload_tag(files), sorted(files)))
    return out


def reopen(ctx: Group, store: Store, records: list[CheckpointRecord], unsent: list[Any], timeout: float) -> None:
    """Every rank, after rank 0 opened the run: this node's cache put right (module doc)."""
    caps = capabilities(store)
    root = caps.local_copies
    if caps.cache is None or root is None:
        return
    owner = bool(unsent) and node_owner(ctx, Path(root), "CheckpointManager() (nodes)", timeout)
    if not ctx.is_leader:  # rank 0's cache was cleaned by the open
        for rec in records:
            if schema.is_sharded(rec.name) and not (root / rec.name).exists():
                with suppress(FileNotFoundError):  # another rank of this node was first
                    os.replace(root / scratch_dir(rec.name), root / rec.name)
        caps.cache.clean_cache()
    for name, tag, files in unsent:
        here = root / name
        mine = [f for f in files if (here / f).is_file()] if owner else []
        upload_again(ctx, store.tree(name), tag, mine, timeout)
    flush = caps.flush
    if unsent and flush is not None:
        try:
            flush()
        except StorageError:
            pass  # warned by the upload; left pending: retried by wait() and close(), raised if it fails again
