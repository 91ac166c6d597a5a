"""Plain helpers that several test modules share (fixtures live in conftest.py).

Imported as ``helpers``, like ``dist_harness``: the tests folder is on ``sys.path``.
"""

from __future__ import annotations

import copy
import os
import selectors
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Dict, List, Mapping, Optional, Tuple

import torch

from ckpt.storage import local as storage

# -- child processes -----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> Dict[str, str]:
    """This environment, with this checkout first on ``PYTHONPATH`` (and ``extra``)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


class Child(subprocess.Popen[str]):
    """``python -c SCRIPT ARGS...`` (see :func:`spawn`): stdout a pipe to read lines from,
    stderr a file, so that a child writing much there never blocks on a full pipe."""

    def __init__(self, script: str, *args: str, env: Optional[Dict[str, str]] = None) -> None:
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by err(), after the child
        self._err: Optional[str] = None
        super().__init__([sys.executable, "-c", script, *args], cwd=ROOT, env=env or child_env(),
                         stdout=subprocess.PIPE, stderr=self.log, text=True)

    def err(self) -> str:
        """Everything the child wrote to stderr (once it ended; read once, then kept)."""
        if self._err is None:
            self.log.seek(0)
            self._err = self.log.read().decode(errors="replace")
            self.log.close()
        return self._err


def spawn(script: str, *args: str, env: Optional[Dict[str, str]] = None) -> Child:
    """Start ``python -c script args...`` in the checkout; end it with :func:`reap`."""
    return Child(script, *args, env=env)


def reap(*children: Child, timeout: float = 90, tail: int = 4000) -> List[str]:
    """Each child's stdout and the last ``tail`` characters of its stderr, once it ended by
    itself within ``timeout`` seconds; whatever is still running then (or when this raises)
    is SIGKILLed and reaped. Called again on a reaped child, the same text."""
    outs = []
    try:
        for c in children:
            out, _ = c.communicate(timeout=timeout)
            outs.append((out or "") + c.err()[-tail:])
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
            c.communicate()
            c.err()
    return outs



def read_line(proc: subprocess.Popen[str], timeout: float = 120.0) -> str:
    """The next line ``proc`` prints (stripped), or kill it and fail after ``timeout``
    seconds: a child that hangs before printing must not hang the test."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            proc.wait()
            raise AssertionError(f"the child printed nothing within {timeout:.0f} s")
    return proc.stdout.readline().strip()


# -- a run directory's files -------------------------------------------------------------


def snapshot(directory: Path) -> Dict[str, bytes]:
    """Every file name -> bytes but the lock file's, to assert that a failed save changed
    nothing (the ``snapshot`` fixture of conftest.py compares every file)."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name != storage.LOCK_NAME}


def temporaries(directory: Path) -> List[str]:
    """The writers' temporary files left in ``directory``."""
    return [p.name for p in directory.iterdir() if p.name.startswith(storage.TMP_PREFIX)]


def record_data_offset(path: Path, name: str) -> int:
    """Where the bytes of the zip record ``name`` (e.g. ``archive/data/0``) start in ``path``."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


# -- comparing state -----------------------------------------------------------------------


def same_weights(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Two state dicts of tensors with the same keys and equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def equal(a: object, b: object) -> bool:
    """Deep equality of nested dicts, lists and tensors (tensors: same dtype and values)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


# -- a sharded model (FSDP2 over a CPU mesh), for the tests under a process group -----------


def fsdp_mlp(world: int, seed: int, shard: bool = True,
             hidden: int = 5) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small MLP and its AdamW; FSDP2-sharded over a CPU mesh (5 rows by default: uneven shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
    if shard:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Dict[str, Any]:
    """The whole model and optimizer state, on rank 0 (or in a plain process); collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return copy.deepcopy({"model": get_model_state_dict(model, options=options),  # may alias live tensors
                          "optimizer": get_optimizer_state_dict(model, opt, options=options)})
