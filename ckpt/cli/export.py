"""``ckpt export``: plain weights out of any checkpoint, for tools that know nothing of ckpt."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .. import schema
from ..catalog.namespace import refuse_run_file
from ..errors import ConfigError
from ..format import torchfile, torchio
from ..spec import module_names, pick_module
from ..storage.local import write_file
from . import common, table
from .common import UsageError


def add(sub: Any) -> None:
    ex = sub.add_parser("export", help="plain weights (.safetensors) or a plain state dict (.pt)",
                        description="Write a checkpoint's model weights for other tools: OUT.safetensors "
                                    "(safetensors, needs the extra ckpt[safetensors]) or OUT.pt, a plain state "
                                    "dict that torch.load(OUT, weights_only=True) reads without ckpt. Works on "
                                    "ckpt checkpoints, save_model files and plain torch.save files.",
                        epilog="example:\n  ckpt export runs/exp1/ckpt-e000009-s000001000.pt --to model.safetensors\n"
                               "  ckpt export runs/exp1/ckpt-e000009-s000001000.pt --to weights.pt --object ema")
    ex.add_argument("source", metavar="FILE", help="a checkpoint file")
    ex.add_argument("--to", required=True, metavar="OUT", help="OUT.safetensors or OUT.pt")
    ex.add_argument("--object", metavar="NAME", help="which tracked module (default: 'model', or the only one)")
    ex.set_defaults(run=cmd_export)


def weights_of(path: Path, wanted: Optional[str] = None) -> Dict[str, Any]:
    """The state dict of the model in ``path`` (a file, or a directory a reader knows)."""
    if path.is_dir():
        if not schema.is_sharded(path.name):
            raise UsageError("is a directory, not a checkpoint", path=path,
                             hint=f"pass one checkpoint (see `ckpt ls {path}`)")
        from ..distributed.export import export_sharded  # DCP: loaded on use only
        with tempfile.TemporaryDirectory() as tmp:  # the whole state, gathered into one file
            obj = torchfile.load(export_sharded(path, Path(tmp) / "full.pt"), mmap=False)
    else:
        obj = common.load_file(common.checkpoint_file(str(path)))
    if schema.is_checkpoint(obj):
        head = schema.header(obj, str(path))
        names = module_names(head) if wanted is None else list(head.objects)
        name = pick_module(names, wanted)
        if name is None or not isinstance(obj.get(name), dict):
            raise UsageError(f"which module? the checkpoint holds {list(head.objects)}", path=path,
                             hint="pass --object NAME")
        return dict(obj[name])
    if isinstance(obj, dict) and wanted is not None:
        if not isinstance(obj.get(wanted), dict):
            raise UsageError(f"no entry {wanted!r} holding a state dict", path=path,
                             hint=f"the file's keys are {sorted(map(str, obj))[:10]}")
        return dict(obj[wanted])
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    from ..interop.foreign import ALIASES  # foreign layouts (model_state_dict, Lightning's state_dict, ...)
    if isinstance(obj, dict):
        key = next((k for k in ALIASES["module"] if isinstance(obj.get(k), dict)), None)
        if key is not None:
            return dict(obj[key])
    raise UsageError("no model state dict found in the file", path=path,
                     hint="pass --object NAME with the key that holds it")


def refuse_richer(source: Path, out: Path) -> None:
    """Refuse an ``out`` that is the ``source`` itself, or a file holding more than the
    export would (a checkpoint or a model file, say a copy kept outside its run): the
    export is weights only, so replacing either loses the rest. A previous export (plain
    weights) is replaced as before."""
    if not out.is_file():
        return
    hint = f"write the export to another path (e.g. {out.with_name('exported-' + out.stem + '.safetensors')})"
    if source.exists() and source.samefile(out):
        raise UsageError("is the file being exported; writing the export there would replace its source, so "
                         "nothing was written", path=out, hint=hint)
    try:
        obj = torchio.load(out, map_location="meta")  # weights only, the pickle only: no tensor bytes read
    except Exception:  # noqa: BLE001 - not a torch file ckpt wrote: an ordinary output to replace
        return
    if isinstance(obj, dict) and isinstance(obj.get("ckpt"), dict):
        raise UsageError("holds a ckpt checkpoint or model file; the export (weights only) would replace it, "
                         "so nothing was written", path=out, hint=hint)


def cmd_export(args: argparse.Namespace) -> int:
    source, out = Path(args.source), Path(args.to)
    if not source.exists():
        raise UsageError("no such file", path=source, hint="list a run's checkpoints with `ckpt ls DIR`")
    suffix = out.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth"):
        raise UsageError(f"unknown output format {out.suffix or '(no suffix)'!r}", path=out,
                         hint="name the output OUT.safetensors (weights) or OUT.pt (a plain state dict)")
    refuse_run_file(out, "the export")
    refuse_richer(source, out)
    weights = weights_of(source, args.object)
    if suffix == ".safetensors":
        from ..interop.safetensors import save_safetensors
        save_safetensors(weights, out)
    else:
        try:
            schema.check_loadable(weights, "the state dict")
        except ConfigError as e:
            raise UsageError(str(e).splitlines()[0], path=out, hint="export it as .safetensors, or pick "
                                                                    "another --object") from e
        out.parent.mkdir(parents=True, exist_ok=True)
        write_file(out, lambda f: torchio.save(weights, f))
    every = [t for _, t in common.tensors(weights)]  # nested too: an optimizer's state per parameter
    print(f"wrote {out}: {len(every)} tensors, {table.size(sum(common.nbytes(t) for t in every))}")
    return 0
