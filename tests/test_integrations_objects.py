"""The Lightning and ignite plug-ins on an object store (the real moto server, the real
trainers, tiny CPU models): each checkpoint is written once, under its final key, with
the store's commit protocol (no staged copy), counted request by request; a save
SIGKILLed at each request leaves nothing a resume would load (docs/howto/lightning.md)."""

from __future__ import annotations

import collections
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Counter, Dict, List

import pytest
import torch

pytest.importorskip("s3fs")
pl = pytest.importorskip("pytorch_lightning")
pytest.importorskip("ignite")

import trainer_runs  # noqa: E402
from s3server import MotoServer  # noqa: E402

from ckpt.integrations import ignite as ckpt_ignite  # noqa: E402
from ckpt.integrations import lightning as ckpt_lightning  # noqa: E402
from ckpt.storage import open_existing  # noqa: E402

HERE = Path(__file__).resolve().parent


class Requests:
    """Every S3 request a client session sends: counted by kind, with the bytes it uploads."""

    def __init__(self) -> None:
        from aiobotocore.session import AioSession
        self.session = AioSession()
        self.counts: Counter[str] = collections.Counter()
        self.sent = 0
        self.session.register("before-send.s3", self._seen)

    def _seen(self, request: Any, **_: Any) -> None:
        query = request.url.split("?", 1)[1].split("=")[0] if "?" in request.url else ""
        headers = {k.lower(): v for k, v in request.headers.items()}
        kind = "COPY" if "x-amz-copy-source" in headers else f"{request.method} {query}".strip()
        self.counts[kind] += 1
        self.sent += int(headers.get("content-length") or 0)

    def clear(self) -> None:
        self.counts.clear()
        self.sent = 0


def _sizes(server: MotoServer, prefix: str) -> Dict[str, int]:
    import s3fs
    fs = s3fs.S3FileSystem(**server.options())
    return {p.rsplit("/", 1)[-1]: int(i["size"]) for p, i in fs.find(prefix, detail=True).items()}


class _Counted(pl.Callback):  # type: ignore[misc]
    """The requests of each epoch and its save (ModelCheckpoint saves after the other
    callbacks' epoch end), taken when the next epoch starts and at the end of the fit."""

    def __init__(self, requests: Requests) -> None:
        self.requests = requests
        self.per_epoch: List[Dict[str, int]] = []
        self.sent: List[int] = []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch > 0:
            self.on_train_end(trainer, pl_module)
        self.requests.clear()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.per_epoch.append(dict(self.requests.counts))
        self.sent.append(self.requests.sent)


def _module() -> Any:
    class Module(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = trainer_runs.net()

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.log("loss", loss, on_epoch=True, on_step=False)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self) -> Any:
            return torch.utils.data.DataLoader(trainer_runs.data(), batch_size=8)
    return Module()


def _fit(url: str, options: Dict[str, Any], callbacks: List[Any], epochs: int, resume: bool = False) -> Any:
    from pytorch_lightning.callbacks import ModelCheckpoint
    pl.seed_everything(0, verbose=False)
    model = _module()
    ckpt_io = ckpt_lightning.CheckpointIO(storage_options=options)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[ckpt_io],
                         callbacks=[ModelCheckpoint(dirpath=url, every_n_epochs=1), *callbacks])
    trainer.fit(model, ckpt_path=ckpt_lightning.last_checkpoint(url, options) if resume else None)
    return trainer


def test_lightning_fit_writes_each_checkpoint_once(server: MotoServer, bucket: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """ModelCheckpoint (top-1: each epoch saves the new file and removes the old one):
    the file and its sidecar, two PUTs each (the object, then its commit record), no
    server-side copy, no listing, the checkpoint's bytes uploaded once (was 26 requests
    and a full copy per save, the file staged under another name then copied in)."""
    for k, v in server.aws_env().items():  # Lightning's own fsspec calls on the run directory
        monkeypatch.setenv(k, v)
    url, requests = f"s3://{bucket}/run", Requests()
    counted = _Counted(requests)
    _fit(url, server.options(session=requests.session), [counted], epochs=4)
    sizes = _sizes(server, f"{bucket}/run")
    final = [n for n in sizes if n.endswith(".ckpt")]
    assert len(final) == 1 and sizes[final[0] + ".ckpt-sum"] > 0
    file_size = sizes[final[0]]
    assert len(counted.per_epoch) == 4
    for counts, sent in list(zip(counted.per_epoch, counted.sent))[1:]:  # after the first save's settling
        # the file, its commit record, the sidecar, its commit record; the evicted file and its sidecar
        assert counts == {"PUT": 4, "POST delete": 2}, counts
        assert file_size <= sent < file_size + 2048, (sent, file_size)  # the bytes once
    resumed = _fit(url, server.options(), [], epochs=5, resume=True)
    assert resumed.current_epoch == 5


def test_ignite_saver_writes_each_checkpoint_once(server: MotoServer, bucket: str) -> None:
    from ignite.engine import Engine, Events
    from ignite.handlers import Checkpoint, global_step_from_engine

    url, requests = f"s3://{bucket}/run", Requests()
    model = trainer_runs.net()
    engine = Engine(lambda e, b: None)
    saver = ckpt_ignite.CkptSaver(url, storage_options=server.options(session=requests.session))
    handler = Checkpoint({"model": model, "trainer": engine}, saver, n_saved=1,
                         global_step_transform=global_step_from_engine(engine))
    seen: List[Dict[str, int]] = []
    engine.add_event_handler(Events.EPOCH_STARTED, requests.clear)
    engine.add_event_handler(Events.EPOCH_COMPLETED, handler)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda: seen.append(dict(requests.counts)))
    engine.run([0, 1], max_epochs=4)
    saver.close()
    for counts in seen[1:]:
        assert counts == {"PUT": 4, "POST delete": 2}, counts  # the evicted file and its sidecar
    names = sorted(n for n in _sizes(server, f"{bucket}/run") if n.endswith(".pt"))
    assert names == ["checkpoint_4.pt"]
    assert ckpt_ignite.last_checkpoint(url, server.options()) == f"{url}/checkpoint_4.pt"


_CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, sys.argv[1])
    from s3server import MotoServer
    from aiobotocore.session import AioSession
    from ckpt.integrations import _files  # what CheckpointIO.save_checkpoint runs, without importing Lightning
    endpoint, url, name, kill_at = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    srv = MotoServer.__new__(MotoServer); srv.endpoint = endpoint
    session, puts = AioSession(), []
    def seen(request, **_):
        if request.method == "PUT" and "/" + name in request.url and "writer" not in request.url:
            puts.append(request.url)
            if len(puts) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    session.register("before-send.s3", seen)
    directory = _files.Directory(_files.store_for(url, srv.options(session=session)))
    directory.save(name, {"epoch": 9, "global_step": 90, "w": torch.full((4096,), 9.0)},
                   {"global_step": 90, "epoch": 9})
    print(puts, flush=True)
""")


@pytest.mark.parametrize("overwrite", [True, False], ids=["overwrite", "new-name"])
@pytest.mark.parametrize("kill_at", [1, 2, 3, 5], ids=["upload", "commit", "sidecar", "none"])
def test_save_killed_at_each_request_leaves_nothing_to_load(server: MotoServer, bucket: str, overwrite: bool,
                                                            kill_at: int) -> None:
    url, options = f"s3://{bucket}/run", server.options()
    first = ckpt_lightning.CheckpointIO(storage_options=options)
    first.save_checkpoint({"epoch": 1, "global_step": 10, "w": torch.ones(4096)}, f"{url}/e1.ckpt")
    if overwrite:
        first.save_checkpoint({"epoch": 1, "global_step": 10, "w": torch.ones(4096)}, f"{url}/last.ckpt")
    first.teardown()
    name = "last.ckpt" if overwrite else "e9.ckpt"
    child = subprocess.run([sys.executable, "-c", _CHILD, str(HERE), server.endpoint, url, name, str(kill_at)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == (-9 if kill_at < 5 else 0), child.stderr[-3000:]
    reader = ckpt_lightning.CheckpointIO(storage_options=options)
    newest = ckpt_lightning.last_checkpoint(url, options)
    assert newest is not None
    step = reader.load_checkpoint(newest)["global_step"]
    assert step == (90 if kill_at >= 3 else 10), (newest, step)  # the new file, once its commit record is in
    if kill_at <= 2:
        assert newest == f"{url}/e1.ckpt"  # a killed upload (or a rewritten name) is not there
    listed = open_existing(url, options).list()
    assert (name in listed) == (kill_at >= 3)
    for listed_name in listed:  # everything a reader lists verifies
        if listed_name.endswith(".ckpt"):
            reader.load_checkpoint(f"{url}/{listed_name}")
    # the next writer goes on; the killed save's leftovers are never listed
    again = ckpt_lightning.CheckpointIO(storage_options=options)
    again.save_checkpoint({"epoch": 10, "global_step": 100}, f"{url}/e10.ckpt")
    again.teardown()
    assert ckpt_lightning.last_checkpoint(url, options) == f"{url}/e10.ckpt"
