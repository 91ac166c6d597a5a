"""Verifying every committed checkpoint of a run directory, against a concurrent writer.

:meth:`ckpt.catalog.Catalog.verify` is this: each checkpoint checked against its
checksum, and a verdict that a concurrent writer may have made wrong (a file gone, or
failing its checksum, in a listing since changed) looked up again in a fresh listing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional

from ..errors import CkptError
from ..verdicts import Detail, Status, Verdict

if TYPE_CHECKING:
    from .catalog import Catalog

#: How often verify() looks again at files a concurrent writer replaced or deleted meanwhile.
VERIFY_PASSES = 5


def verify(cat: Catalog, *, progress: Optional[bool] = None) -> Dict[str, Verdict]:
    """File name -> :class:`~ckpt.verdicts.Verdict` (ok, damaged or missing, and the
    detail) for every committed checkpoint.

    A verdict against a listing that a concurrent writer has changed since is not one:
    a file that is gone or fails its checksum is looked up again in a fresh listing.
    Gone from the index too, it was evicted (left out of the report); replaced (a new
    checksum) or back under its name, it is checked again (a few times at most).
    """
    listing = cat.scan()
    report: Dict[str, Verdict] = {}
    pending, unlisted = list(listing.records), list(listing.missing)
    checked: Dict[str, Optional[Exception]] = {}  # a blob shared by several checkpoints is read once
    for _ in range(VERIFY_PASSES):
        gone: List[str] = []
        suspect: Dict[str, Optional[str]] = {}
        for rec in pending:
            try:
                cat.verify_one(rec, checked, progress)
                report[rec.name] = Verdict(Status.OK)
            except FileNotFoundError:
                gone.append(rec.name)
            except CkptError as e:
                report[rec.name] = Verdict(Status.DAMAGED, Detail.of(e))
                suspect[rec.name] = rec.checksum
        if not (gone or unlisted or suspect):
            break
        again = cat.scan()
        fresh = {r.name: r for r in again.records}
        pending = []
        for name in gone + unlisted:
            if name in fresh:
                pending.append(fresh[name])  # back under its name (a replace): check it
            elif name in again.missing:
                report[name] = Verdict(Status.MISSING, "listed in the index, gone from disk")
            else:
                report.pop(name, None)  # evicted by a concurrent writer's retention
        for name, checksum in suspect.items():
            if name not in fresh:
                report.pop(name, None)
            elif fresh[name].checksum != checksum:
                pending.append(fresh[name])  # replaced since: check the new bytes
        unlisted = []
        if not pending:
            break
    return dict(sorted(report.items()))

