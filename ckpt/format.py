"""On-disk format: file names, the checkpoint dict schema and its version.

A checkpoint is one ``torch.save`` file holding a plain dict::

    {<name>: <state_dict> for each tracked object,
     "epoch": int, "step": int, "metrics": {str: float}, "rng": {...}, "extra": {...},
     "ckpt": {"format": 1, "library": "ckpt 0.1.0", "torch": "2.13.0",
              "created": <unix time>, "mid_epoch": bool, "objects": [<names>]}}

Everything in it is a type that ``torch.load(path, weights_only=True)`` accepts, so the
file loads without ckpt installed. Names are ``ckpt-e<epoch>-s<step>.pt``: unique per
(epoch, step), zero-padded so they also sort in a shell, and free of metric values.
"""

from __future__ import annotations

import collections
import re
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .errors import ConfigError, CorruptCheckpointError, FormatVersionError

FORMAT_VERSION = 1
RESERVED = frozenset({"epoch", "step", "metrics", "rng", "extra", "ckpt"})
NAME_RE = re.compile(r"ckpt-e([0-9]+)-s([0-9]+)\.pt")

_PLAIN = (type(None), bool, int, float, complex, str, bytes, bytearray,
          torch.Size, torch.dtype, torch.device, torch.Tensor, torch.nn.Parameter)
_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set)


def file_name(epoch: int, step: int) -> str:
    return f"ckpt-e{epoch:06d}-s{step:09d}.pt"


def parse_name(name: str) -> Optional[Tuple[int, int]]:
    """(epoch, step) of a checkpoint file name, or None for any other file.

    Only the exact names :func:`file_name` writes match (not ``ckpt-e1-s2.pt``, nor a
    trailing newline), so no foreign file can alias a checkpoint's (epoch, step).
    """
    m = NAME_RE.fullmatch(name)
    key = (int(m.group(1)), int(m.group(2))) if m else None
    return key if key is not None and file_name(*key) == name else None


def check_loadable(obj: Any, where: str) -> int:
    """Refuse values that ``torch.load(weights_only=True)`` could not read back.

    Checked before anything is written, so a bad value never produces a file that
    only loads in trusted mode. Types are matched exactly: a NumPy scalar is not a
    float, a namedtuple is not a tuple. Returns the bytes of the tensors found.
    """
    stack = [(obj, where)]
    nbytes = 0
    while stack:
        value, at = stack.pop()
        kind = type(value)
        if kind in _PLAIN and not (kind is bytes and not value):  # b"" pickles as a call to bytes()
            if isinstance(value, torch.Tensor):
                nbytes += value.nelement() * value.element_size()
            continue
        if kind in _CONTAINERS:
            if kind in (dict, collections.OrderedDict):
                for k, v in value.items():
                    stack.append((k, f"{at} key {k!r}"))
                    stack.append((v, f"{at}[{k!r}]"))
            else:
                stack.extend((v, f"{at}[{i}]") for i, v in enumerate(value))
            continue
        what = "an empty bytes (b'')" if kind is bytes else f"a {kind.__module__}.{kind.__qualname__}"
        raise ConfigError(
            f"{at} is {what}, which a safe (weights_only) load cannot read back",
            hint="store plain numbers, strings, lists, dicts or tensors: use float(x), "
                 "x.tolist(), torch.from_numpy(x) or a dict of the object's fields")
    return nbytes


def metrics_to_floats(metrics: Optional[Mapping[str, Any]]) -> Dict[str, float]:
    """Metrics as plain floats (accepts ints, NumPy scalars and one-element tensors)."""
    out: Dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if not isinstance(name, str):
            raise ConfigError(f"metric names must be str, got {name!r}", hint="use metrics={'val_loss': 0.3}")
        try:
            out[name] = float(value.item() if isinstance(value, torch.Tensor) else value)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"metric {name!r} must be a number, got {value!r}",
                              hint="pass a float, an int or a one-element tensor") from e
    return out


def build(states: Mapping[str, Any], *, epoch: int, step: int, mid_epoch: bool,
          metrics: Dict[str, float], rng: Dict[str, Any], extra: Dict[str, Any],
          library_version: str, spec: Optional[Dict[str, Any]] = None) -> Tuple[Dict[str, Any], int]:
    """The checkpoint dict and its tensor bytes; :class:`ConfigError` for unloadable values."""
    meta: Dict[str, Any] = {
        "format": FORMAT_VERSION, "library": f"ckpt {library_version}",
        "torch": str(torch.__version__), "created": time.time(), "mid_epoch": mid_epoch,
        "objects": list(states),
    }
    if spec is not None:
        meta["model_spec"] = spec
    nbytes = check_loadable(extra, "extra") + check_loadable(rng, "rng")
    for name, state in states.items():
        nbytes += check_loadable(state, f"state of {name!r}")
    obj = {**states, "epoch": epoch, "step": step, "metrics": metrics, "rng": rng,
           "extra": extra, "ckpt": meta}
    return obj, nbytes


def is_checkpoint(obj: Any) -> bool:
    """Was ``obj`` written by ckpt (a dict with a ``ckpt`` metadata entry)?"""
    return isinstance(obj, dict) and isinstance(obj.get("ckpt"), dict)


def header(obj: Any, path: str) -> Dict[str, Any]:
    """Validate a loaded checkpoint dict and return its ``ckpt`` metadata."""
    if not is_checkpoint(obj):
        raise CorruptCheckpointError(
            "not a ckpt checkpoint (expected a dict with a 'ckpt' entry)", path=path,
            hint="for plain torch.save files use CheckpointManager.restore(path)")
    meta = obj["ckpt"]
    version = meta.get("format")
    if not isinstance(version, int):
        raise CorruptCheckpointError("checkpoint metadata has no format version", path=path)
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"written with checkpoint format {version} by {meta.get('library', 'a newer ckpt')}; "
            f"this ckpt reads format {FORMAT_VERSION} and older", path=path,
            hint="upgrade ckpt (pip install -U ckpt) to load it")
    return meta


def describe(obj: Dict[str, Any]) -> Dict[str, Any]:
    """Index fields recoverable from a checkpoint dict (used to rebuild a lost index)."""
    meta = obj["ckpt"]
    metrics = {k: float(v) for k, v in (obj.get("metrics") or {}).items()}
    return {"epoch": int(obj["epoch"]), "step": int(obj["step"]),
            "mid_epoch": bool(meta.get("mid_epoch", False)), "metrics": metrics,
            "time": float(meta.get("created", 0.0))}
