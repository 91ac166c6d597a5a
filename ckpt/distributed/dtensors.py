"""Whether a state is sharded: a ``DTensor`` anywhere in it (FSDP2, tensor parallel)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist


def has_dtensor(states: Any) -> bool:
    """Whether a ``DTensor`` is anywhere in ``states``: nested state dicts, lists, or modules
    (their parameters and buffers). Decides between one replicated file and a sharded directory."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    def walk(obj: Any) -> bool:
        if isinstance(obj, DTensor):
            return True
        if isinstance(obj, torch.nn.Module):
            return any(isinstance(t, DTensor) for t in itertools.chain(obj.parameters(), obj.buffers()))
        if isinstance(obj, Mapping):
            return any(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return any(walk(v) for v in obj)
        return False

    return walk(states)
