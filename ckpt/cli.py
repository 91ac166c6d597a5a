"""Command line: ``python -m ckpt`` / ``ckpt``.

    ckpt list DIR       committed checkpoints with epoch, step, metrics, size
    ckpt verify DIR     check every checkpoint against its checksum (exit 1 if any is bad)
    ckpt inspect FILE   a checkpoint's metadata and tracked objects, loaded safely
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from . import schema
from .errors import CkptError
from .store import Catalog, LocalStore, torchfile


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: not a directory (pass a checkpoint directory)")
    return path


def cmd_list(args: argparse.Namespace) -> int:
    records = Catalog(LocalStore(args.directory, create=False)).scan().records
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=1))
        return 0
    if not records:
        print(f"{args.directory}: no checkpoints")
        return 0
    for r in records:
        metrics = " ".join(f"{k}={v:.6g}" for k, v in r.metrics.items())
        mark = " (mid-epoch)" if r.mid_epoch else ""
        print(f"{r.path.name}  epoch {r.epoch} step {r.step}{mark}  {_size(r.size)}  {metrics}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = Catalog(LocalStore(args.directory, create=False)).verify()
    for name, (status, detail) in report.items():
        print(f"{name}: {status}" + (f" ({detail})" if detail else ""))
    bad = sum(status != "ok" for status, _ in report.values())
    print(f"{len(report) - bad} ok, {bad} bad")
    return 1 if bad else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    obj = torchfile.load(args.file, check_records=True)
    head = schema.header(obj, str(args.file))
    info = {"file": str(args.file), "epoch": head.epoch, "step": head.step, "mid_epoch": head.mid_epoch,
            "metrics": head.metrics, "time": head.created, "format": head.format,
            "library": head.library, "torch": head.torch,
            "objects": list(head.objects), "extra": sorted(obj.get("extra", {}))}
    print(json.dumps(info, indent=1, default=str))
    return 0


def cmd_export_sharded(args: argparse.Namespace) -> int:
    from .distributed.export import export_sharded  # DCP: loaded on use only
    print(export_sharded(args.directory, args.out))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckpt", description="Inspect and verify ckpt checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="list committed checkpoints")
    ls.add_argument("directory", type=_existing_dir)
    ls.add_argument("--json", action="store_true", help="print the records as JSON")
    ls.set_defaults(run=cmd_list)
    vf = sub.add_parser("verify", help="verify every checkpoint against its checksum")
    vf.add_argument("directory", type=_existing_dir)
    vf.set_defaults(run=cmd_verify)
    ins = sub.add_parser("inspect", help="show one checkpoint's metadata (safe load)")
    ins.add_argument("file", type=Path)
    ins.set_defaults(run=cmd_inspect)
    ex = sub.add_parser("export-sharded", help="one plain torch.save file of a sharded (.dcp) checkpoint")
    ex.add_argument("directory", type=_existing_dir)
    ex.add_argument("out", type=Path)
    ex.set_defaults(run=cmd_export_sharded)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (CkptError, OSError) as e:
        print(f"ckpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
