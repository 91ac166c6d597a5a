"""Architecture specs: capture of constructor arguments, rebuild, and the trust rule."""

from __future__ import annotations

import collections
import enum
import functools
import io
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ckpt
from ckpt import schema as format
from ckpt import spec as architecture
from ckpt.errors import ArchitectureError, ConfigError, UnsafeCheckpointError, UntrustedModuleError
from ckpt.models import build as rebuild

HERE = __name__  # this test module is importable by name, so its classes can be rebuilt


def roundtrip(module: nn.Module, *trusted: str) -> nn.Module:
    spec = architecture.capture(module)
    buffer = io.BytesIO()
    torch.save(spec, buffer)  # the spec is plain data: a weights_only load reads it
    buffer.seek(0)
    spec = torch.load(buffer, weights_only=True)
    return rebuild.build(spec, rebuild.Resolver(trusted))


def same_architecture(a: nn.Module, b: nn.Module) -> None:
    assert repr(a) == repr(b)
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]


# -- torch.nn layers need nothing ---------------------------------------------------------

TORCH_LAYERS = [
    nn.Linear(3, 4, bias=False), nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
    nn.Conv1d(2, 4, 5, dilation=2, groups=2, padding=4, padding_mode="reflect"),
    nn.ConvTranspose2d(4, 2, 3, stride=2, output_padding=1), nn.BatchNorm2d(8, momentum=0.3, affine=False),
    nn.LayerNorm((4, 5), elementwise_affine=False), nn.GroupNorm(2, 8), nn.Embedding(10, 4, padding_idx=0),
    nn.Dropout(0.3), nn.ReLU(inplace=True), nn.GELU(approximate="tanh"), nn.Softmax(dim=-1), nn.Identity(),
    nn.MaxPool2d(2), nn.AdaptiveAvgPool2d((1, 1)), nn.Upsample(scale_factor=2, mode="bilinear"),
    nn.MultiheadAttention(8, 2, batch_first=True), nn.LSTM(4, 8, 2, batch_first=True, bidirectional=True),
    nn.RNN(3, 5, nonlinearity="relu"), nn.Unflatten(1, (2, 3)),
    nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 1))),
    nn.Sequential(collections.OrderedDict(enc=nn.Linear(2, 3), act=nn.Tanh())),
    nn.ModuleList([nn.Linear(1, 2), nn.ReLU()]), nn.ModuleDict({"x": nn.Linear(1, 2)}),
]


@pytest.mark.parametrize("layer", TORCH_LAYERS, ids=lambda m: type(m).__name__)
def test_torch_layers_are_rebuilt_from_their_attributes(layer: nn.Module) -> None:
    same_architecture(roundtrip(layer), layer)


def test_a_guess_that_rebuilds_a_different_layer_is_refused_at_capture() -> None:
    # MultiheadAttention keeps no `bias` attribute: the guess bias=True would add parameters
    with pytest.raises(ArchitectureError, match=r"MultiheadAttention.*differs in parameters") as info:
        architecture.capture(nn.MultiheadAttention(8, 2, bias=False))
    assert "@ckpt.rebuildable" in str(info.value)


def test_torch_layers_whose_arguments_are_not_stored_are_refused() -> None:
    with pytest.raises(ArchitectureError, match="d_model") as info:
        architecture.capture(nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16)))
    assert "model[0]" in str(info.value) and "ckpt.export" in str(info.value)


# -- your own classes record their arguments -----------------------------------------------

class Color(enum.Enum):
    RED = 1
    BLUE = 2


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class Cfg:
    width: int
    tags: tuple = ()


class Pair(NamedTuple):
    a: int
    b: float


@ckpt.rebuildable
class Everything(nn.Module):
    def __init__(self, values: Any, *, sub: nn.Module, factory: Any = None) -> None:
        super().__init__()
        self.values = values
        self.sub = sub
        self.factory = factory


VALUES = {
    "none": None, "bool": True, "int": 3, "float": 0.5, "str": "x", "complex": 1 + 2j, "bytes": b"ab",
    "tuple": (1, (2, "3")), "list": [1, [2.0]], "nested": {"a": {"b": [1, {"c": (2,)}]}},
    "int_keys": {1: "one", (2, 3): "pair", Color.RED: "enum key"}, "set": {1, 2}, "frozenset": frozenset({"a"}),
    "odict": collections.OrderedDict(z=1, a=2), "enum": Color.BLUE, "intenum": Level.HIGH,
    "dataclass": Cfg(4, ("t",)), "namedtuple": Pair(1, 2.5), "dtype": torch.float16,
    "device": torch.device("cpu"), "size": torch.Size([2, 3]), "tensor": torch.arange(3.0),
    "class": nn.GELU, "function": torch.tanh, "functional": F.gelu,
    "partial": functools.partial(nn.LayerNorm, eps=1e-3),
}


def test_every_supported_argument_value_survives_the_round_trip() -> None:
    model = Everything(VALUES, sub=Everything([1], sub=nn.Linear(2, 2)), factory=nn.ReLU)
    rebuilt = roundtrip(model, HERE)
    assert type(rebuilt) is Everything and type(rebuilt.sub) is Everything
    got, want = rebuilt.values, VALUES
    assert set(got) == set(want)
    for key, value in want.items():
        if key == "tensor":
            assert torch.equal(got[key], value)
        elif key == "partial":
            assert got[key].func is nn.LayerNorm and got[key].keywords == {"eps": 1e-3}
        else:
            assert got[key] == value and type(got[key]) is type(value), key
    assert rebuilt.factory is nn.ReLU
    assert type(rebuilt.sub.sub) is nn.Linear


def test_the_spec_holds_only_weights_only_loadable_data() -> None:
    spec = architecture.capture(Everything(VALUES, sub=nn.Linear(2, 2)))
    format.check_loadable(spec, "spec")  # raises on anything a safe load could not read


@pytest.mark.parametrize("value, where", [
    (lambda x: x, "model.values"), (object(), "model.values"), ({"k": [1, object()]}, "model.values['k'][1]"),
])
def test_unsupported_values_are_named_with_their_path(value: Any, where: str) -> None:
    with pytest.raises(ArchitectureError) as info:
        architecture.capture(Everything(value, sub=nn.Identity()))
    assert where in str(info.value)


def test_classes_defined_inside_functions_have_no_import_path() -> None:
    class Local(nn.Module):
        pass

    with pytest.raises(ArchitectureError, match="module level"):
        architecture.capture(Everything(Local, sub=nn.Identity()))


class Plain(nn.Module):
    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)


def test_an_undecorated_class_says_how_to_fix_it() -> None:
    with pytest.raises(ArchitectureError, match=r"Plain.*does not record") as info:
        architecture.capture(Plain())
    assert "@ckpt.rebuildable" in str(info.value) and "ckpt.export" in str(info.value)


@ckpt.rebuildable
class Base(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)


class UndecoratedChild(Base):
    def __init__(self, width: int, extra: int) -> None:
        super().__init__(width + extra)


@ckpt.rebuildable
class DecoratedChild(Base):
    def __init__(self, width: int, extra: int) -> None:
        super().__init__(width + extra)


def test_a_subclass_needs_its_own_decorator() -> None:
    with pytest.raises(ArchitectureError, match="UndecoratedChild"):
        architecture.capture(UndecoratedChild(2, 1))
    rebuilt = roundtrip(DecoratedChild(2, 1), HERE)
    assert type(rebuilt) is DecoratedChild and rebuilt.lin.in_features == 3


@ckpt.rebuildable
class Signatures(nn.Module):
    def __init__(self, a: int, /, b: int, *rest: int, c: int = 0, **options: Any) -> None:
        super().__init__()
        self.seen = (a, b, rest, c, options)


def test_positional_only_varargs_and_kwargs_are_recorded() -> None:
    rebuilt = roundtrip(Signatures(1, 2, 3, 4, c=5, d=6), HERE)
    assert rebuilt.seen == (1, 2, (3, 4), 5, {"d": 6})
    assert roundtrip(Signatures(1, b=2), HERE).seen == (1, 2, (), 0, {})


def test_the_record_is_a_snapshot_of_the_arguments() -> None:
    cfg = {"layers": [1, 2]}
    model = Everything(cfg, sub=nn.Identity())
    cfg["layers"].append(3)  # mutated after construction
    assert roundtrip(model, HERE).values == {"layers": [1, 2]}


def test_rebuildable_refuses_what_is_not_a_module_class() -> None:
    with pytest.raises(ConfigError, match="nn.Module"):
        ckpt.rebuildable(dict)  # type: ignore[arg-type]


def test_describe_shows_the_recorded_call() -> None:
    text = architecture.describe(architecture.capture(DecoratedChild(2, extra=1)))
    assert text == f"{HERE}:DecoratedChild(width=2, extra=1)"


# -- the trust rule -----------------------------------------------------------------------

@pytest.fixture
def tripwire(tmp_path, monkeypatch):
    """A package whose import (or whose function's call) leaves a marker file."""
    pkg = tmp_path / "tripwire_pkg"
    pkg.mkdir()
    marker = tmp_path / "imported"
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
        def boom(*args, **kwargs):
            pathlib.Path({str(marker)!r} + ".called").write_text("called")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("tripwire_pkg", None)


def spec_naming(module: str, qualname: str = "Thing") -> dict:
    return {"version": 1, "module": module, "qualname": qualname, "args": [], "kwargs": {}}


def test_untrusted_modules_are_refused_before_import(tripwire) -> None:
    spec = {**spec_naming("torch.nn", "Sequential"),
            "args": [{"kind": "module", "spec": spec_naming("tripwire_pkg.models")}]}
    with pytest.raises(UntrustedModuleError) as info:
        rebuild.build(spec, rebuild.Resolver())
    message = str(info.value)
    assert "'tripwire_pkg.models'" in message and "trusted=['tripwire_pkg']" in message
    assert "trust_all=True" in message
    assert isinstance(info.value, UnsafeCheckpointError)
    assert not tripwire.exists() and "tripwire_pkg" not in sys.modules


def test_enum_and_function_references_are_checked_too(tripwire) -> None:
    spec = {**spec_naming("torch.nn", "Identity"),
            "kwargs": {"x": {"kind": "global", "module": "tripwire_pkg", "qualname": "boom"}}}
    with pytest.raises(UntrustedModuleError, match="tripwire_pkg"):
        rebuild.build(spec, rebuild.Resolver())
    assert not tripwire.exists()


@pytest.mark.parametrize("trusted, module, ok", [
    ((), "torch.nn.modules.linear", True), ((), "torch", True), ((), "torch.hub", False),
    (("mypkg",), "mypkg", True), (("mypkg",), "mypkg.sub.models", True), (("mypkg",), "mypkgevil", False),
    ("mypkg", "mypkg.models", True), (("torch",), "torch.hub", True), ((), "__main__", False),
])
def test_trust_is_by_package_prefix(trusted, module: str, ok: bool) -> None:
    assert rebuild.Resolver(trusted).is_trusted(module) is ok


def test_trust_all_trusts_everything() -> None:
    assert rebuild.Resolver(trust_all=True).is_trusted("anything.at.all")
    with pytest.raises(ConfigError, match="trust_all=True"):
        rebuild.Resolver(True)  # type: ignore[arg-type]


def test_a_trusted_name_that_is_not_a_module_class_is_never_called(tripwire) -> None:
    with pytest.raises(ArchitectureError, match="not a torch.nn.modules.module.Module subclass"):
        rebuild.build(spec_naming("tripwire_pkg", "boom"), rebuild.Resolver(["tripwire_pkg"]))
    assert tripwire.exists() and not tripwire.with_name("imported.called").exists()


def test_a_newer_spec_version_is_refused() -> None:
    with pytest.raises(ckpt.FormatVersionError, match="upgrade"):
        rebuild.build({**spec_naming("torch.nn", "Identity"), "version": 99}, rebuild.Resolver())


def test_rename_maps_a_moved_class_and_is_trust_checked() -> None:
    spec = architecture.capture(DecoratedChild(1, extra=1))
    moved = {**spec, "module": "old_location"}
    with pytest.raises(ArchitectureError, match="old_location:DecoratedChild cannot be imported") as info:
        rebuild.build(moved, rebuild.Resolver(["old_location", HERE]))
    assert "rename=" in str(info.value)
    rename = {"old_location:DecoratedChild": f"{HERE}:DecoratedChild"}
    with pytest.raises(UntrustedModuleError):
        rebuild.build(moved, rebuild.Resolver(rename=rename))
    assert type(rebuild.build(moved, rebuild.Resolver([HERE], rename=rename))) is DecoratedChild
    assert type(rebuild.build(moved, rebuild.Resolver([HERE], rename={"old_location": HERE}))) is DecoratedChild


# -- what a name may resolve to -------------------------------------------------------------

BUILT = []  # constructions of Recorder, to prove a refused spec built nothing


@ckpt.rebuildable
class Recorder(nn.Module):
    def __init__(self, fn: Any = None) -> None:
        super().__init__()
        BUILT.append(fn)


def global_value(module: str, qualname: str) -> dict:
    return {"kind": "global", "module": module, "qualname": qualname}


@pytest.fixture
def hub_repo(tmp_path):
    """A torch.hub repository whose hubconf leaves a marker file when it runs."""
    marker = tmp_path / "hub_ran"
    (tmp_path / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef x(*a, **k):\n    pass\n")
    return tmp_path, marker


def test_a_partial_of_torch_hub_load_is_refused_before_anything_runs(hub_repo) -> None:
    # the reviewer's attack: no trusted=, a torch.nn layer, and an "activation" that
    # walks from the trusted module torch to torch.hub.load, called by the layer's forward
    repo, marker = hub_repo
    BUILT.clear()
    attack = {"kind": "partial", "func": global_value("torch", "hub.load"), "args": [str(repo), "x"],
              "kwargs": {"source": "local", "trust_repo": True}}
    spec = {**spec_naming("torch.nn", "Sequential"),
            "args": [{"kind": "module", "spec": {**spec_naming(HERE, "Recorder")}},
                     {"kind": "module", "spec": {**spec_naming("torch.nn", "TransformerEncoderLayer"),
                                                 "kwargs": {"d_model": 4, "nhead": 1, "activation": attack}}}]}
    with pytest.raises(UntrustedModuleError) as info:
        rebuild.build(spec, rebuild.Resolver([HERE]))
    message = str(info.value)
    assert "torch:hub.load" in message and "'torch.hub'" in message
    assert "rename={'torch:hub.load': 'torch.hub:load'}" in message and "trusted=['torch.hub']" in message
    assert BUILT == [] and not marker.exists()  # nothing constructed, nothing called


@pytest.mark.parametrize("module, qualname, names", [
    ("torch", "os.system", "through the module 'os'"),
    ("torch", "hub.load", "through the module 'torch.hub'"),
    ("torch", "load", "torch.serialization.load"),
    ("torch", "save", "torch.serialization.save"),
    ("torch.nn.modules.module", "OrderedDict", "collections.OrderedDict"),
    ("torch.nn.functional", "torch", "is a module"),
    ("torch.nn", "Module.__init__.__globals__", "through a function"),
    ("torch.nn", "Module.__class__", "builtins.type"),
    ("torch.nn.init", "warnings", "is a module"),
    ("builtins", "eval", "builtins:eval: code in 'builtins', which is not trusted"),
    ("builtins", "exec", "builtins:exec: code in 'builtins', which is not trusted"),
    ("os", "system", "os:system: code in 'os', which is not trusted"),
])
def test_names_that_reach_untrusted_code_are_refused(module: str, qualname: str, names: str) -> None:
    BUILT.clear()
    spec = {**spec_naming(HERE, "Recorder"), "kwargs": {"fn": global_value(module, qualname)}}
    with pytest.raises(UntrustedModuleError) as info:
        rebuild.build(spec, rebuild.Resolver([HERE]))
    assert f"{module}:{qualname}" in str(info.value)
    assert names in str(info.value) and "hint:" in str(info.value)
    assert BUILT == []


def test_the_walk_rule_holds_even_when_everything_is_trusted() -> None:
    with pytest.raises(UntrustedModuleError, match="through the module 'os'"):
        rebuild.Resolver(trust_all=True).resolve("torch", "os.system", "x")


def test_an_untrusted_function_names_the_opt_in_and_the_opt_in_works() -> None:
    with pytest.raises(UntrustedModuleError) as info:
        rebuild.Resolver().resolve("torch", "load", "x")
    assert "trusted=['torch.serialization']" in str(info.value) and "trust_all=True" in str(info.value)
    assert rebuild.Resolver(["torch.serialization"]).resolve("torch", "load", "x") is torch.load
    with pytest.raises(UntrustedModuleError, match="through the module 'torch.hub'"):
        rebuild.Resolver(["torch"]).resolve("torch", "hub.load", "x")
    hub = rebuild.Resolver(["torch.hub"], rename={"torch:hub.load": "torch.hub:load"})
    assert hub.resolve("torch", "hub.load", "x") is torch.hub.load  # the hint's opt-in


@pytest.mark.parametrize("value", [torch.tanh, torch.relu, torch.sigmoid, F.gelu, F.silu, F.logsigmoid,
                                   F.softplus, torch.nn.init.kaiming_uniform_, nn.GELU, nn.LayerNorm])
def test_torch_nn_classes_and_allow_listed_functions_are_trusted_by_default(value: Any) -> None:
    spec = architecture.capture(Recorder(fn=value))
    arg = spec["kwargs"]["fn"]
    assert arg["module"] in ("torch", "torch.nn.functional", "torch.nn.init") or arg["module"].startswith("torch.nn.")
    BUILT.clear()
    rebuild.build(spec, rebuild.Resolver([HERE]))
    assert [value] == BUILT


def test_capture_and_rebuild_keep_no_state_between_calls() -> None:
    """No module-level memo (design: no hidden global state)."""
    def sizes() -> dict:
        out = {}
        for mod in (architecture, rebuild):
            for name, value in vars(mod).items():
                if isinstance(value, (dict, list, set)) and not name.isupper():
                    out[f"{mod.__name__}.{name}"] = len(value)
                elif hasattr(value, "cache_info"):
                    out[f"{mod.__name__}.{name}"] = value.cache_info().currsize
        return out

    before = sizes()
    for width in (3, 5, 7):
        roundtrip(nn.Sequential(nn.Linear(width, width + 1), nn.LayerNorm(width + 1), nn.GRU(2, width)))
    assert sizes() == before
