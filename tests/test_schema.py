"""On-disk format: names, the schema, weights_only-loadability, plain torch.load."""

from __future__ import annotations

import collections
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import same_weights
from hypothesis import given, settings
from hypothesis import strategies as st

import ckpt
from ckpt import CheckpointManager
from ckpt import schema as format
from ckpt.catalog import history, index
from ckpt.errors import ConfigError, CorruptCheckpointError, FormatVersionError
from ckpt.storage import local as storage

EPOCHS, STEPS = st.integers(0, 999_999), st.integers(0, 999_999_999)


# -- names ----------------------------------------------------------------------------

@given(EPOCHS, STEPS)
def test_file_names_parse_back(epoch, step):
    name = format.file_name(epoch, step)
    assert format.parse_name(name) == (epoch, step)
    assert name.count(".") == 1 and name.endswith(".pt")  # no formatted metric values


@given(st.lists(st.tuples(EPOCHS, STEPS), min_size=2, max_size=20, unique=True))
def test_file_names_sort_numerically(keys):
    assert sorted(format.file_name(e, s) for e, s in keys) == [format.file_name(e, s) for e, s in sorted(keys)]


@pytest.mark.parametrize("name", [
    "notes.txt", "model.pt", "ckpt-e1.pt.bak", "ckpt-e000001-s000000000.pt.corrupt", "ckpt-e1-s2.pth",
    ".ckpt-tmp-12-ab-ckpt-e000001-s000000000.pt", "ckpt-index.json", "ckpt-e-1-s0.pt", "ckpt-e1-s2.pt\n",
    "xckpt-e1-s2.pt", "ckpt-e1-s.pt",
    "ckpt-e1-s2.pt", "ckpt-e0000001-s000000000.pt", "ckpt-e00000\u0661-s000000000.pt",  # not names ckpt writes
])
def test_parse_name_rejects_other_files(name):
    assert format.parse_name(name) is None


def test_large_epochs_still_parse():
    assert format.parse_name(format.file_name(12_345_678, 10**12)) == (12_345_678, 10**12)


# -- loadability --------------------------------------------------------------------

class Custom:
    pass


Point = collections.namedtuple("Point", "x y")

REFUSED = [
    (np.zeros(3), "numpy.ndarray"),
    (np.float64(1.5), "numpy.float64"),
    (np.int64(3), "numpy.int64"),
    (Custom(), "Custom"),
    (lambda x: x, "function"),
    (Point(1, 2), "Point"),
    (frozenset({1}), "frozenset"),
    (Path("/tmp"), "Path"),
    (b"", "empty bytes"),  # b"" pickles as a call to bytes(), which weights_only refuses
]


@pytest.mark.parametrize("value, type_name", REFUSED, ids=[t for _, t in REFUSED])
def test_check_loadable_refuses_with_the_path_to_the_value(value, type_name):
    with pytest.raises(ConfigError) as info:
        format.check_loadable({"a": [1, {"b": value}]}, "extra")
    text = str(info.value)
    assert "extra['a'][1]['b']" in text and type_name in text
    assert "hint:" in text and "tolist()" in text


def test_check_loadable_refuses_unsafe_dict_keys():
    with pytest.raises(ConfigError, match=r"extra key .*Custom"):
        format.check_loadable({Custom(): 1}, "extra")


def test_check_loadable_counts_tensor_bytes():
    value = {"w": torch.zeros(10, dtype=torch.float32), "n": [torch.zeros(3, dtype=torch.int8)], "s": "x"}
    assert format.check_loadable(value, "extra") == 43


LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=5), st.binary(max_size=5),
    st.complex_numbers(allow_nan=False), st.just(torch.float16), st.just(torch.device("cpu")),
    st.just(torch.Size([2, 3])),
    st.integers(0, 4).map(lambda n: torch.arange(n, dtype=torch.float64)),
    st.just(torch.nn.Parameter(torch.ones(2))),
    # values that must be refused
    st.just(np.float32(1.0)), st.just(np.arange(2)), st.builds(Custom), st.just(frozenset()), st.just(Point(0, 1)),
)
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=3),
    st.dictionaries(st.text(max_size=3), inner, max_size=3).map(collections.OrderedDict),
), max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(VALUES)
def test_whatever_check_loadable_accepts_loads_with_weights_only(value):
    """The check exists so no file is ever written that only loads in trusted mode."""
    try:
        format.check_loadable(value, "extra")
    except ConfigError:
        return  # refusing is always safe; what is refused is pinned by the table above
    buffer = io.BytesIO()
    torch.save({"extra": value}, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


# -- metrics and schema -------------------------------------------------------------

def test_metrics_become_plain_floats():
    out = format.metrics_to_floats({"a": 1, "b": np.float32(0.5), "c": torch.tensor([2.0]), "d": torch.tensor(3),
                                    "e": float("nan")})
    assert out["a"] == 1.0 and out["b"] == 0.5 and out["c"] == 2.0 and out["d"] == 3.0
    assert all(type(v) is float for v in out.values())
    assert format.metrics_to_floats(None) == {}


@pytest.mark.parametrize("metrics, match", [
    ({"loss": "high"}, "metric 'loss' must be a number"),
    ({"loss": None}, "metric 'loss' must be a number"),
    ({"loss": torch.ones(2)}, "metric 'loss' must be a number"),
    ({"loss": [0.1]}, "metric 'loss' must be a number"),
    ({3: 0.1}, "metric names must be str"),
])
def test_non_numeric_metrics_are_refused(metrics, match):
    with pytest.raises(ConfigError, match=match):
        format.metrics_to_floats(metrics)


def build(**overrides):
    args = dict(epoch=3, step=40, mid_epoch=False, metrics={"loss": 0.1}, rng={}, extra={"lr": 0.1},
                library_version="9.9")
    args.update(overrides)
    return format.build({"model": {"w": torch.ones(2)}, "optimizer": {"state": {}}}, **args)


def test_build_makes_the_documented_schema():
    checkpoint = build()
    obj, nbytes = checkpoint.obj, checkpoint.nbytes
    assert set(obj) == {"model", "optimizer", "epoch", "step", "metrics", "rng", "extra", "ckpt"}
    meta = obj["ckpt"]
    assert meta["format"] == format.FORMAT_VERSION and meta["library"] == "ckpt 9.9"
    assert meta["torch"] == str(torch.__version__) and meta["objects"] == ["model", "optimizer"]
    assert meta["mid_epoch"] is False and meta["created"] > 0
    assert nbytes == 8
    head = format.header(obj, "p")
    assert head == checkpoint.header
    assert (head.epoch, head.step, head.mid_epoch, head.metrics, head.created) == (3, 40, False, {"loss": 0.1},
                                                                                   meta["created"])


def test_build_refuses_unloadable_extra_before_anything_is_written():
    with pytest.raises(ConfigError, match=r"extra\['arr'\]"):
        build(extra={"arr": np.ones(2)})


@pytest.mark.parametrize("obj, error, match", [
    ([1, 2], CorruptCheckpointError, "not a ckpt checkpoint"),
    ({"model": {}}, CorruptCheckpointError, "not a ckpt checkpoint"),
    ({"ckpt": {}}, CorruptCheckpointError, "no format version"),
    ({"ckpt": {"format": format.FORMAT_VERSION + 1, "library": "ckpt 99"}}, FormatVersionError,
     "format 2 by ckpt 99"),
])
def test_header_rejects_what_it_cannot_read(obj, error, match):
    with pytest.raises(error, match=match) as info:
        format.header(obj, "/some/file.pt")
    assert "/some/file.pt" in str(info.value)


def test_header_accepts_current_and_older_versions():
    assert format.header({"ckpt": {"format": 0}, "epoch": 1, "step": 2}, "p").format == 0
    assert format.header(build().obj, "p").format == format.FORMAT_VERSION


@pytest.mark.parametrize("obj, match", [
    ({"ckpt": {"format": 1}, "step": 0}, "epoch is None"),
    ({"ckpt": {"format": 1}, "epoch": "three", "step": 0}, "epoch is 'three'"),
    ({"ckpt": {"format": 1}, "epoch": True, "step": 0}, "epoch is True"),
    ({"ckpt": {"format": 1}, "epoch": -1, "step": 0}, "epoch is -1"),
    ({"ckpt": {"format": 1}, "epoch": 0, "step": 0, "metrics": [1.0]}, r"metrics is \[1.0\]"),
    ({"ckpt": {"format": 1}, "epoch": 0, "step": 0, "metrics": {"a": 10 ** 400}}, "metric 'a' is 1000"),
    ({"ckpt": {"format": 1}, "epoch": 0, "step": 0, "metrics": {"a": "x"}}, "metric 'a' is 'x'"),
    ({"ckpt": {"format": 1, "created": float("inf")}, "epoch": 0, "step": 0}, "creation time is inf"),
    ({"ckpt": {"format": 1, "created": "now"}, "epoch": 0, "step": 0}, "creation time is 'now'"),
    ({"ckpt": {"format": 1, "mid_epoch": "no"}, "epoch": 0, "step": 0}, "mid_epoch is 'no'"),
    ({"ckpt": {"format": 1, "objects": "model"}, "epoch": 0, "step": 0}, "objects is 'model'"),
])
def test_header_validates_every_field_in_one_place(obj, match):
    """A planted file with bad fields is damage (skipped with a warning), never a raw
    KeyError/ValueError/OverflowError that stops the directory from opening."""
    with pytest.raises(CorruptCheckpointError, match=match):
        format.header(obj, "/some/file.pt")


# -- plain torch.load without ckpt ----------------------------------------------------

PLAIN_LOAD = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])  # torch's site-packages, without its .pth files (no editable ckpt)
assert importlib.util.find_spec("ckpt") is None, "ckpt is importable"
import torch
obj = torch.load(sys.argv[2], weights_only=True)
print(json.dumps({"keys": sorted(obj), "epoch": obj["epoch"], "step": obj["step"],
                  "metrics": obj["metrics"], "extra_lr": obj["extra"]["lr"], "meta": sorted(obj["ckpt"]),
                  "weight_sum": float(obj["model"]["0.weight"].sum()),
                  "optimizer_steps": sorted(float(s["step"]) for s in obj["optimizer"]["state"].values()),
                  "scheduler_epoch": obj["scheduler"]["last_epoch"],
                  "in_ckpt": "ckpt" in sys.modules}))
"""


def test_checkpoint_loads_with_plain_torch_load_in_a_process_without_ckpt(tmp_path, run_dir, trainables):
    objs = trainables()
    objs.step()
    with CheckpointManager(run_dir, **objs) as mgr:
        record = mgr.save(epoch=2, step=7, metrics={"loss": 0.25},
                          extra={"lr": 0.5, "history": [1.0, 2.0], "t": torch.ones(2)})
    site_packages = str(Path(torch.__file__).resolve().parent.parent)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", PLAIN_LOAD, site_packages, str(record.path)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["in_ckpt"] is False
    assert out["keys"] == ["ckpt", "epoch", "extra", "metrics", "model", "optimizer", "rng", "scheduler", "step"]
    assert (out["epoch"], out["step"], out["metrics"], out["extra_lr"]) == (2, 7, {"loss": 0.25}, 0.5)
    assert {"format", "library", "torch", "created"} <= set(out["meta"])
    assert out["weight_sum"] == pytest.approx(float(objs["model"][0].weight.detach().sum()))
    assert out["optimizer_steps"] == [1.0] * 4 and out["scheduler_epoch"] == 1


def test_the_no_ckpt_process_really_cannot_import_ckpt(tmp_path):
    """Guards the test above: the same interpreter flags do hide the editable install."""
    site_packages = str(Path(torch.__file__).resolve().parent.parent)
    probe = "import sys; sys.path.append(sys.argv[1]); import ckpt"
    done = subprocess.run([sys.executable, "-I", "-S", "-c", probe, site_packages], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "No module named 'ckpt'" in done.stderr
    assert Path(ckpt.__file__).exists()  # while this process imports it fine


# -- map_location: files written on a GPU --------------------------------------------

@pytest.fixture
def gpu_written(run_dir, trainables, monkeypatch):
    """A checkpoint whose tensors are tagged cuda:0, as torch.save writes them on a GPU."""
    source = trainables(seed=1)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda s: "cuda:0")
        CheckpointManager(run_dir, **source).save(epoch=0)
    return source


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks loading GPU files on a CPU-only machine")
def test_gpu_written_checkpoint_loads_on_cpu(gpu_written, run_dir, trainables):
    fresh = trainables(seed=2)
    assert CheckpointManager(run_dir, **fresh).resume() == 1  # map_location="cpu" is the default
    assert same_weights(fresh.weights(), gpu_written.weights())
    calls = []
    fresh = trainables(seed=2)
    CheckpointManager(run_dir, map_location=lambda s, loc: calls.append(loc) or s, **fresh).restore("latest")
    assert "cuda:0" in calls and same_weights(fresh.weights(), gpu_written.weights())
    CheckpointManager(run_dir, map_location=torch.device("cpu"), **trainables(seed=2)).resume()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks loading GPU files on a CPU-only machine")
def test_gpu_checkpoint_without_map_location_is_a_clear_error_not_damage(gpu_written, run_dir, trainables):
    with pytest.raises(ConfigError, match="map_location='cpu'"):
        CheckpointManager(run_dir, map_location=None, **trainables()).resume()
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([storage.LOCK_NAME, index.INDEX_NAME,
                                                                history.HISTORY_NAME,
                                                                format.file_name(0, 0)])  # none quarantined


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checkpoint_round_trip_to_cpu(run_dir, trainables):
    source = trainables(seed=1)
    source["model"].cuda()
    CheckpointManager(run_dir, model=source["model"]).save(epoch=0)
    fresh = trainables(seed=2)["model"]
    CheckpointManager(run_dir, model=fresh).resume()
    assert all(p.device.type == "cpu" for p in fresh.parameters())
    assert same_weights(fresh.state_dict(), {k: v.cpu() for k, v in source["model"].state_dict().items()})
