"""torch.export / TorchScript programs that load where the model's code cannot be imported."""

from __future__ import annotations

import warnings
from typing import Any, Dict

import pytest
import torch
from model_zoo import MLP, Branchy, make_models, run_fresh

import ckpt
from ckpt.errors import ConfigError, CorruptCheckpointError, ExportError, UnsafeCheckpointError

LOADER = r"""
import importlib.util, sys, torch
work = sys.argv[1]
res = {"zoo_importable": importlib.util.find_spec("model_zoo") is not None, "outputs": {}, "errors": {}}
plan = torch.load(f"{work}/plan.pt", weights_only=True)
import ckpt
for name, path in plan["files"].items():
    program = ckpt.load_exported(path, trusted=True)
    for i, x in enumerate(plan["inputs"][name]):
        try:
            with torch.no_grad():
                res["outputs"][f"{name}/{i}"] = program(x)
        except Exception as e:
            res["errors"][f"{name}/{i}"] = f"{type(e).__name__}: {e}"
res["zoo_imported"] = any(m.startswith("model_zoo") for m in sys.modules)
torch.save(res, f"{work}/results.pt")
"""


def batches(x: torch.Tensor) -> list:
    """The example batch and two other batch sizes (1 and 7), built from it."""
    torch.manual_seed(3)
    return [x, torch.randn(1, *x.shape[1:], dtype=x.dtype), torch.randn(7, *x.shape[1:], dtype=x.dtype)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Dict[str, Any]:
    """Export the zoo (and a manager's best checkpoint), run everything in one fresh process
    whose sys.path cannot reach model_zoo."""
    work = tmp_path_factory.mktemp("export")
    jobs = {name: (model, x, {}) for name, (model, x) in make_models().items()}
    jobs["cnn_batch1"] = (jobs["cnn"][0], jobs["cnn"][1][:1], {})  # an example batch of 1 stays dynamic
    jobs["static"] = (jobs["sequential"][0], jobs["sequential"][1], {"dynamic_batch": False})
    torch.manual_seed(4)
    jobs["scripted"] = (Branchy().eval(), torch.randn(3, 4), {"method": "torchscript"})
    jobs["traced"] = (jobs["mlp"][0], jobs["mlp"][1], {"method": "trace"})
    files, inputs, expected = {}, {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notices
        for name, (model, x, options) in jobs.items():
            suffix = ".pt" if "method" in options else ".pt2"
            files[name] = str(ckpt.export(model, work / f"{name}{suffix}", example_inputs=x, **options))
            inputs[name] = batches(x)
            with torch.no_grad():
                expected[name] = [model(b) for b in inputs[name]]
    files["best"], inputs["best"], expected["best"] = _best_export(work)
    torch.save({"files": files, "inputs": inputs}, work / "plan.pt")
    run_fresh(LOADER, str(work), cwd=str(work))
    return {"results": torch.load(work / "results.pt", weights_only=True), "expected": expected}


def _best_export(work):
    torch.manual_seed(5)
    model = MLP(4, (8,), 2)
    with ckpt.CheckpointManager(work / "run", model=model, monitor="val_loss") as mgr:
        best_state = None
        for epoch, val_loss in enumerate([0.3, 0.1, 0.2]):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
            mgr.save(epoch=epoch, metrics={"val_loss": val_loss})
            if val_loss == 0.1:
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
        live = {k: v.clone() for k, v in model.state_dict().items()}
        path = mgr.export_model("best", work / "best.pt2", example_inputs=torch.randn(2, 4))
    assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())  # live model untouched
    model.load_state_dict(best_state)
    xs = batches(torch.randn(2, 4))
    with torch.no_grad():
        return str(path), xs, [model.eval()(x) for x in xs]


NAMES = ["mlp", "cnn", "custom", "wrapper", "sequential", "cnn_batch1", "scripted", "traced", "best"]


@pytest.mark.slow
def test_the_loader_cannot_import_the_model_code(exported) -> None:
    assert exported["results"]["zoo_importable"] is False
    assert exported["results"]["zoo_imported"] is False


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_programs_run_without_their_class_at_every_batch_size(exported, name: str) -> None:
    results = exported["results"]
    for i, want in enumerate(exported["expected"][name]):
        assert f"{name}/{i}" not in results["errors"], results["errors"].get(f"{name}/{i}")
        torch.testing.assert_close(results["outputs"][f"{name}/{i}"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dynamic_batch_false_fixes_the_batch_size(exported) -> None:
    results = exported["results"]
    torch.testing.assert_close(results["outputs"]["static/0"], exported["expected"]["static"][0])
    assert "static/2" in results["errors"] and "static/2" not in results["outputs"]


def test_a_model_torch_export_cannot_trace_gets_an_error_that_names_torchscript(tmp_path) -> None:
    with pytest.raises(ExportError, match="torch.export cannot trace this model") as info:
        ckpt.export(Branchy(), tmp_path / "b.pt2", example_inputs=torch.randn(2, 4))
    assert "method='torchscript'" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_export_puts_the_model_back_in_its_mode(tmp_path) -> None:
    model = MLP(2, (3,), 1, dropout=0.5).train()
    ckpt.export(model, tmp_path / "m.pt2", example_inputs=torch.randn(2, 2))
    assert model.training is True


def test_invalid_options_and_foreign_files_are_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="method must be one of"):
        ckpt.export(MLP(2, (3,), 1), tmp_path / "m.pt2", example_inputs=torch.randn(2, 2), method="onnx")
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(CorruptCheckpointError, match="not an exported model"):
        ckpt.load_exported(tmp_path / "plain.pt")
    (tmp_path / "junk.pt2").write_bytes(b"junk")
    with pytest.raises(CorruptCheckpointError, match="not an exported model"):
        ckpt.load_exported(tmp_path / "junk.pt2")


@pytest.mark.parametrize("method", ["export", "trace"])
def test_loading_a_program_needs_an_explicit_trusted_true(tmp_path, method: str) -> None:
    # torch.export.load unpickles with weights_only=False and TorchScript can call aten::save:
    # neither is data-only, so ckpt loads them only when told the file is trusted
    model = MLP(2, (3,), 1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = ckpt.export(model, tmp_path / "m.pt2", example_inputs=torch.randn(2, 2), method=method)
    for trusted in (False, "yes"):
        with pytest.raises(UnsafeCheckpointError, match="without trusted=True") as info:
            ckpt.load_exported(path, trusted=trusted)  # type: ignore[arg-type]
        assert "ckpt.load_exported(path, trusted=True)" in str(info.value)
    x = torch.randn(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        torch.testing.assert_close(ckpt.load_exported(path, trusted=True)(x), model(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_model_exports_and_loads_on_the_gpu(tmp_path) -> None:
    model = MLP(4, (8,), 2).cuda().eval()
    x = torch.randn(3, 4, device="cuda")
    path = ckpt.export(model, tmp_path / "m.pt2", example_inputs=x)
    program = ckpt.load_exported(path, trusted=True, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(program(torch.cat([x, x])), model(torch.cat([x, x])))
