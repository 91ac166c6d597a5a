"""ckpt's Lightning CheckpointIO with the real Lightning Trainer (tiny model, CPU)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

import trainer_runs  # noqa: E402
from helpers import same_weights  # noqa: E402

from ckpt.errors import CorruptCheckpointError  # noqa: E402
from ckpt.integrations.lightning import CheckpointIO, last_checkpoint  # noqa: E402


def _saved(n: int):
    return lambda d: len(list(d.glob("*.ckpt.ckpt-sum"))) >= n


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> trainer_runs.Baseline:
    return trainer_runs.Baseline(tmp_path_factory.mktemp("full"))


@pytest.fixture(scope="module")
def zygotes() -> Iterator[trainer_runs.Zygotes]:
    """Two imports of torch and lightning for this module's four runs, each forked from one."""
    yield from trainer_runs.zygotes("lightning")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--async",)], ids=["sync", "async"])
def test_killed_fit_resumes_bit_exact(tmp_path: Path, baseline: trainer_runs.Baseline, flags: tuple,
                                     zygotes: trainer_runs.Zygotes) -> None:
    run = tmp_path / "run"
    trainer_runs.run_and_kill("lightning", run, lambda d: baseline.ready(d) and _saved(3)(d), *flags,
                              *baseline.flags(), zygote=zygotes.killed)
    uninterrupted = baseline.weights()
    start = last_checkpoint(run)
    assert start is not None
    done = torch.load(start, weights_only=True)["epoch"]
    assert done < trainer_runs.EPOCHS - 1, "the kill came too late to test a resume"
    trainer_runs.run("lightning", run, tmp_path / "w.pt", "--resume", *flags, zygote=zygotes.resumed)
    assert same_weights(torch.load(tmp_path / "w.pt"), uninterrupted)
    # ModelCheckpoint's top-k removal went through the plug-in: every sidecar went with its file.
    # (A resumed ModelCheckpoint forgets its top-k list, so the resume point itself may stay.)
    files = {p.name for p in run.glob("*.ckpt")}
    sums = {p.name[: -len(".ckpt-sum")] for p in run.glob("[!.]*.ckpt-sum")}
    assert files == sums  # sync and async: a file is renamed in only once its sidecar is durable
    assert not [p.name for p in run.iterdir() if p.name.endswith((".ckpt-next", ".ckpt-sum-next"))]
    assert "last.ckpt" in files and len(files) <= 4
    assert not list(run.glob(".ckpt-tmp-*")), "the resumed run cleans the killed run's temporaries"


def test_files_load_with_stock_lightning_and_back(tmp_path: Path) -> None:
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    ckpt_io, stock = CheckpointIO(), TorchCheckpointIO()
    state = {"epoch": 1, "global_step": 10, "state_dict": {"w": torch.arange(4.0)}}
    ckpt_io.save_checkpoint(state, tmp_path / "ours.ckpt")
    assert torch.equal(stock.load_checkpoint(tmp_path / "ours.ckpt")["state_dict"]["w"], torch.arange(4.0))
    stock.save_checkpoint(state, tmp_path / "theirs.ckpt")
    assert ckpt_io.load_checkpoint(tmp_path / "theirs.ckpt")["global_step"] == 10


def test_rng_restored_on_load(tmp_path: Path) -> None:
    ckpt_io = CheckpointIO()
    ckpt_io.save_checkpoint({"epoch": 0, "global_step": 1}, tmp_path / "a.ckpt")
    expected = torch.rand(3)
    torch.rand(5)
    ckpt_io.load_checkpoint(tmp_path / "a.ckpt")
    assert torch.equal(torch.rand(3), expected)


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_newest_is_skipped_and_named(tmp_path: Path) -> None:
    ckpt_io = CheckpointIO()
    for step in (10, 20, 30):
        ckpt_io.save_checkpoint({"epoch": step // 10, "global_step": step, "w": torch.randn(256)},
                                tmp_path / f"step={step}.ckpt")
    (tmp_path / "half.ckpt").write_bytes((tmp_path / "step=30.ckpt").read_bytes()[:500])  # stock, killed
    _damage(tmp_path / "step=30.ckpt")
    with pytest.warns(UserWarning, match="step=30.ckpt"):
        assert last_checkpoint(tmp_path) == str(tmp_path / "step=20.ckpt")
    with pytest.raises(CorruptCheckpointError, match=r"step=30\.ckpt(.|\n)*step=20\.ckpt"):
        ckpt_io.load_checkpoint(tmp_path / "step=30.ckpt")
    assert last_checkpoint(tmp_path / "nothing") is None


class _Held:
    """Pickles only once ``release`` is set: a save that stays in flight as long as a test wants."""

    release = threading.Event()

    def __reduce__(self) -> tuple:
        assert self.release.wait(60), "never released"
        return (int, (0,))


def test_async_removal_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    ckpt_io = CheckpointIO(async_save=True, weights_only=False)
    ckpt_io.save_checkpoint({"epoch": 0, "global_step": 0}, tmp_path / "old.ckpt")
    ckpt_io.save_checkpoint({"epoch": 0, "global_step": 1, "held": _Held()}, tmp_path / "new.ckpt")
    remover = threading.Thread(target=ckpt_io.remove_checkpoint, args=(tmp_path / "old.ckpt",))
    remover.start()  # as ModelCheckpoint's rotation does, while new.ckpt is being written
    try:
        remover.join(0.5)
        assert remover.is_alive() and (tmp_path / "old.ckpt").exists(), \
            "the previous file went while its successor was still being written"
        assert last_checkpoint(tmp_path) == str(tmp_path / "old.ckpt")
    finally:
        _Held.release.set()
        remover.join(30)
    assert (tmp_path / "new.ckpt").exists() and not (tmp_path / "old.ckpt").exists()
    assert last_checkpoint(tmp_path) == str(tmp_path / "new.ckpt")
    ckpt_io.teardown()


def test_works_on_urls() -> None:
    pytest.importorskip("fsspec")
    ckpt_io = CheckpointIO()
    url = "memory://lightning-test/run"
    ckpt_io.save_checkpoint({"epoch": 2, "global_step": 7, "w": torch.ones(3)}, url + "/a.ckpt")
    assert last_checkpoint(url) == url + "/a.ckpt"
    assert torch.equal(ckpt_io.load_checkpoint(url + "/a.ckpt")["w"], torch.ones(3))
    ckpt_io.remove_checkpoint(url + "/a.ckpt")
    assert last_checkpoint(url) is None


def test_works_on_s3_across_runs(server: Any, bucket: str) -> None:
    """A real S3 server (moto): one plug-in writes, rotates and is torn down (as Lightning
    does at the end of fit); a new one (the resumed run) verifies, loads and writes on."""
    pytest.importorskip("s3fs")
    url, options = f"s3://{bucket}/run", server.options()
    ckpt_io = CheckpointIO(storage_options=options)
    for step in (1, 2, 3):
        ckpt_io.save_checkpoint({"epoch": step, "global_step": step, "w": torch.full((3,), float(step))},
                                f"{url}/e{step}.ckpt")
    ckpt_io.remove_checkpoint(f"{url}/e1.ckpt")
    assert last_checkpoint(url, options) == f"{url}/e3.ckpt"
    ckpt_io.teardown()
    resumed = CheckpointIO(storage_options=options)
    assert torch.equal(resumed.load_checkpoint(f"{url}/e3.ckpt")["w"], torch.full((3,), 3.0))
    resumed.save_checkpoint({"epoch": 4, "global_step": 4}, f"{url}/e4.ckpt")
    assert last_checkpoint(url, options) == f"{url}/e4.ckpt"
    resumed.teardown()
    import s3fs
    names = sorted(k.rsplit("/", 1)[-1] for k in s3fs.S3FileSystem(**options).ls(f"{bucket}/run"))
    assert [n for n in names if n.endswith(".ckpt")] == ["e2.ckpt", "e3.ckpt", "e4.ckpt"]
    assert [n for n in names if n.endswith(".ckpt-sum")] == ["e2.ckpt.ckpt-sum", "e3.ckpt.ckpt-sum",
                                                              "e4.ckpt.ckpt-sum"]


def test_import_ckpt_imports_no_integration() -> None:
    code = "import sys, ckpt; print([m for m in sys.modules if m.startswith(('ckpt.integrations', " \
           "'pytorch_lightning', 'transformers', 'ignite', 'lightning', 'accelerate', 'torchdata'))])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_missing_trainer_is_an_import_error_naming_the_extra() -> None:
    """Each integration with its trainer not importable (blocked in sys.modules, as if not
    installed): an ImportError whose message says which extra to install."""
    code = """
import sys
for m in ("lightning", "lightning.pytorch", "pytorch_lightning", "transformers", "ignite",
          "ignite.distributed", "ignite.handlers", "ignite.handlers.checkpoint"):
    sys.modules[m] = None
for name, extra in (("lightning", "lightning"), ("transformers", "transformers"), ("ignite", "ignite")):
    try:
        __import__("ckpt.integrations." + name)
    except ImportError as e:
        print(name, f"ckpt[{extra}]" in str(e))
    else:
        print(name, "imported")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["lightning", "True", "transformers", "True", "ignite", "True"], out.stderr


def test_top_k_removal_goes_through_the_plugin(tmp_path: Path) -> None:
    """ModelCheckpoint(save_top_k=1) removes the previous best through CheckpointIO.remove_checkpoint:
    the file and its sidecar go together, nothing is left without the other."""
    removed: list = []

    class Recording(CheckpointIO):
        def remove_checkpoint(self, path: object) -> None:
            removed.append(Path(str(path)).name)
            super().remove_checkpoint(path)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch: object, _: int) -> torch.Tensor:
            x, y = batch  # type: ignore[misc]
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("loss", loss, on_epoch=True, on_step=False)
            return loss

        def configure_optimizers(self) -> object:
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self) -> object:
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)

    from pytorch_lightning.callbacks import ModelCheckpoint

    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, plugins=[Recording()],
                         callbacks=[ModelCheckpoint(dirpath=tmp_path, save_top_k=1, monitor="loss")])
    trainer.fit(Module())
    files = sorted(p.name for p in tmp_path.glob("*.ckpt"))
    assert len(removed) == 2 and len(files) == 1 and files[0] not in removed  # loss falls: each epoch the new best
    assert sorted(p.name[: -len(".ckpt-sum")] for p in tmp_path.glob("*.ckpt-sum")) == files
    assert last_checkpoint(tmp_path) == str(tmp_path / files[0])


@pytest.mark.slow
def test_ddp_killed_fit_resumes_every_rank_rng(tmp_path: Path) -> None:
    """strategy="ddp" on 2 real processes (torchrun, gloo, CPU), each rank seeded apart:
    one launch runs the uninterrupted fit, then the fit SIGKILLed (both ranks, by PID)
    after 3 saves; resumed with RankRNG, every rank's RNG and the weights continue exactly."""
    run, full, out = tmp_path / "run", tmp_path / "full.pt", tmp_path / "w.pt"
    trainer_runs.run_and_kill("lightning", run, lambda d: full.exists() and _saved(3)(d), "--ddp", "--full",
                              str(full), out=tmp_path / "killed.pt", ranks=2, launcher=trainer_runs.TORCHRUN_2)
    assert not (tmp_path / "killed.pt").exists(), "the kill came too late to test a resume"
    start = last_checkpoint(run)
    assert start is not None and torch.load(start, weights_only=True)["epoch"] < trainer_runs.EPOCHS - 1
    trainer_runs.run("lightning", run, out, "--ddp", "--resume", launcher=trainer_runs.TORCHRUN_2)
    assert same_weights(torch.load(out), torch.load(full))
    rng = {r: (torch.load(f"{full}.rank{r}.rng"), torch.load(f"{out}.rank{r}.rng")) for r in (0, 1)}
    assert not torch.equal(rng[0][0], rng[1][0]), "the ranks' RNGs must differ for this test to mean anything"
    for r, (uninterrupted, resumed) in rng.items():
        assert torch.equal(uninterrupted, resumed), f"rank {r}'s RNG did not continue where it was"
