"""Deprecated: ``ckpt.store`` was split into :mod:`ckpt.storage` (back-ends),
:mod:`ckpt.format` (file formats), :mod:`ckpt.catalog` (committed checkpoints) and
:mod:`ckpt.io` (checksums, POSIX helpers). This module re-exports the public names for
one release, and ``ckpt.store.<module>`` still imports the module from its new place;
import from the new packages instead. Nothing in ckpt imports it.
"""

from __future__ import annotations

import importlib
import sys

from ..catalog import Catalog
from ..storage import LocalStore, Store, Written, check_location, is_url, open_existing, open_store

__all__ = ["Store", "Written", "Catalog", "LocalStore", "open_store", "open_existing", "is_url", "check_location"]

#: Where each module of the old package lives now.
MOVED = {
    **{m: "ckpt.storage." + m for m in ("base", "local", "remote", "tiered", "retry", "claim",
                                        "trees", "remote_trees")},
    **{m: "ckpt.format." + m for m in ("torchfile", "torchio", "torchzip", "shardfiles", "directread", "chunks",
                                       "changes")},
    **{m: "ckpt.catalog." + m for m in ("catalog", "commit", "book", "index", "history", "differential",
                                        "sharddir", "namespace")},
    "checksum": "ckpt.io.checksum",
}


for _old, _new in MOVED.items():  # ``ckpt.store.local`` is ``ckpt.storage.local``: one module, two names
    sys.modules[f"{__name__}.{_old}"] = globals()[_old] = importlib.import_module(_new)
