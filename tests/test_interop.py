"""Foreign checkpoint layouts restored into a manager's objects, and safetensors export."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from model_zoo import Holder, run_fresh
from torch import nn

import ckpt
from ckpt.errors import ArchitectureError, ConfigError, StateMismatchError, UnsafeCheckpointError

DATA = Path(__file__).parent / "data"


def trio(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    return model, opt, sched


def trained(seed: int = 0):
    model, opt, sched = trio(seed)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def assert_same(a: Any, b: Any) -> None:
    """Nested state dicts are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (set(a), set(b))
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("layout", ["tutorial", "short"])
def test_common_torch_save_layouts_restore_every_object(tmp_path, layout: str) -> None:
    model, opt, sched = trained()
    names = {"tutorial": ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict"),
             "short": ("model", "optimizer", "lr_scheduler")}[layout]
    torch.save({names[0]: model.state_dict(), names[1]: opt.state_dict(), names[2]: sched.state_dict(),
                "epoch": 4, "loss": 0.25, "best_acc": torch.tensor(0.75), "note": "hi"}, tmp_path / "old.pt")
    fresh = trio(1)
    mgr = ckpt.CheckpointManager(tmp_path / "run", model=fresh[0], optimizer=fresh[1], scheduler=fresh[2])
    record = mgr.restore(tmp_path / "old.pt")
    assert_same(fresh[0].state_dict(), model.state_dict())
    assert_same(fresh[1].state_dict(), opt.state_dict())
    assert_same(fresh[2].state_dict(), sched.state_dict())
    assert (record.epoch, record.next_epoch, record.metrics) == (4, 5, {"loss": 0.25, "best_acc": 0.75})
    assert record.extra == {"note": "hi"} and mgr.resumed is record
    assert mgr.save(epoch=record.next_epoch).epoch == 5  # the run goes on in ckpt's format
    assert [r.epoch for r in mgr.checkpoints] == [5]


def test_names_of_tracked_objects_win_over_aliases(tmp_path) -> None:
    main, ema = nn.Linear(2, 2), nn.Linear(2, 2)
    torch.save({"model_state_dict": main.state_dict(), "ema_state_dict": ema.state_dict(), "epoch": 0},
               tmp_path / "old.pt")
    fresh_main, fresh_ema = nn.Linear(2, 2), nn.Linear(2, 2)
    ckpt.CheckpointManager(tmp_path / "run", model=fresh_main, ema=fresh_ema).restore(tmp_path / "old.pt")
    assert_same(fresh_main.state_dict(), main.state_dict())
    assert_same(fresh_ema.state_dict(), ema.state_dict())


@pytest.mark.parametrize("prefix", ["", "module."])
def test_a_bare_state_dict_restores_the_model_and_starts_at_epoch_0(tmp_path, prefix: str) -> None:
    model, _, _ = trained()
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "weights.pt")
    fresh, opt, _ = trio(1)
    record = ckpt.CheckpointManager(tmp_path / "run", model=fresh).restore(tmp_path / "weights.pt")
    assert_same(fresh.state_dict(), model.state_dict())
    assert record.next_epoch == 0 and record.extra == {}
    with pytest.raises(StateMismatchError, match="no state for optimizer") as info:
        ckpt.CheckpointManager(tmp_path / "run2", model=fresh, optimizer=opt).restore(tmp_path / "weights.pt")
    assert "strict=False" in str(info.value)


def test_a_bare_state_dict_of_a_model_whose_only_child_is_named_module(tmp_path) -> None:
    saved = Holder(3)
    torch.save(saved.state_dict(), tmp_path / "plain.pt")  # keys: module.weight, module.bias
    fresh = Holder(3)
    ckpt.CheckpointManager(tmp_path / "run", model=fresh).restore(tmp_path / "plain.pt")
    assert_same(fresh.state_dict(), saved.state_dict())


def test_every_entry_point_picks_the_tracked_model_by_the_same_rule(tmp_path) -> None:
    pytest.importorskip("safetensors")
    gen, disc = nn.Linear(2, 2), nn.Linear(2, 1)
    mgr = ckpt.CheckpointManager(tmp_path / "run", generator=gen, discriminator=disc)
    record = mgr.save(epoch=0)
    torch.save(gen.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ArchitectureError, match="none is named 'model'"):
        ckpt.load_model(record.path)
    with pytest.raises(ConfigError, match="which tracked module to export"):
        mgr.export_model(record, tmp_path / "g.pt2", example_inputs=torch.randn(2, 2))
    with pytest.raises(ConfigError, match="none named 'model'"):
        ckpt.save_safetensors(record.path, tmp_path / "g.safetensors")
    with pytest.raises(StateMismatchError, match="none named 'model'"):
        ckpt.CheckpointManager(tmp_path / "run2", generator=nn.Linear(2, 2),
                               discriminator=nn.Linear(2, 1)).restore(tmp_path / "bare.pt")
    # one module under another name is "the model" everywhere
    net = nn.Linear(2, 2)
    single = ckpt.CheckpointManager(tmp_path / "single", net=net, opt=torch.optim.SGD(net.parameters(), lr=0.1))
    record = single.save(epoch=0)
    assert torch.equal(ckpt.load_model(record.path).weight, net.weight)
    from safetensors.torch import load_file
    out = ckpt.save_safetensors(record.path, tmp_path / "n.safetensors")
    assert torch.equal(load_file(str(out))["weight"], net.weight.detach())


def test_a_file_with_nothing_that_fits_names_what_is_missing(tmp_path) -> None:
    torch.save({"encoder": {"w": torch.ones(1)}, "epoch": 1}, tmp_path / "odd.pt")
    with pytest.raises(StateMismatchError, match="no state for model"):
        ckpt.CheckpointManager(tmp_path / "run", model=nn.Linear(1, 1)).restore(tmp_path / "odd.pt")


def test_a_pickled_whole_model_needs_explicit_trust(tmp_path) -> None:
    model, _, _ = trained()
    torch.save(model, tmp_path / "whole.pt")
    fresh, _, _ = trio(1)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=False"):
        ckpt.CheckpointManager(tmp_path / "run", model=fresh).restore(tmp_path / "whole.pt")
    trusting = ckpt.CheckpointManager(tmp_path / "run", model=fresh, weights_only=False)
    assert trusting.restore(tmp_path / "whole.pt").next_epoch == 0
    assert_same(fresh.state_dict(), model.state_dict())


# -- PyTorch Lightning ---------------------------------------------------------------------

@pytest.mark.parametrize("name, epoch, next_epoch, step", [
    ("lightning-2.6.6-end-of-epoch.ckpt", 1, 2, 8), ("lightning-2.6.6-mid-epoch.ckpt", 1, 1, 6),
])
def test_real_lightning_checkpoints_restore_into_plain_objects(tmp_path, name, epoch, next_epoch, step) -> None:
    path = DATA / name
    saved = torch.load(path, weights_only=True)
    model, opt, sched = trio(1)
    mgr = ckpt.CheckpointManager(tmp_path / "run", model=model, optimizer=opt, scheduler=sched)
    record = mgr.restore(path)
    assert_same(model.state_dict(), {k[len("net."):]: v for k, v in saved["state_dict"].items()})
    assert_same(opt.state_dict(), saved["optimizer_states"][0])
    assert_same(sched.state_dict(), saved["lr_schedulers"][0])
    assert (record.epoch, record.next_epoch, record.step) == (epoch, next_epoch, step)
    assert record.extra["hyper_parameters"] == {"hidden": 8, "lr": 0.1}
    assert "state_dict" not in record.extra and "optimizer_states" not in record.extra


def test_lightning_lists_map_onto_optimizers_in_tracking_order(tmp_path) -> None:
    gen, disc = nn.Linear(2, 2), nn.Linear(2, 1)
    g_opt, d_opt = torch.optim.Adam(gen.parameters(), lr=1e-3), torch.optim.SGD(disc.parameters(), lr=0.5)
    lit = {"state_dict": {**{f"gen.{k}": v for k, v in gen.state_dict().items()},
                          **{f"disc.{k}": v for k, v in disc.state_dict().items()}},
           "optimizer_states": [g_opt.state_dict(), d_opt.state_dict()], "lr_schedulers": [],
           "epoch": 3, "global_step": 40, "pytorch-lightning_version": "2.6.6"}
    torch.save(lit, tmp_path / "gan.ckpt")

    class GAN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gen, self.disc = nn.Linear(2, 2), nn.Linear(2, 1)

    gan = GAN()
    opts = [torch.optim.Adam(gan.gen.parameters(), lr=1.0), torch.optim.SGD(gan.disc.parameters(), lr=1.0)]
    record = ckpt.CheckpointManager(tmp_path / "run", model=gan, g_opt=opts[0], d_opt=opts[1]).restore(
        tmp_path / "gan.ckpt")
    assert_same(gan.gen.state_dict(), gen.state_dict())
    assert [o.param_groups[0]["lr"] for o in opts] == [1e-3, 0.5]
    assert (record.epoch, record.step, record.next_epoch) == (3, 40, 4)  # no loop progress: epoch finished


# -- safetensors ---------------------------------------------------------------------------

SAFETENSORS_LOADER = r"""
import sys, torch
from safetensors import safe_open
from safetensors.torch import load_file
out = {}
for path in sys.argv[1:]:
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    out[path] = {"tensors": load_file(path), "meta": meta}
torch.save(out, sys.argv[1] + ".results")
"""


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight  # tied weights share one storage
        self.norm = nn.BatchNorm1d(4)


@pytest.mark.slow
def test_weights_export_to_safetensors_from_a_model_a_checkpoint_and_a_foreign_file(tmp_path) -> None:
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    model = Tied()
    expected = model.state_dict()
    record = ckpt.CheckpointManager(tmp_path / "run", model=model).save(epoch=0)
    torch.save({"model_state_dict": expected, "epoch": 2}, tmp_path / "old.pt")
    paths = [ckpt.save_safetensors(model, tmp_path / "a.safetensors", metadata={"origin": "test"}),
             ckpt.save_safetensors(record.path, tmp_path / "b.safetensors"),
             ckpt.save_safetensors(tmp_path / "old.pt", tmp_path / "c.safetensors"),
             ckpt.save_safetensors({"module." + k: v for k, v in expected.items()}, tmp_path / "d.safetensors")]
    run_fresh(SAFETENSORS_LOADER, *map(str, paths), cwd=str(tmp_path))
    results: Dict[str, Any] = torch.load(str(paths[0]) + ".results", weights_only=True)
    for path in paths[:3]:
        assert_same(results[str(path)]["tensors"], dict(expected))
    # a bare state dict has no model to fit its keys to, so they are written as they are
    assert_same(results[str(paths[3])]["tensors"], {"module." + k: v for k, v in expected.items()})
    assert results[str(paths[0])]["meta"] == {"origin": "test"}
    assert model.out.weight.data_ptr() == model.embed.weight.data_ptr()  # the model is untouched


def test_safetensors_refuses_what_is_not_weights(tmp_path) -> None:
    pytest.importorskip("safetensors")
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="tensors only"):
        ckpt.save_safetensors(opt.state_dict(), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
