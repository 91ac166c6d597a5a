"""Class-free model programs: ``torch.export`` (``.pt2``) and TorchScript.

An exported program holds the computation graph and the weights; it loads and runs
in a process that cannot import the model's code. ``torch.export`` is the default
and the modern format; TorchScript (``method="torchscript"`` scripts the code,
``method="trace"`` records one run) is the fallback for models that ``torch.export``
cannot trace, and is in maintenance mode in PyTorch.

The model is exported in eval mode (for inference) and put back in the mode it was
in. The batch dimension (dim 0 of every tensor input) is dynamic by default; an
example batch of 1 is repeated to 2 for tracing, since ``torch.export`` would
otherwise specialise the program to batch 1.

(This module is not called ``export.py`` because ``ckpt.export`` is the function.)
"""

from __future__ import annotations

import copy
import io
import zipfile
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .. import spec, state
from ..catalog.namespace import refuse_run_file
from ..errors import (
    ConfigError,
    CorruptCheckpointError,
    ExportError,
    PathLike,
    StateMismatchError,
    UnsafeCheckpointError,
)
from ..format.torchfile import first_line
from ..storage.local import write_file

METHODS = ("export", "torchscript", "trace")


def export(model: nn.Module, path: PathLike, example_inputs: Any, *, dynamic_batch: bool = True,
           method: str = "export") -> Path:
    """Write ``model`` as a program that needs no Python class to load (atomic, durable).

    ``example_inputs``: a tensor or a tuple of the positional inputs of ``forward``.
    ``method``: ``"export"`` (``torch.export``, ``.pt2``), ``"torchscript"`` or
    ``"trace"``. Load the file with :func:`load_exported`.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}",
                          hint="use method='export' (default) unless torch.export fails on the model")
    path = Path(path)
    refuse_run_file(path, "an exported program")
    module = state.unwrap(model)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = module.training
    module.eval()
    try:
        if method == "export":
            data = _export_program(module, inputs, dynamic_batch, path)
        else:
            data = _torchscript(module, inputs, method, path)
    finally:
        module.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file(path, lambda f: f.write(data))


def _export_program(module: nn.Module, inputs: Tuple[Any, ...], dynamic_batch: bool, path: Path) -> bytes:
    shapes = None
    if dynamic_batch:
        inputs = _batch_of_two(inputs)
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in inputs)
    try:
        program = torch.export.export(module, inputs, dynamic_shapes=shapes)
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; all mean "cannot"
        raise _export_error(e, path, dynamic_batch) from e
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _batch_of_two(inputs: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """Repeat a batch of 1 so torch.export does not specialise the program to it."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not tensors or any(t.shape[0] != 1 for t in tensors):
        return inputs
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in inputs)


def _export_error(e: BaseException, path: Path, dynamic_batch: bool) -> ExportError:
    text, first = str(e), first_line(e)
    if dynamic_batch and ("batch" in text and ("special" in text or "onstraint" in text)):
        return ExportError(f"torch.export cannot make the batch dimension dynamic for this model: {first}",
                           path=path, hint="pass dynamic_batch=False for a program fixed to the example "
                                           "batch size, or check that dim 0 of every input is the batch")
    return ExportError(f"torch.export cannot trace this model ({type(e).__name__}: {first})", path=path,
                       hint="torch.export needs code without data-dependent Python control flow "
                            "(see torch.cond); or pass method='torchscript' (scripts the code) or "
                            "method='trace' (records one run with example_inputs) for TorchScript")


def _torchscript(module: nn.Module, inputs: Tuple[Any, ...], method: str, path: Path) -> bytes:
    try:
        program = torch.jit.script(module) if method == "torchscript" else torch.jit.trace(module, inputs)  # type: ignore[no-untyped-call]
    except Exception as e:  # noqa: BLE001 - the TorchScript compiler raises many types
        first = first_line(e)
        hint = ("method='trace' records one run with example_inputs instead (Python control flow is "
                "frozen to the path that run took)" if method == "torchscript"
                else "fix the error above, or use method='export' or 'torchscript'")
        raise ExportError(f"TorchScript cannot {'script' if method == 'torchscript' else 'trace'} "
                          f"this model ({type(e).__name__}: {first})", path=path, hint=hint) from e
    buffer = io.BytesIO()
    torch.jit.save(program, buffer)
    return buffer.getvalue()


def load_exported(path: PathLike, *, trusted: bool = False, device: Any = None) -> nn.Module:
    """Load a program written by :func:`export`; no model class is needed.

    ``trusted=True`` is required: loading is not data-only. ``torch.export.load``
    unpickles parts of a ``.pt2`` archive with ``weights_only=False`` (a crafted file
    runs code while it loads), and both formats hold a program whose operators can read
    and write files (``aten::save``, ``aten::from_file``). Load only files you trust.

    Returns a callable module: ``torch.export``'s ``program.module()`` (already in
    eval mode: it cannot switch modes) or a TorchScript module.
    """
    path = Path(path)
    names = _archive_names(path)
    export_format = any(n == "archive_format" or n.endswith("/archive_format") for n in names)
    if not export_format and not any(n.endswith("constants.pkl") for n in names):
        raise CorruptCheckpointError("not an exported model (neither torch.export nor TorchScript)",
                                     path=path, hint="for checkpoints and model files use ckpt.load_model")
    if trusted is not True:
        kind = "a torch.export program" if export_format else "a TorchScript program"
        raise UnsafeCheckpointError(
            f"refused to load {kind} without trusted=True: loading it can run code "
            "(torch.export.load unpickles parts of the archive with weights_only=False, and the "
            "program's operators can read and write files)", path=path,
            hint="only if you trust where the file came from, call "
                 "ckpt.load_exported(path, trusted=True); for untrusted files use ckpt.load_model "
                 "(weights_only=True, with its trust rule) or safetensors")
    if export_format:
        module = torch.export.load(path).module()
    else:
        module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
    if device is not None:
        module.to(device)
    return module


def _archive_names(path: Path) -> List[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptCheckpointError(f"not an exported model: {e}", path=path,
                                     hint="write it with ckpt.export(model, path, example_inputs=...)") from e


def export_checkpoint(trackables: Mapping[str, Any], checkpoint: Mapping[str, Any], source: str,
                      path: PathLike, *, example_inputs: Any, object: Optional[str] = None,
                      **options: Any) -> Path:
    """Export the tracked model with a checkpoint's weights (the live model is untouched)."""
    modules = spec.tracked_modules(trackables)
    name = spec.pick_module(modules, object)
    if name is None:
        raise ConfigError(f"which tracked module to export? tracked modules: {list(modules)}",
                          hint="pass object='<name>' to export_model")
    if name not in checkpoint:
        raise StateMismatchError(f"the checkpoint has no state for {name!r}", path=source,
                                 hint="export a checkpoint that was saved with this model tracked")
    model = copy.deepcopy(modules[name])
    state.load_module(name, model, checkpoint[name], strict=True, path=source)
    return export(model, path, example_inputs, **options)
