"""The state under test and every way of saving and loading it that the benchmark compares.

The state is a training run's: a stack of ``Linear`` layers and Adam's two moments
(1/3 parameters, 2/3 optimizer state). Each variant writes its own file in ``root``;
savers return ``{"time": seconds}`` (ckpt async also ``"stall"``), loaders load the
file the matching saver wrote, touch every page of the result, and return the same.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ckpt import CheckpointManager
from ckpt.format import torchfile as fileio
from ckpt.io import checksum as fastio

from ._harness import fsync_path, timed

Result = Dict[str, float]


def build_state(total_bytes: int, width: int) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Layers of ``width`` x ``width`` until parameters are a third of ``total_bytes``."""
    per_layer = 4 * (width * width + width)
    layers = max(1, round(total_bytes / 3 / per_layer))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()  # creates exp_avg and exp_avg_sq
    opt.zero_grad(set_to_none=True)
    return model, opt


def tensors_of(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_of(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_of(v)


def touch(obj: Any) -> None:
    """Read one element per 4 KiB page, so memory-mapped results are really in memory."""
    for t in tensors_of(obj):
        flat = t.detach().reshape(-1)
        if flat.numel():
            flat[:: max(1, 4096 // flat.element_size())].sum()


def raw_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class NullSink:
    """A write-only file that keeps nothing (to time serialisation alone)."""

    def write(self, data: Any) -> int:
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


class Bench:
    """One state, one directory, and the variants that save and load it."""

    def __init__(self, root: Path, total_bytes: int, width: int) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.model, self.opt = build_state(total_bytes, width)
        self.payload = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}
        self.tensors = list(tensors_of(self.payload))
        self.nbytes = sum(t.nelement() * t.element_size() for t in self.tensors)
        self.flat = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for pid, entry in self.opt.state_dict()["state"].items():
            self.flat.update({f"optimizer.{pid}.{k}": v for k, v in entry.items()})
        self.managers: Dict[str, CheckpointManager] = {}
        self.epoch = 0
        self._buffers: Optional[List[torch.Tensor]] = None

    def path(self, name: str) -> Path:
        return self.root / name

    def fresh(self, name: str) -> Path:
        """``root/name`` with any earlier output removed (outside the timed region)."""
        path = self.path(name)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        return path

    def manager(self, name: str, **options: Any) -> CheckpointManager:
        if name not in self.managers:
            self.managers[name] = CheckpointManager(self.path(name), model=self.model, optimizer=self.opt,
                                                    keep_last=1, progress=False, **options)
        return self.managers[name]

    def close(self) -> None:
        for mgr in self.managers.values():
            mgr.close()

    # -- floors ----------------------------------------------------------------------

    def write_floor(self) -> Result:
        """A new file beside the previous one, as every atomic saver writes (the disk
        allocates fresh blocks alike); the rename is not timed."""
        tmp = self.fresh("floor.bin.tmp")

        def write() -> None:
            with open(tmp, "wb", buffering=0) as f:
                for t in self.tensors:
                    f.write(raw_bytes(t))
                os.fsync(f.fileno())
        result = {"time": timed(write)}
        os.replace(tmp, self.path("floor.bin"))
        return result

    def copy_floor(self) -> Result:
        if self._buffers is None:  # allocated and touched once, like reused staging buffers
            self._buffers = [torch.empty_like(t) for t in self.tensors]
            self._copy()
        return {"time": timed(self._copy)}

    def _copy(self) -> None:
        for buffer, t in zip(self._buffers or [], self.tensors):
            buffer.copy_(t)

    def read_floor(self) -> Result:
        path = self.latest("ckpt_sync")
        buffer = bytearray(64 << 20)

        def read() -> None:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
        return {"time": timed(read)}

    # -- savers ----------------------------------------------------------------------

    def torch_save(self) -> Result:
        path = self.fresh("torch-plain.pt")
        return {"time": timed(lambda: torch.save(self.payload, path))}

    def torch_atomic(self) -> Result:
        path, tmp = self.path("torch.pt"), self.fresh("torch.pt.tmp")

        def save() -> None:
            torch.save(self.payload, tmp)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(self.root)
        return {"time": timed(save)}

    def safetensors(self) -> Result:
        from safetensors.torch import save_file
        path, tmp = self.path("st.safetensors"), self.fresh("st.safetensors.tmp")

        def save() -> None:
            save_file(self.flat, str(tmp))
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(self.root)
        return {"time": timed(save)}

    def ignite(self) -> Result:
        from ignite.handlers import DiskSaver
        directory = self.path("ignite")
        saver = DiskSaver(str(directory), atomic=True, create_dir=True, require_empty=False)

        def save() -> None:
            saver(self.payload, "ignite.pt")
            fsync_path(directory / "ignite.pt")
            fsync_path(directory)
        return {"time": timed(save)}

    def dcp(self) -> Result:
        import torch.distributed.checkpoint as dcp
        path = self.fresh("dcp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {"time": timed(lambda: dcp.save(self.flat, checkpoint_id=str(path)))}

    def ckpt_sync(self) -> Result:
        mgr = self.manager("ckpt_sync")
        self.epoch += 1
        result = {"time": timed(lambda: mgr.save(epoch=self.epoch))}
        mgr.wait()  # untimed: the evicted file's blocks, freed in the background, before the next method
        return result

    def ckpt_async(self) -> Result:
        mgr = self.manager("ckpt_async", async_save=True)
        self.epoch += 1
        start = time.perf_counter()
        mgr.save(epoch=self.epoch)
        stall = time.perf_counter() - start
        mgr.wait()
        return {"stall": stall, "time": time.perf_counter() - start}

    # -- loaders ---------------------------------------------------------------------

    def latest(self, name: str) -> Path:
        record = self.manager(name).latest
        assert record is not None, f"run the {name} save first"
        return record.path

    def torch_load(self) -> Result:
        return {"time": timed(lambda: touch(torch.load(self.path("torch.pt"), weights_only=True)))}

    def torch_load_mmap(self) -> Result:
        return {"time": timed(lambda: touch(torch.load(self.path("torch.pt"), weights_only=True, mmap=True)))}

    def safetensors_load(self) -> Result:
        from safetensors.torch import load_file
        return {"time": timed(lambda: touch(load_file(str(self.path("st.safetensors")))))}

    def dcp_load(self) -> Result:
        import torch.distributed.checkpoint as dcp
        target = {k: torch.empty_like(v) for k, v in self.flat.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {"time": timed(lambda: dcp.load(target, checkpoint_id=str(self.path("dcp"))))}

    def ckpt_load(self) -> Result:
        record = self.manager("ckpt_sync").latest
        assert record is not None
        return {"time": timed(lambda: touch(fileio.load(record.path, checksum=record.checksum)))}

    def torch_resume(self) -> Result:
        def resume() -> None:
            obj = torch.load(self.path("torch.pt"), weights_only=True)
            self.model.load_state_dict(obj["model"])
            self.opt.load_state_dict(obj["optimizer"])
            touch(self.opt.state_dict())
        return {"time": timed(resume)}

    def ckpt_resume(self) -> Result:
        def resume() -> None:
            CheckpointManager(self.path("ckpt_sync"), model=self.model, optimizer=self.opt,
                              progress=False).resume()
            touch(self.opt.state_dict())
        return {"time": timed(resume)}

    # -- where a sync save's time goes -------------------------------------------------

    def serialise_only(self, zip_crc: bool) -> float:
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(zip_crc)
        try:
            return timed(lambda: torch.save(self.payload, NullSink()))
        finally:
            torch.serialization.set_crc32_options(before)

    def crc_only(self) -> float:
        return timed(lambda: [fastio.crc32(raw_bytes(t)) for t in self.tensors])

    def write_then_fsync(self) -> Tuple[float, float]:
        path = self.fresh("split.bin")
        with open(path, "wb", buffering=0) as f:
            write = timed(lambda: [f.write(raw_bytes(t)) for t in self.tensors])
            sync = timed(lambda: os.fsync(f.fileno()))
        return write, sync

    # -- small state: bookkeeping against bare torch.save + fsync ------------------------

    def bare_fsync(self) -> Result:
        path = self.path("bare.pt")

        def save() -> None:
            torch.save(self.payload, path)
            fsync_path(path)
        return {"time": timed(save)}


SAVERS: List[Tuple[str, str, Callable[[], bool]]] = [
    ("write_floor", "write floor: raw tensor bytes + fsync", lambda: True),
    ("copy_floor", "copy floor: into preallocated buffers", lambda: True),
    ("torch_save", "torch.save (no fsync)", lambda: True),
    ("torch_atomic", "torch.save atomic: tmp + fsync + rename + dir fsync", lambda: True),
    ("safetensors", "safetensors save_file + fsync + rename", lambda: has("safetensors")),
    ("ignite", "ignite DiskSaver(atomic) + fsync", lambda: has("ignite")),
    ("dcp", "torch.distributed.checkpoint.save (1 process)", lambda: True),
    ("ckpt_sync", "**ckpt save, sync**", lambda: True),
    ("ckpt_async", "**ckpt save, async**", lambda: True),
]

LOADERS: List[Tuple[str, str, Callable[[], bool], str]] = [
    ("read_floor", "read floor: raw read of the ckpt file", lambda: True, "ckpt_sync"),
    ("torch_load", "torch.load", lambda: True, "torch_atomic"),
    ("torch_load_mmap", "torch.load(mmap=True)", lambda: True, "torch_atomic"),
    ("safetensors_load", "safetensors load_file", lambda: has("safetensors"), "safetensors"),
    ("dcp_load", "dcp.load into preallocated tensors", lambda: True, "dcp"),
    ("ckpt_load", "**ckpt load: CRC verify + mmap**", lambda: True, "ckpt_sync"),
    ("torch_resume", "torch.load + load_state_dict (model, optimizer)", lambda: True, "torch_atomic"),
    ("ckpt_resume", "**ckpt resume() into model, optimizer**", lambda: True, "ckpt_sync"),
]

LOAD_INPUTS = {"read_floor": ["ckpt_sync"], "torch_load": ["torch.pt"], "torch_load_mmap": ["torch.pt"],
               "safetensors_load": ["st.safetensors"], "dcp_load": ["dcp"], "ckpt_load": ["ckpt_sync"],
               "torch_resume": ["torch.pt"], "ckpt_resume": ["ckpt_sync"]}
