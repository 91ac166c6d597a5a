"""Commands over checkpoint files: ``show`` and ``diff`` (safe loads only)."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import schema
from . import common, table


def add(sub: Any) -> None:
    sh = sub.add_parser("show", aliases=["inspect"], help="one checkpoint file: header, objects, extra",
                        description="Show one checkpoint file: its header, the tracked objects with their tensor "
                                    "counts and bytes, and `extra`. Works on plain torch.save files too. The file "
                                    "is loaded with weights_only=True: it never runs code (an unsafe pickle is "
                                    "refused, exit 1); a damaged file says so (exit 1).",
                        epilog="example:\n  ckpt show runs/exp1/ckpt-e000002-s000000300.pt\n"
                               "  ckpt show model.pt --tensors")
    sh.add_argument("file", help="a checkpoint file")
    sh.add_argument("--tensors", action="store_true", help="a table of every tensor (name, shape, dtype, bytes)")
    sh.add_argument("--json", action="store_true", help="machine-readable output")
    sh.set_defaults(run=cmd_show)

    df = sub.add_parser("diff", help="compare two checkpoints tensor by tensor",
                        description="Compare two checkpoint files: each tensor is the same, changed (max abs "
                                    "difference, relative change of its norm), added, removed, or of another "
                                    "shape or dtype; differing optimizer hyper-parameters and metrics are listed. "
                                    "Exit status 0 whether or not they differ.",
                        epilog="example:\n  ckpt diff runs/exp1/ckpt-e000001-s000000200.pt "
                               "runs/exp1/ckpt-e000002-s000000300.pt")
    df.add_argument("a", metavar="A", help="the first file")
    df.add_argument("b", metavar="B", help="the second file")
    df.add_argument("--all", action="store_true", help="list unchanged tensors too")
    df.set_defaults(run=cmd_diff)


# -- show ----------------------------------------------------------------------------

def kind(value: Any) -> str:
    """What an entry is, for a person."""
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, dict):
        if isinstance(value.get("param_groups"), list) and "state" in value:
            return "optimizer"
        if value and all(isinstance(v, torch.Tensor) for v in value.values()):
            return "state dict"
        if "last_epoch" in value or "_step_count" in value:
            return "scheduler"
        return "dict"
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = table.number(value) if isinstance(value, float) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _spec_class(spec: Optional[Dict[str, Any]]) -> Optional[str]:
    """``module.qualname`` of the recorded class of the default object, or None."""
    if not isinstance(spec, dict):
        return None
    objects = spec.get("objects")
    entry = objects.get(spec.get("default")) if isinstance(objects, dict) else None
    arch = entry.get("architecture") if isinstance(entry, dict) else None
    if not isinstance(arch, dict) or not isinstance(arch.get("module"), str):
        return None
    return f"{arch['module']}.{arch.get('qualname', '?')}"


def _spec_note(model_class: Optional[str]) -> str:
    """What load_model can do with the spec: a class defined in a script is not importable."""
    if model_class is None:
        return "recorded"
    if model_class.startswith("__main__."):
        return (f"recorded, but its class {model_class[len('__main__.'):]} was defined in the script that "
                "saved it (__main__): load_model cannot import it; move the class into a module")
    return f"recorded: {model_class} (load_model can rebuild it)"


def summary(obj: Any, path: Path) -> Dict[str, Any]:
    """The facts ``show`` prints, as plain data."""
    info: Dict[str, Any] = {"file": str(path), "size": path.stat().st_size}
    if schema.is_checkpoint(obj):
        head = schema.header(obj, str(path))
        info.update(kind="ckpt checkpoint", format=head.format, library=head.library, torch=head.torch,
                    epoch=head.epoch, step=head.step, mid_epoch=head.mid_epoch,
                    metrics={k: v if math.isfinite(v) else str(v) for k, v in head.metrics.items()},
                    created=head.created, model_spec=head.model_spec is not None,
                    model_class=_spec_class(head.model_spec))
        extra = obj.get("extra") if isinstance(obj.get("extra"), dict) else {}
        info["extra"] = {str(k): _short(v) for k, v in extra.items()}
        info["rng"] = sorted(obj["rng"]) if isinstance(obj.get("rng"), dict) else []
    else:
        from ..interop import foreign  # reading a foreign layout's counters; lazy, like the manager
        rec = foreign.record_of(obj, path)
        counted = foreign.has_counters(obj)  # else the file says nothing of epoch or step
        info.update(kind="plain torch.save file (not written by ckpt)", epoch=rec.epoch if counted else None,
                    step=rec.step if counted else None, mid_epoch=rec.mid_epoch, metrics=dict(rec.metrics))
        info["extra"] = {}
    info["objects"] = [{"name": name, "kind": kind(value), "tensors": len(ts := list(common.tensors(value))),
                        "bytes": sum(common.nbytes(t) for _, t in ts)}
                       for name, value in common.objects(obj).items()]
    return info


def cmd_show(args: argparse.Namespace) -> int:
    with common.fetched(args.file) as local:  # a URL's temporary download lives until the end
        return _show(args, local)


def _show(args: argparse.Namespace, path: Path) -> int:
    obj = common.load_file(path)
    info = summary(obj, path)
    every = [(n, t) for n, t in common.tensors(common.objects(obj))]
    if args.json:
        if args.tensors:
            info["tensors"] = [{"name": n, "shape": list(t.shape), "dtype": common.dtype(t),
                                "bytes": common.nbytes(t)} for n, t in every]
        print(json.dumps(info, indent=1, default=str))
        return 0
    rows = [("file", f"{path} ({table.size(info['size'])})"), ("kind", info["kind"])]
    if "format" in info:
        rows.append(("written by", f"{info['library']}, torch {info['torch']}, format {info['format']}"))
        created = datetime.datetime.fromtimestamp(info["created"], datetime.timezone.utc)
        rows.append(("created", f"{created:%Y-%m-%d %H:%M:%S} UTC ({table.age(time.time() - info['created'])} ago)"))
    if info["epoch"] is None:
        rows += [("epoch", "- (not recorded in the file)"), ("step", "-")]
    else:
        done = "mid-epoch: resume continues it" if info["mid_epoch"] else "complete"
        rows += [("epoch", f"{info['epoch']} ({done})"), ("step", str(info["step"]))]
    rows.append(("metrics", " ".join(f"{k}={table.number(v) if isinstance(v, float) else v}"
                                    for k, v in info["metrics"].items()) or "-"))
    if "format" in info:
        rows.append(("rng", ", ".join(info["rng"]) or "-"))
        rows.append(("model spec", _spec_note(info.get("model_class")) if info["model_spec"] else "-"))
    for k, v in rows:
        print(f"{k:<11} {v}")
    print("\nobjects:")
    obj_rows = [[o["name"], o["kind"], str(o["tensors"]), table.size(o["bytes"])] for o in info["objects"]]
    for line in table.render(["name", "kind", "tensors", "bytes"], obj_rows, right=(2, 3)):
        print("  " + line)
    if info["extra"]:
        print("\nextra:")
        width = max(len(k) for k in info["extra"])
        for k, v in info["extra"].items():
            print(f"  {k:<{width}}  {v}")
    if args.tensors:
        print("\ntensors:")
        t_rows = [[n, common.shape(t), common.dtype(t), table.size(common.nbytes(t))] for n, t in every]
        for line in table.render(["name", "shape", "dtype", "bytes"], t_rows, right=(3,)):
            print("  " + line)
    return 0


# -- diff ----------------------------------------------------------------------------

def tracked(obj: Any) -> Dict[str, Any]:
    """What to compare: a ckpt checkpoint's tracked objects, or a plain file as it is."""
    if schema.is_checkpoint(obj):
        return common.objects(obj)
    return dict(obj) if isinstance(obj, dict) else {"(object)": obj}


def compare(a: torch.Tensor, b: torch.Tensor) -> Tuple[str, str]:
    """(status, detail) of one tensor present in both files."""
    if a.shape != b.shape:
        return "shape", f"{common.shape(a)} -> {common.shape(b)}"
    if a.dtype != b.dtype:
        return "dtype", f"{common.dtype(a)} -> {common.dtype(b)}"
    if torch.equal(a, b):
        return "same", ""
    x, y = a.detach().cpu().to(torch.float64), b.detach().cpu().to(torch.float64)
    max_abs = (y - x).abs().max().item() if x.numel() else 0.0
    na, nb = x.norm().item(), y.norm().item()
    rel = (nb - na) / na if na else math.inf
    return "changed", f"max|diff|={max_abs:.4g}  norm {rel:+.3%}"


def hyper_parameters(obj: Dict[str, Any]) -> Dict[str, Any]:
    """Optimizer settings per object and param group (``params`` left out)."""
    out: Dict[str, Any] = {}
    for name, value in obj.items():
        if kind(value) != "optimizer":
            continue
        for i, group in enumerate(value["param_groups"]):
            if isinstance(group, dict):
                for k, v in group.items():
                    if k != "params" and not isinstance(v, torch.Tensor):
                        out[f"{name}.param_groups.{i}.{k}"] = v
    return out


def _metrics_of(obj: Any) -> Dict[str, Any]:
    metrics = obj.get("metrics") if isinstance(obj, dict) else None
    return dict(metrics) if isinstance(metrics, dict) else {}


def cmd_diff(args: argparse.Namespace) -> int:
    pa, pb = common.checkpoint_file(args.a), common.checkpoint_file(args.b)
    a, b = common.load_file(pa), common.load_file(pb)
    ta, tb = dict(common.tensors(tracked(a))), dict(common.tensors(tracked(b)))
    rows: List[List[str]] = []
    counts: Dict[str, int] = {}
    for name in list(ta) + [n for n in tb if n not in ta]:
        if name not in tb:
            status, detail = "removed", f"{common.shape(ta[name])} {common.dtype(ta[name])}"
        elif name not in ta:
            status, detail = "added", f"{common.shape(tb[name])} {common.dtype(tb[name])}"
        else:
            status, detail = compare(ta[name], tb[name])
        counts[status] = counts.get(status, 0) + 1
        if status != "same" or args.all:
            rows.append([name, status, detail])
    print(f"A: {pa}\nB: {pb}")
    print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no tensors")
    if rows:
        print()
        for line in table.render(["tensor", "status", "detail"], rows):
            print(line)
    ha, hb = hyper_parameters(tracked(a)), hyper_parameters(tracked(b))
    hp = [[k, _short(ha.get(k, "-")), _short(hb.get(k, "-"))] for k in sorted(set(ha) | set(hb))
          if ha.get(k) != hb.get(k)]
    ma, mb = _metrics_of(a), _metrics_of(b)
    for key in ("epoch", "step"):
        if isinstance(a, dict) and isinstance(b, dict) and a.get(key) != b.get(key):
            hp.append([key, _short(a.get(key, "-")), _short(b.get(key, "-"))])
    mt = [[k, _short(ma.get(k, "-")), _short(mb.get(k, "-"))] for k in sorted(set(ma) | set(mb))
          if ma.get(k) != mb.get(k)]
    for title, found in (("hyper-parameters and counters", hp), ("metrics", mt)):
        if found:
            print(f"\n{title}:")
            for line in table.render(["name", "A", "B"], found):
                print("  " + line)
    return 0
