"""save_model / load_model and manager checkpoints that rebuild their model.

Every file is loaded in a fresh process that imports the model's module only
through load_model's trust rule, and its outputs are compared with the original.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
from model_zoo import MLP, Holder, Undecorated, make_models, run_fresh
from torch import nn

import ckpt
from ckpt import spec as architecture
from ckpt.errors import ArchitectureError, StateMismatchError, UntrustedModuleError

TESTS = str(Path(__file__).parent)

LOADER = r"""
import sys, torch
work = sys.argv[1]
plan = torch.load(f"{work}/plan.pt", weights_only=True)
res = {"plain_keys": {}, "outputs": {}, "training": {}, "types": {}, "dtypes": {}}
for name, path in plan["files"].items():
    res["plain_keys"][name] = sorted(torch.load(path, weights_only=True))  # no ckpt needed
res["ckpt_needed_for_plain_load"] = "ckpt" in sys.modules
import ckpt
try:
    ckpt.load_model(plan["files"]["mlp"])
    res["refusal"] = ""
except ckpt.UntrustedModuleError as e:
    res["refusal"] = str(e)
res["imported_after_refusal"] = "model_zoo" in sys.modules
ckpt.load_model(plan["files"]["sequential"])  # torch.nn only: trusted by default
res["imported_for_sequential"] = "model_zoo" in sys.modules
for name, path in plan["files"].items():
    model = ckpt.load_model(path, trusted=["model_zoo"])
    res["training"][name] = model.training
    res["types"][name] = type(model).__qualname__
    res["dtypes"][name] = str(next(model.parameters()).dtype)
    with torch.no_grad():
        res["outputs"][name] = model(plan["inputs"][name])
torch.save(res, f"{work}/results.pt")
"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> Dict[str, Any]:
    """Save the zoo and a manager run, load everything in one fresh process."""
    work = tmp_path_factory.mktemp("models")
    zoo = make_models()
    torch.manual_seed(1)
    zoo["mlp64"] = (MLP(3, (5,), 2).double().eval(), torch.randn(4, 3, dtype=torch.float64))
    files, inputs, expected = {}, {}, {}
    for name, (model, x) in zoo.items():
        files[name] = str(ckpt.save_model(model, work / f"{name}.pt"))
        inputs[name] = x
        with torch.no_grad():
            expected[name] = model(x)
    files["best"], inputs["best"], expected["best"] = _manager_run(work / "run")
    torch.save({"files": files, "inputs": inputs}, work / "plan.pt")
    run_fresh(LOADER, str(work), cwd=str(work), pythonpath=TESTS)
    results = torch.load(work / "results.pt", weights_only=True)
    return {"results": results, "expected": expected, "zoo": zoo, "work": work}


def _manager_run(directory: Path):
    """A short run whose best checkpoint is not the latest; returns its path and outputs."""
    torch.manual_seed(2)
    model = MLP(4, (8, 8), 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 4)
    best_out = None
    with ckpt.CheckpointManager(directory, model=model, optimizer=opt, monitor="val_loss", keep_best=1) as mgr:
        for epoch, val_loss in enumerate([0.9, 0.2, 0.5]):
            loss = model(torch.randn(16, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mgr.save(epoch=epoch, metrics={"val_loss": val_loss})
            if val_loss == 0.2:
                with torch.no_grad():
                    best_out = model.eval()(x)
                model.train()
        assert mgr.best is not None and mgr.best.epoch == 1 and mgr.latest.epoch == 2
        return str(mgr.best.path), x, best_out


NAMES = ["mlp", "cnn", "custom", "wrapper", "sequential", "mlp64", "best"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_fresh_process_rebuilds_the_model_with_identical_outputs(loaded, name: str) -> None:
    got = loaded["results"]["outputs"][name]
    torch.testing.assert_close(got, loaded["expected"][name], rtol=0, atol=0)
    assert loaded["results"]["training"][name] is False  # returned in eval mode


@pytest.mark.slow
def test_the_rebuilt_models_have_their_classes_and_dtypes(loaded) -> None:
    types = loaded["results"]["types"]
    assert types == {"mlp": "MLP", "cnn": "CNN", "custom": "Custom", "wrapper": "Wrapper",
                     "sequential": "Sequential", "mlp64": "MLP", "best": "MLP"}
    assert loaded["results"]["dtypes"]["mlp64"] == "torch.float64"


@pytest.mark.slow
def test_model_files_load_with_plain_torch_weights_only(loaded) -> None:
    results = loaded["results"]
    assert results["ckpt_needed_for_plain_load"] is False
    assert results["plain_keys"]["mlp"] == ["ckpt", "epoch", "extra", "metrics", "model", "rng", "step"]
    assert "optimizer" in results["plain_keys"]["best"]


@pytest.mark.slow
def test_untrusted_code_is_refused_before_it_is_imported(loaded) -> None:
    results = loaded["results"]
    assert "'model_zoo'" in results["refusal"] and "trusted=['model_zoo']" in results["refusal"]
    assert results["imported_after_refusal"] is False
    assert results["imported_for_sequential"] is False


def test_save_model_refuses_an_unrecordable_model_and_writes_nothing(tmp_path) -> None:
    with pytest.raises(ArchitectureError, match="Undecorated") as info:
        ckpt.save_model(Undecorated(), tmp_path / "m.pt")
    assert "@ckpt.rebuildable" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_manager_checkpoint_explains_why_it_cannot_rebuild(tmp_path) -> None:
    mgr = ckpt.CheckpointManager(tmp_path, model=Undecorated())
    record = mgr.save(epoch=0)  # saving never fails because of the spec
    with pytest.raises(ArchitectureError, match="not recorded when the file was saved") as info:
        ckpt.load_model(record.path)
    assert "@ckpt.rebuildable" in str(info.value) and "weights_only=True" in str(info.value)


def test_several_tracked_modules_are_chosen_by_name(tmp_path) -> None:
    gen, disc = MLP(2, (3,), 2), nn.Sequential(nn.Linear(2, 1))
    record = ckpt.CheckpointManager(tmp_path, generator=gen, discriminator=disc).save(epoch=0)
    with pytest.raises(ArchitectureError, match="none is named 'model'") as info:
        ckpt.load_model(record.path, trusted="model_zoo")  # no guess between two models
    assert "pass object= one of ['discriminator', 'generator']" in str(info.value)
    assert type(ckpt.load_model(record.path, trusted="model_zoo", object="generator")) is MLP
    rebuilt = ckpt.load_model(record.path, object="discriminator")
    assert torch.equal(rebuilt[0].weight, disc[0].weight)
    with pytest.raises(ArchitectureError, match="no module named 'model'"):
        ckpt.load_model(record.path, object="model")


def test_a_damaged_manager_checkpoint_is_caught_by_its_recorded_checksum(tmp_path) -> None:
    record = ckpt.CheckpointManager(tmp_path, model=nn.Linear(64, 64)).save(epoch=0)
    data = bytearray(record.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    record.path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpointError, match="checksum"):
        ckpt.load_model(record.path)


def test_a_model_whose_only_child_is_named_module_loads(tmp_path) -> None:
    model = Holder(3)
    rebuilt = ckpt.load_model(ckpt.save_model(model, tmp_path / "m.pt"), trusted=["model_zoo"])
    assert list(rebuilt.state_dict()) == ["module.weight", "module.bias"]
    assert torch.equal(rebuilt.module.weight, model.module.weight)


def test_a_file_whose_spec_calls_torch_hub_load_is_refused_before_any_code_runs(tmp_path) -> None:
    # /tmp/exp/b_trust.py: a valid, weights_only-loadable file; default trust; the layer's
    # activation is partial(torch.hub.load, <repo>) reached by walking from `torch`
    (tmp_path / "repo").mkdir()
    marker = tmp_path / "PWNED"
    (tmp_path / "repo" / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef x(): pass\n")
    path = ckpt.save_model(nn.Linear(2, 2), tmp_path / "m.pt")
    obj = torch.load(path, weights_only=True)
    layer = nn.TransformerEncoderLayer(d_model=4, nhead=1, dim_feedforward=8, batch_first=True)
    obj["model"] = layer.state_dict()
    obj["ckpt"]["model_spec"]["objects"]["model"]["architecture"] = {
        "version": 1, "module": "torch.nn", "qualname": "TransformerEncoderLayer", "args": [],
        "kwargs": {"d_model": 4, "nhead": 1, "dim_feedforward": 8, "batch_first": True, "activation": {
            "kind": "partial", "func": {"kind": "global", "module": "torch", "qualname": "hub.load"},
            "args": [str(tmp_path / "repo"), "x"], "kwargs": {"source": "local", "trust_repo": True}}}}
    torch.save(obj, path)
    with pytest.raises(UntrustedModuleError, match="torch:hub.load") as info:
        ckpt.load_model(path)
    assert "trusted=['torch.hub']" in str(info.value)
    assert not marker.exists()


def test_a_manager_captures_each_module_once_until_its_structure_changes(tmp_path, monkeypatch) -> None:
    captured = []
    real = architecture.capture
    monkeypatch.setattr(architecture, "capture", lambda m, where="model": captured.append(where) or real(m, where))
    tracked = lambda: sorted(w for w in captured if w in ("model", "other"))  # noqa: E731 - not nested ones
    model, other = nn.Sequential(nn.Linear(2, 3)), MLP(2, (3,), 1)
    mgr = ckpt.CheckpointManager(tmp_path, model=model, other=other)
    for epoch in range(3):
        mgr.save(epoch=epoch)
    assert tracked() == ["model", "other"]  # not once per save
    model.append(nn.ReLU())  # the architecture changed: captured again at the next save
    record = mgr.save(epoch=3)
    assert tracked() == ["model", "model", "other"]
    assert type(ckpt.load_model(record.path)[1]) is nn.ReLU


# -- the class moved or changed --------------------------------------------------------------

def write_module(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text("import ckpt\nfrom torch import nn\n" + textwrap.dedent(body))


V1 = """
@ckpt.rebuildable
class Net(nn.Module):
    def __init__(self, width, depth=1):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
"""


@pytest.fixture
def saved_v1(tmp_path, monkeypatch):
    """A model saved from module ``netmod_<id>``; the test then changes or moves the code."""
    name = f"netmod_{abs(hash(tmp_path)) % 10**8}"
    monkeypatch.syspath_prepend(str(tmp_path))
    write_module(tmp_path, name, V1)
    module = __import__(name)
    path = ckpt.save_model(module.Net(4, depth=2), tmp_path / "net.pt")
    sys.modules.pop(name)
    yield tmp_path, name, path
    sys.modules.pop(name, None)


def forget(directory: Path) -> None:
    import importlib
    importlib.invalidate_caches()
    for cached in directory.glob("__pycache__"):
        for f in cached.iterdir():
            f.unlink()


def test_a_moved_class_names_its_old_path_and_the_rename_fix(saved_v1) -> None:
    directory, name, path = saved_v1
    (directory / f"{name}.py").rename(directory / "renamed_mod.py")
    forget(directory)
    with pytest.raises(ArchitectureError) as info:
        ckpt.load_model(path, trusted=[name, "renamed_mod"])
    message = str(info.value)
    assert f"{name}:Net cannot be imported" in message and "rename=" in message
    model = ckpt.load_model(path, trusted=["renamed_mod"], rename={f"{name}:Net": "renamed_mod:Net"})
    assert len(model.layers) == 2
    sys.modules.pop("renamed_mod", None)


def test_a_changed_signature_names_the_recorded_arguments_and_the_fix(saved_v1) -> None:
    directory, name, path = saved_v1
    write_module(directory, name, V1.replace("depth=1", "n_layers=1").replace("range(depth)", "range(n_layers)"))
    forget(directory)
    with pytest.raises(ArchitectureError) as info:
        ckpt.load_model(path, trusted=[name])
    message = str(info.value)
    assert f"{name}:Net(width=4, depth=2)" in message and "(width, n_layers=1)" in message
    assert "load_state_dict" in message


def test_a_changed_architecture_names_the_keys_that_do_not_fit(saved_v1) -> None:
    directory, name, path = saved_v1
    write_module(directory, name, V1.replace("nn.Linear(width, width)", "nn.Linear(width, 2 * width)"))
    forget(directory)
    with pytest.raises(StateMismatchError, match=r"layers.0.weight: checkpoint \(4, 4\) vs model \(8, 4\)"):
        ckpt.load_model(path, trusted=[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ckpt.load_model(path, trusted=[name], strict=False).training is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_model_onto_a_gpu(tmp_path) -> None:
    model = MLP(4, (8,), 2).eval()
    path = ckpt.save_model(model, tmp_path / "m.pt")
    rebuilt = ckpt.load_model(path, trusted=["model_zoo"], device="cuda")
    assert all(p.is_cuda for p in rebuilt.parameters())
    x = torch.randn(3, 4)
    torch.testing.assert_close(rebuilt(x.cuda()).cpu(), model(x))


# -- malformed or oversized model specs (issue 11 item 11) ---------------------------------

def _deep(levels: int) -> dict:
    value: dict = {"kind": "list", "items": []}
    for _ in range(levels):
        value = {"kind": "list", "items": [value]}
    return value


SPEC_DAMAGE = {
    "no qualname": lambda a: a.pop("qualname"),
    "kwargs a list": lambda a: a.update(kwargs=[1, 2]),
    "args a number": lambda a: a.update(args=3),
    "architecture a list": None,
    "deeply nested": lambda a: a["kwargs"].update(in_features=_deep(3_000)),
}


@pytest.mark.parametrize("damage", list(SPEC_DAMAGE))
def test_a_malformed_model_spec_is_an_architecture_error(tmp_path, damage) -> None:
    path = tmp_path / "model.pt"
    ckpt.save_model(torch.nn.Linear(3, 4), path)
    obj = torch.load(path, weights_only=True)
    holder = obj["ckpt"]["model_spec"]["objects"]["model"]
    if SPEC_DAMAGE[damage] is None:
        holder["architecture"] = ["torch.nn", "Linear"]
    else:
        SPEC_DAMAGE[damage](holder["architecture"])
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # for torch.save of the deep spec only; loading runs with the default
    try:
        torch.save(obj, path)
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(ckpt.ArchitectureError):
        ckpt.load_model(path)


LOAD_PEAK = r"""
import resource, sys, torch, ckpt
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    ckpt.load_model(sys.argv[1])
    print("loaded")
except Exception as e:
    print(type(e).__name__)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)  # MiB
"""


def test_a_spec_naming_huge_sizes_next_to_small_weights_allocates_nothing(tmp_path) -> None:
    path = tmp_path / "model.pt"
    ckpt.save_model(torch.nn.Linear(3, 4), path)
    obj = torch.load(path, weights_only=True)
    obj["ckpt"]["model_spec"]["objects"]["model"]["architecture"]["kwargs"] = {
        "in_features": 16_000, "out_features": 16_000}  # 1 GiB of float32 for a 3x4 weight file
    torch.save(obj, path)
    source = str(Path(ckpt.__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(path)], cwd=source, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcome, grew_mib = proc.stdout.split()
    assert outcome in ("StateMismatchError", "ArchitectureError")
    assert int(grew_mib) < 256, f"loading allocated {grew_mib} MiB for a 48-byte weight file"
