"""Weights for other tools: ``ckpt.save_safetensors``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Set, Union

import torch
from torch import nn

from .. import schema, state
from ..catalog.namespace import refuse_run_file
from ..errors import ConfigError, PathLike
from ..format import torchfile
from ..spec import module_names, pick_module
from ..storage.local import write_file
from .foreign import ALIASES, is_state_dict


def save_safetensors(source: Union[nn.Module, Mapping[str, Any], PathLike], path: PathLike, *,
                     metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write model weights as a ``.safetensors`` file (atomic, durable).

    ``source``: a module, a state dict, or a checkpoint file (ckpt's, a ``save_model``
    file, or a foreign layout; its model entry is used); a state dict's keys are written
    as they are. Tied weights are stored once per name. Needs the optional extra:
    ``pip install "ckpt[safetensors]"``.
    """
    try:
        from safetensors.torch import save as st_save
    except ImportError as e:
        raise ConfigError("saving safetensors needs the safetensors package",
                          hint='pip install "ckpt[safetensors]"') from e
    path = Path(path)
    refuse_run_file(path, "a safetensors file")
    tensors = _tensors(_weights(source), str(path))
    data = st_save(tensors, metadata=dict(metadata) if metadata else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file(path, lambda f: f.write(data))


def _weights(source: Any) -> Mapping[str, Any]:
    if isinstance(source, nn.Module):
        return dict(state.unwrap(source).state_dict())
    if isinstance(source, Mapping):
        return source
    obj = torchfile.load(Path(source))
    if schema.is_checkpoint(obj):
        head = schema.header(obj, str(source))
        names = module_names(head)
        name = pick_module(names)
        if name is None or name not in obj:
            raise ConfigError(f"which module to export? the checkpoint holds {names}, none named 'model'",
                              path=Path(source), hint="pass the state dict itself: save_safetensors("
                                                      "torch.load(path, weights_only=True)['<name>'], out)")
        return dict(obj[name])
    if isinstance(obj, Mapping) and not is_state_dict(obj):
        key = next((k for k in ALIASES["module"] if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise ConfigError(f"no model state found among the file's keys {sorted(map(str, obj))}",
                              path=Path(source), hint="pass the state dict itself")
        return dict(obj[key])
    return dict(obj)


def _tensors(weights: Mapping[str, Any], where: str) -> Dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own storage (safetensors refuses sharing)."""
    out: Dict[str, torch.Tensor] = {}
    seen: Set[int] = set()
    bad: List[str] = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"safetensors stores tensors only; not tensors: {bad[:8]}", path=where,
                          hint="export a model's state dict (optimizer state is not weights)")
    for key, tensor in weights.items():  # no target to fit, so the keys are kept as they are
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out
