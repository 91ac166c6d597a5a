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
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .errors import ConfigError, CorruptCheckpointError, FormatVersionError

FORMAT_VERSION = 1
RESERVED = frozenset({"epoch", "step", "metrics", "rng", "extra", "ckpt"})
NAME_RE = re.compile(r"ckpt-e([0-9]+)-s([0-9]+)\.(pt|dcp)")
SHARDED_SUFFIX = ".dcp"  #: a sharded checkpoint: a directory (see ckpt.distributed.sharded)

_MAX_FLOAT = 1.7976931348623157e308


def file_name(epoch: int, step: int) -> str:
    return f"ckpt-e{epoch:06d}-s{step:09d}.pt"


def dir_name(epoch: int, step: int) -> str:
    """The name of a sharded checkpoint: a directory with the same stem as :func:`file_name`."""
    return f"ckpt-e{epoch:06d}-s{step:09d}{SHARDED_SUFFIX}"


def is_sharded(name: str) -> bool:
    return name.endswith(SHARDED_SUFFIX)


def parse_name(name: str) -> Optional[Tuple[int, int]]:
    """(epoch, step) of a checkpoint file (or sharded directory) name, or None for any other.

    Only the exact names :func:`file_name` and :func:`dir_name` write match (not
    ``ckpt-e1-s2.pt``, nor a trailing newline), so no foreign file can alias a
    checkpoint's (epoch, step).
    """
    m = NAME_RE.fullmatch(name)
    key = (int(m.group(1)), int(m.group(2))) if m else None
    if key is None:
        return None
    return key if (dir_name(*key) if is_sharded(name) else file_name(*key)) == name else None


def check_loadable(obj: Any, where: str) -> int:
    """Refuse values that ``torch.load(weights_only=True)`` could not read back.

    Checked before anything is written, so a bad value never produces a file that
    only loads in trusted mode. Types are matched exactly: a NumPy scalar is not a
    float, a namedtuple is not a tuple. Returns the bytes of the tensors found.
    """
    try:
        return _nbytes(obj)
    except _Refused as refused:
        kind = type(refused.value)
        what = "an empty bytes (b'')" if kind is bytes else f"a {kind.__module__}.{kind.__qualname__}"
        raise ConfigError(
            f"{where}{''.join(reversed(refused.at))} is {what}, which a safe (weights_only) load cannot read back",
            hint="store plain numbers, strings, lists, dicts or tensors: use float(x), "
                 "x.tolist(), torch.from_numpy(x) or a dict of the object's fields") from None


class _Refused(Exception):
    """A value :func:`_nbytes` does not accept; ``at`` is where it sits, innermost first
    (built only on the way out of an error: naming every key of a large state as it is
    walked costs more than checking it)."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value: Any = value
        self.at: List[str] = []


_LEAVES = frozenset((type(None), bool, int, float, complex, str, bytearray, torch.Size, torch.dtype, torch.device))
_MAPPINGS = frozenset((dict, collections.OrderedDict))
_SEQUENCES = frozenset((list, tuple, set))


def _nbytes(value: Any) -> int:
    """The bytes of the tensors in ``value``; :class:`_Refused` for anything else than
    plain values, tensors and the plain containers of them (``b""`` pickles as a call to
    ``bytes()``: refused too)."""
    kind = type(value)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        return int(value.nelement() * value.element_size())
    if kind in _LEAVES or (kind is bytes and value):
        return 0
    n = 0
    if kind in _MAPPINGS:
        for k, v in value.items():
            if type(k) not in _LEAVES:
                try:
                    n += _nbytes(k)
                except _Refused as e:
                    e.at.append(f" key {k!r}")
                    raise
            kind = type(v)
            if kind is torch.Tensor or kind is torch.nn.Parameter:
                n += v.nelement() * v.element_size()
            elif kind not in _LEAVES:
                try:
                    n += _nbytes(v)
                except _Refused as e:
                    e.at.append(f"[{k!r}]")
                    raise
        return n
    if kind in _SEQUENCES:
        for i, v in enumerate(value):
            try:
                n += _nbytes(v)
            except _Refused as e:
                e.at.append(f"[{i!r}]")
                raise
        return n
    raise _Refused(value)


def metrics_to_floats(metrics: Optional[Mapping[str, Any]]) -> Dict[str, float]:
    """Metrics as plain floats (accepts ints, NumPy scalars and one-element tensors)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"metrics must be a dict of names to numbers, got {type(metrics).__name__}",
                          hint="pass metrics={'val_loss': 0.3}")
    out: Dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise ConfigError(f"metric names must be str, got {name!r}", hint="use metrics={'val_loss': 0.3}")
        try:
            out[name] = float(value.item() if isinstance(value, torch.Tensor) else value)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise ConfigError(f"metric {name!r} must be a number, got {value!r}",
                              hint="pass a float, an int or a one-element tensor") from e
    return out


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint dict ready to write, with its header and the bytes of its tensors."""

    obj: Dict[str, Any]
    header: Header
    nbytes: int
    #: False when the states and RNG states are still to be checked (:func:`check_states`):
    #: an asynchronous save checks them in the walk that stages them.
    checked: bool = True

    @property
    def key(self) -> Tuple[int, int]:
        return (self.header.epoch, self.header.step)

    @property
    def name(self) -> str:
        return file_name(self.header.epoch, self.header.step)

    @property
    def extra(self) -> Dict[str, Any]:
        return dict(self.obj["extra"])


def build(states: Mapping[str, Any], *, epoch: int, step: int, mid_epoch: bool,
          metrics: Dict[str, float], rng: Dict[str, Any], extra: Dict[str, Any],
          library_version: str, spec: Optional[Dict[str, Any]] = None,
          cadence: Optional[Dict[str, Any]] = None, defer_check: bool = False) -> Checkpoint:
    """The checkpoint dict to write; :class:`ConfigError` for values a safe load cannot read.

    ``defer_check=True`` checks ``extra`` only and leaves the states and ``rng`` to
    :func:`check_states` (the checkpoint's ``checked`` is then False).
    """
    meta: Dict[str, Any] = {
        "format": FORMAT_VERSION, "library": f"ckpt {library_version}",
        "torch": str(torch.__version__), "created": time.time(), "mid_epoch": mid_epoch,
        "objects": list(states),
    }
    if spec is not None:
        meta["model_spec"] = spec
    if cadence is not None:
        meta["cadence"] = cadence  # when the next step checkpoint is due, after a resume
    obj = {**states, "epoch": epoch, "step": step, "metrics": metrics, "rng": rng,
           "extra": extra, "ckpt": meta}
    head = Header(epoch=epoch, step=step, mid_epoch=mid_epoch, metrics=dict(metrics), created=meta["created"],
                  format=FORMAT_VERSION, library=meta["library"], torch=meta["torch"],
                  objects=tuple(states), model_spec=spec)
    nbytes = check_loadable(extra, "extra")
    checkpoint = Checkpoint(obj, head, nbytes, checked=False)
    return checkpoint if defer_check else with_states(checkpoint, obj, nbytes + check_states(checkpoint))


def check_states(checkpoint: Checkpoint) -> int:
    """Check what :func:`build` left unchecked (``rng`` and the states, in that order)
    and return the bytes of their tensors; :class:`ConfigError` for a value a safe load
    cannot read back."""
    obj = checkpoint.obj
    nbytes = check_loadable(obj["rng"], "rng")
    for name in checkpoint.header.objects:
        nbytes += check_loadable(obj[name], f"state of {name!r}")
    return nbytes


def with_states(checkpoint: Checkpoint, obj: Dict[str, Any], nbytes: Optional[int] = None) -> Checkpoint:
    """The same checkpoint over another dict of the same content (a staged copy);
    ``nbytes``: the bytes of all its tensors, once its states are checked."""
    if nbytes is None:
        return Checkpoint(obj, checkpoint.header, checkpoint.nbytes, checkpoint.checked)
    return Checkpoint(obj, checkpoint.header, nbytes, checked=True)


def is_checkpoint(obj: Any) -> bool:
    """Was ``obj`` written by ckpt (a dict with a ``ckpt`` metadata entry)?"""
    return isinstance(obj, dict) and isinstance(obj.get("ckpt"), dict)


@dataclass(frozen=True)
class Header:
    """The validated facts of one checkpoint dict: what the index records about it."""

    epoch: int
    step: int
    mid_epoch: bool
    metrics: Dict[str, float]
    created: float
    format: int
    library: str
    torch: str
    objects: Tuple[str, ...]
    model_spec: Optional[Dict[str, Any]]
    #: Differential checkpoints: the tensor files this checkpoint references, with their checksums.
    blobs: Tuple[Tuple[str, str], ...] = ()

    @property
    def key(self) -> Tuple[int, int]:
        return (self.epoch, self.step)


def header(obj: Any, path: str) -> Header:
    """Validate every field ckpt reads from a loaded checkpoint dict, in one place.

    Anything missing or of the wrong type raises :class:`CorruptCheckpointError` (the
    file is skipped like a damaged one); a newer format raises :class:`FormatVersionError`.
    """
    if not is_checkpoint(obj):
        raise CorruptCheckpointError(
            "not a ckpt checkpoint (expected a dict with a 'ckpt' entry)", path=path,
            hint="for plain torch.save files use CheckpointManager.restore(path)")
    meta = obj["ckpt"]
    version = meta.get("format")
    if type(version) is not int:
        raise CorruptCheckpointError("checkpoint metadata has no format version", path=path)
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"written with checkpoint format {version} by {meta.get('library', 'a newer ckpt')}; "
            f"this ckpt reads format {FORMAT_VERSION} and older", path=path,
            hint="upgrade ckpt (pip install -U ckpt) to load it")
    objects = meta.get("objects", [])
    spec = meta.get("model_spec")
    return Header(epoch=count(obj.get("epoch"), "epoch", path), step=count(obj.get("step"), "step", path),
                  mid_epoch=flag(meta.get("mid_epoch", False), "ckpt.mid_epoch", path),
                  metrics=parse_metrics(obj.get("metrics"), path),
                  created=parse_time(meta.get("created", 0.0), path),
                  format=version, library=str(meta.get("library", "")), torch=str(meta.get("torch", "")),
                  objects=tuple(str(n) for n in _field(objects, list, "ckpt.objects", path)),
                  model_spec=spec if isinstance(spec, dict) else None,
                  blobs=parse_blobs(meta.get("blobs"), path))


def _bad(what: str, value: Any, path: str) -> CorruptCheckpointError:
    shown = repr(value)
    return CorruptCheckpointError(f"{what} is {shown[:80]}{'...' if len(shown) > 80 else ''}, which ckpt "
                                  "never writes: the file is damaged or was not written by ckpt",
                                  path=path, hint="ckpt skips it; restore another checkpoint")


def _field(value: Any, kind: type, what: str, path: str) -> Any:
    if type(value) is not kind:
        raise _bad(what, value, path)
    return value


def flag(value: Any, what: str, path: str) -> bool:
    return bool(_field(value, bool, what, path))


def count(value: Any, what: str, path: str) -> int:
    if type(value) is not int or value < 0:
        raise _bad(what, value, path)
    return value


def parse_time(value: Any, path: str) -> float:
    """A creation time: a finite, non-negative number of seconds."""
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise _bad("the creation time", value, path)
    return float(value)


#: Names of the tensor files of differential checkpoints (``ckpt-blob-<token>.pt``).
BLOB_RE = re.compile(r"ckpt-blob-[0-9a-f]{16}\.pt")


def parse_blobs(value: Any, path: str) -> Tuple[Tuple[str, str], ...]:
    """The ``{blob name: checksum}`` a differential checkpoint references, validated."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _bad("the blob list", value, path)
    for name, checksum in value.items():
        if not (isinstance(name, str) and BLOB_RE.fullmatch(name) and isinstance(checksum, str)
                and checksum.startswith("crc32:")):
            raise _bad(f"blob {name!r}", checksum, path)
    return tuple(sorted(value.items()))


def parse_metrics(value: Any, path: str) -> Dict[str, float]:
    """Metrics as ckpt writes them: a dict of names to floats (NaN and +-inf allowed).

    Also reads the index's spelling of non-finite values (``"nan"``, ``"inf"``, ``"-inf"``).
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("metrics", value, path)
    out: Dict[str, float] = {}
    for name, v in value.items():
        if not isinstance(name, str):
            raise _bad("a metric name", name, path)
        if type(v) is float:
            out[name] = v
        elif type(v) is int and abs(v) <= _MAX_FLOAT or isinstance(v, str) and v in ("nan", "inf", "-inf"):
            out[name] = float(v)
        else:
            raise _bad(f"metric {name!r}", v, path)
    return out
