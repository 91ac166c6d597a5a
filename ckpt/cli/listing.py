"""Commands over a run directory: ``ls``, ``verify``, ``prune``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from filelock import Timeout

from .. import policy, schema
from ..catalog import commit, differential, index
from ..catalog.catalog import QUARANTINE_SUFFIX
from ..errors import CkptError, UnsafeCheckpointError
from ..format import torchfile
from ..record import CheckpointRecord
from ..storage import is_url
from ..verdicts import Detail, Status, Verdict
from . import common, table
from .common import Key, UsageError

LOCK_TIMEOUT = 60.0


def add(sub: Any) -> None:
    ls = sub.add_parser("ls", aliases=["list"], help="the checkpoints of a run and why each is kept",
                        description="List the committed checkpoints of a run directory: epoch, step, metrics, "
                                    "size, age and why each is kept; damaged and missing files are flagged.",
                        epilog="example:\n  ckpt ls runs/exp1\n  ckpt ls runs/exp1 --json | jq '.checkpoints[0]'\n"
                               "  ckpt ls runs/exp1 --keep-best 1 --monitor val_loss   # explain another policy")
    ls.add_argument("directory", help="the run directory")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("--verify", action="store_true", help="also check every file's checksum (reads every byte)")
    common.add_retention(ls)
    ls.set_defaults(run=cmd_ls)

    vf = sub.add_parser("verify", help="check checkpoints against their checksums (exit 1 if any is bad)",
                        description="Check every committed checkpoint of a run directory (or one file) against "
                                    "its recorded checksum. A file a concurrent writer's retention deleted "
                                    "meanwhile is not damage. Exit status 0: all intact, 1: damage found.",
                        epilog="example:\n  ckpt verify runs/exp1 && echo intact\n"
                               "  ckpt verify runs/exp1/ckpt-e000004-s000005000.pt")
    vf.add_argument("target", metavar="DIR|FILE", help="a run directory or one checkpoint file")
    vf.add_argument("--json", action="store_true", help="machine-readable output")
    vf.set_defaults(run=cmd_verify)

    pr = sub.add_parser("prune", help="delete checkpoints a retention policy would not keep (with --yes)",
                        description="Apply the manager's retention policy to a run directory. Prints what would "
                                    "be deleted; deletes only with --yes, under the directory's lock (the index "
                                    "is rewritten first, then the files deleted). The newest checkpoint and the "
                                    "run's recorded resume source are always kept.",
                        epilog="example:\n  ckpt prune runs/exp1 --keep-last 2 --keep-best 1 --monitor val_loss\n"
                               "  ckpt prune runs/exp1 --keep-last 2 --yes")
    pr.add_argument("directory", help="the run directory")
    pr.add_argument("--yes", action="store_true", help="really delete (default: only print what would go)")
    common.add_retention(pr)
    pr.set_defaults(run=cmd_prune)


# -- ls ------------------------------------------------------------------------------

def reasons(records: List[CheckpointRecord], pol: Optional[policy.RetentionPolicy],
            protected: Tuple[Key, ...]) -> Dict[Key, List[str]]:
    """Why each record is kept under ``pol`` (the rules of :func:`ckpt.policy.select_kept`)."""
    why: Dict[Key, List[str]] = {r.key: [] for r in records}
    if not records:
        return why
    ordered = sorted(records, key=lambda r: r.key)
    why[ordered[-1].key].append("latest")
    if pol is not None and pol.monitor:
        ranked = policy.best(records, pol.monitor, pol.mode, max(pol.keep_best or 0, 1))
        for i, rec in enumerate(ranked):
            why[rec.key].append("best" if i == 0 else f"best-{pol.keep_best}")
    if pol is not None and pol.keep_last:
        for rec in ordered[-pol.keep_last:]:
            why[rec.key].append(f"last-{pol.keep_last}")
    if pol is not None and pol.keep_every:
        for rec in records:
            if policy.is_milestone(rec, pol.keep_every):
                why[rec.key].append("milestone")
    for key in protected:
        if key in why:
            why[key].append("resume source")
    if pol is None or not pol.deletes:
        for rec in records:
            why[rec.key].append("no retention")
    return why


def describe_policy(pol: Optional[policy.RetentionPolicy]) -> str:
    """The options as given (``keep_last=0`` too: it keeps only what the fixed rules keep)."""
    if pol is None or not pol.deletes:
        return "keep everything (no retention policy)"
    parts = []
    if pol.keep_last is not None:
        parts.append(f"keep_last={pol.keep_last}")
    if pol.keep_best is not None:
        parts.append(f"keep_best={pol.keep_best} ({pol.monitor}, {pol.mode})")
    if pol.keep_every is not None:
        parts.append(f"keep_every={pol.keep_every}")
    return ", ".join(parts)


def _metrics(rec: Any) -> str:
    return " ".join(f"{k}={table.number(v)}" for k, v in rec.metrics.items())


#: How often ``ls`` looks again when what it saw may be a concurrent writer's rotation.
LS_PASSES = 5


@dataclass
class Look:
    """One look at a run directory: the listing, each file's status, the other findings."""

    listing: Any
    status: Dict[str, Verdict]
    problems: List[Dict[str, str]]
    on_disk: Dict[str, int]

    @property
    def bad(self) -> bool:
        return any(v.status.bad for v in self.status.values()) or any(
            Status(p["status"]).bad for p in self.problems)

    def findings(self) -> Tuple[Tuple[str, str], ...]:
        return tuple(sorted([(n, str(v.status)) for n, v in self.status.items() if v.status.bad]
                            + [(p["file"], p["status"]) for p in self.problems]))


def settled(cat: Any, verify: bool) -> Look:
    """A look whose damage is real: a finding that a writer's commit or eviction can
    explain (the index changed meanwhile, or the next look differs) is looked at again."""
    last: Optional[Look] = None
    for _ in range(LS_PASSES):
        before = index.read_raw(cat.store)
        with common.quiet():  # damaged and missing files are flagged in the table
            listing = cat.scan()
        on_disk = cat.store.list("ckpt-")
        look = Look(listing, _status(cat, listing.records, on_disk, verify=verify),
                    _problems(cat, listing, on_disk), on_disk)
        if not look.bad:
            return look
        if last is not None and look.findings() == last.findings() and index.read_raw(cat.store) == before:
            return look  # the same twice, with no commit in between: damage
        last = look
    assert last is not None
    return last


def cmd_ls(args: argparse.Namespace) -> int:
    directory = common.run_directory(args.directory)
    cat = common.catalog(directory)
    look = settled(cat, args.verify)
    listing, status, problems, on_disk, bad = look.listing, look.status, look.problems, look.on_disk, look.bad
    recorded, protected = common.recorded(cat)
    given = common.given_policy(args)
    pol = given or recorded
    source = "command line" if given else "recorded by the manager" if recorded else "none recorded"
    why = reasons(listing.records, pol, protected)
    if args.json:
        _print_json(directory, listing.records, status, why, pol, source, problems)
        return 1 if bad else 0
    if not listing.records and not problems:
        print(f"{directory}: no checkpoints")
        return 0
    _print_table(listing.records, status, why, problems, on_disk)
    total = sum(r.size for r in listing.records)
    n = len(listing.records)
    print(f"\n{n} checkpoint{'' if n == 1 else 's'}, {table.size(total)}; policy: {describe_policy(pol)} ({source})")
    if any(r.mid_epoch for r in listing.records):
        print("* mid-epoch checkpoint (resume continues that epoch)")
    return 1 if bad else 0


def _status(cat: Any, records: List[CheckpointRecord], on_disk: Dict[str, int], *,
            verify: bool) -> Dict[str, Verdict]:
    """File name -> verdict of the committed checkpoints that are not simply ok."""
    status: Dict[str, Verdict] = {}
    checked: Dict[str, Optional[Exception]] = {}
    for rec in records:
        if rec.name in on_disk and on_disk[rec.name] != rec.size:
            status[rec.name] = Verdict(Status.DAMAGED, f"{on_disk[rec.name]} bytes on disk, {rec.size} recorded")
        elif verify:
            try:
                cat.verify_one(rec, checked)  # the file and every tensor file it references
                status[rec.name] = Verdict(Status.VERIFIED)
            except FileNotFoundError:
                status[rec.name] = Verdict(Status.MISSING, "deleted while listing")
            except CkptError as e:
                status[rec.name] = Verdict(Status.DAMAGED, Detail.of(e, rec.path))
    return status


def _problems(cat: Any, listing: Any, on_disk: Dict[str, int]) -> List[Dict[str, str]]:
    """Files that are not committed checkpoints but should be looked at: indexed and gone,
    moved aside as damaged, or checkpoint-named and unreadable."""
    indexed = {r.name for r in listing.records}
    problems: List[Dict[str, str]] = [{"file": n, "status": Status.MISSING, "detail": "listed in the index, gone "
                                       "from disk"} for n in listing.missing]
    for name in sorted(on_disk):
        if name in indexed or name == index.INDEX_NAME or name.startswith("ckpt-history"):
            continue
        if QUARANTINE_SUFFIX in name:
            problems.append({"file": name, "status": Status.QUARANTINED, "detail": "moved aside as damaged"})
        elif schema.parse_name(name) and _unreadable(cat, name):  # a writer's new file reads fine
            problems.append({"file": name, "status": Status.DAMAGED, "detail": "not in the index and unreadable"})
    return problems


def _unreadable(cat: Any, name: str) -> bool:
    """A checkpoint-named file the index does not list fails to read (one deleted
    meanwhile is not damage)."""
    try:
        cat.describe(name)
    except FileNotFoundError:
        return False
    except CkptError:
        return True
    return False


def _print_json(directory: Any, records: List[CheckpointRecord], status: Dict[str, Verdict],
                why: Dict[Key, List[str]], pol: Optional[policy.RetentionPolicy], source: str,
                problems: List[Dict[str, str]]) -> None:
    rows = []
    for rec in records:
        st, detail = status.get(rec.name, Verdict(Status.OK))
        rows.append({**rec.to_json(), "kept_because": why[rec.key], "status": st, "detail": detail})
    pol_json = None if pol is None else pol.to_json()
    print(json.dumps({"directory": str(directory), "policy": pol_json, "policy_source": source,
                      "checkpoints": rows, "problems": problems}, indent=1))


def _print_table(records: List[CheckpointRecord], status: Dict[str, Verdict], why: Dict[Key, List[str]],
                 problems: List[Dict[str, str]], on_disk: Dict[str, int]) -> None:
    now = time.time()
    rows_text: List[List[str]] = []
    for rec in records:
        st, detail = status.get(rec.name, ("", ""))  # "": ok, not verified (no flag)
        step = f"{rec.step}*" if rec.mid_epoch else str(rec.step)
        kept = ", ".join(why[rec.key]) or "- (prune would delete)"
        shown = st and st != Status.VERIFIED
        flag = st.upper() + (f": {common.short(detail, rec.path)[:60]}" if detail else "") if shown else st
        rows_text.append([rec.name, str(rec.epoch), step, _metrics(rec), table.size(rec.size),
                          table.age(now - rec.time), kept, flag])
    for p in problems:
        rows_text.append([p["file"], "", "", "", table.size(on_disk.get(p["file"], 0)) if p["file"] in on_disk
                          else "", "", "", f"{p['status'].upper()}: {p['detail']}"])
    for line in table.render(["file", "epoch", "step", "metrics", "size", "age", "kept because", "status"],
                             rows_text, right=(1, 2, 4, 5)):
        print(line)


# -- verify --------------------------------------------------------------------------

def cmd_verify(args: argparse.Namespace) -> int:
    target = Path(args.target)
    url = is_url(args.target)
    if not url and not target.exists():
        raise UsageError("no such file or directory", path=target, hint="pass a run directory or a checkpoint file")
    if url or target.is_dir():
        cat = common.catalog(args.target if url else target)
        with common.quiet():  # the report says all of it
            report = cat.verify()
            report.update(unindexed_damage(cat, report))
        report = dict(sorted(report.items()))
    else:
        report = {target.name: verify_file(target)}
    bad = sum(v.status is not Status.OK for v in report.values())
    if args.json:
        print(json.dumps({name: {"status": s, "detail": d} for name, (s, d) in report.items()}, indent=1))
        return 1 if bad else 0
    for name, (status, detail) in report.items():
        print(f"{name}: {status}" + (f" ({common.message(detail, target / name)})" if detail else ""))
    if not report:
        print(f"{target}: no checkpoints")
    else:
        print(f"{len(report) - bad} ok, {bad} bad")
    return 1 if bad else 0


def unindexed_damage(cat: Any, report: Dict[str, Verdict]) -> Dict[str, Verdict]:
    """Checkpoint-named files the index does not list and that cannot be read (a
    concurrent writer's new file reads fine, and one it deleted meanwhile is skipped)."""
    found: Dict[str, Verdict] = {}
    for name in cat.store.list("ckpt-"):
        if name in report or not schema.parse_name(name):
            continue
        try:
            cat.describe(name)
        except FileNotFoundError:
            continue
        except CkptError as e:
            found[name] = Verdict(Status.DAMAGED, "not in the index: " + common.message(e, cat.store.where(name)))
    return found


def verify_file(path: Path) -> Verdict:
    """One file: against its directory's index when listed, else its own zip CRCs and a
    safe load (nothing is run)."""
    try:
        checksum = common.indexed_checksum(path)
        with torchfile.opened(path) as real:
            if checksum is not None:
                torchfile.verify(real, checksum, shown=path)
            obj = torchfile.load_open(real, path, check_records=checksum is None)
        if schema.is_checkpoint(obj):  # a differential checkpoint: every tensor file it references
            differential.verify_beside(path, schema.header(obj, str(path)).blobs)
        return Verdict(Status.OK)
    except FileNotFoundError:
        return Verdict(Status.MISSING, "gone from disk")
    except UnsafeCheckpointError as e:
        return Verdict(Status.UNSAFE, common.message(e, path))
    except CkptError as e:
        return Verdict(Status.DAMAGED, common.message(e, path))


# -- prune ---------------------------------------------------------------------------

def cmd_prune(args: argparse.Namespace) -> int:
    directory = common.run_directory(args.directory)
    pol = common.given_policy(args)
    if pol is None or not pol.deletes:
        raise UsageError("say what to keep: prune needs --keep-last, --keep-best or --keep-every",
                         hint=f"ckpt prune {directory} --keep-last 3   (prints what would go; add --yes to delete)")
    cat = common.catalog(directory)
    if not args.yes:
        return _prune(cat, pol, delete=False)
    try:
        with _locked(cat):
            return _prune(cat, pol, delete=True)
    except Timeout:
        raise CkptError(f"a writer has held the directory's lock for {LOCK_TIMEOUT:.0f}s", path=directory,
                        hint="prune when the run is not saving, or try again") from None


@contextmanager
def _locked(cat: Any) -> Iterator[None]:
    """The directory's writer lock; says so when it has to wait for a writer."""
    try:
        with cat.store.lock(timeout=0, commit=False):  # a tool's change
            yield
            return
    except Timeout:
        pass
    print(f"ckpt: note: waiting up to {LOCK_TIMEOUT:.0f}s for the directory's lock (a writer is saving)",
          file=sys.stderr, flush=True)
    with cat.store.lock(timeout=LOCK_TIMEOUT, commit=False):
        yield


def check_monitor(records: List[CheckpointRecord], pol: policy.RetentionPolicy, where: str) -> None:
    """Refuse a ``--monitor`` that no checkpoint on disk records (a typo would rank every
    checkpoint last and delete the best), in the dry run too."""
    if not pol.keep_best or not records:
        return
    wrong = policy.unknown_monitor(pol.monitor, records, require=True)
    if wrong is not None:
        fix = f"--monitor {wrong.closest}" if wrong.closest else "--keep-last N without --keep-best"
        raise UsageError(f"{wrong.describe()}; nothing deleted", path=where, hint=f"did you mean {fix}?"
                         if wrong.closest else f"pass {fix}")


def _prune(cat: Any, pol: policy.RetentionPolicy, *, delete: bool) -> int:
    listing = cat.scan(locked=delete)
    check_monitor(listing.records, pol, cat.store.url)
    _, protected = common.recorded(cat)
    kept, gone = commit.partition(listing.records, pol, protected)
    if not gone:
        print(f"nothing to delete: all {len(kept)} checkpoints are kept by {describe_policy(pol)}")
        return 0
    verb = "deleting" if delete else "would delete"
    print(f"{verb} {len(gone)} of {len(listing.records)} checkpoints ({table.size(sum(r.size for r in gone))}), "
          f"keeping {len(kept)} by {describe_policy(pol)} (the newest and the resume source are always kept):")
    rows = [[r.name, str(r.epoch), str(r.step), _metrics(r), table.size(r.size)] for r in gone]
    for line in table.render(["file", "epoch", "step", "metrics", "size"], rows, right=(1, 2, 4)):
        print("  " + line)
    if not delete:
        print("nothing deleted: add --yes to delete them")
        return 0
    cat.retain(listing.records, pol, protected)  # the commit protocol's order: index first, then the files
    print(f"deleted {len(gone)} checkpoints")
    return 0
