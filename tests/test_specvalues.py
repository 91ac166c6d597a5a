"""ckpt.specvalues: the one vocabulary of a spec's tagged values, written by encode and read by build."""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
from typing import Any, Dict, NamedTuple

import torch
from torch import nn

from ckpt import spec, specvalues
from ckpt.models import build


class Color(enum.Enum):
    RED = 1


class Pair(NamedTuple):
    a: int
    b: int


@dataclasses.dataclass
class Conf:
    width: int = 3


SAMPLES: Dict[str, Any] = {
    specvalues.MODULE: nn.Linear(2, 3), specvalues.ENUM: Color.RED, specvalues.GLOBAL: torch.relu,
    specvalues.NAMEDTUPLE: Pair(1, 2), specvalues.DATACLASS: Conf(4),
    specvalues.PARTIAL: functools.partial(torch.clamp, min=0.0), specvalues.DICT: {"a": 1},
    specvalues.ODICT: collections.OrderedDict(a=1), specvalues.SET: {1, 2}, specvalues.FROZENSET: frozenset({3}),
}


def test_encode_writes_every_kind_with_exactly_its_fields() -> None:
    assert set(SAMPLES) == set(specvalues.KINDS)
    for kind, value in SAMPLES.items():
        encoded = spec.encode(value, "x")
        assert specvalues.kind_of(encoded) == kind
        assert set(encoded) - {"kind"} == set(specvalues.KINDS[kind]), kind


def test_build_decodes_every_kind_back() -> None:
    resolver = build.Resolver(trust_all=True)
    for kind, value in SAMPLES.items():
        decoded = build._decode(spec.encode(value, "x"), resolver, "x")
        if kind == specvalues.MODULE:
            assert isinstance(decoded, nn.Linear) and decoded.out_features == 3
        elif kind == specvalues.PARTIAL:
            assert decoded.func is torch.clamp and decoded.keywords == {"min": 0.0}
        else:
            assert decoded == value and type(decoded) is type(value), kind


def test_refs_names_every_import_of_a_nested_spec() -> None:
    outer = {"module": "m", "qualname": "Net", "args": [spec.encode(SAMPLES[k], "x") for k in SAMPLES], "kwargs": {}}
    names = set(specvalues.refs(outer))
    assert {("m", "Net"), ("torch.nn.modules.linear", "Linear"), (__name__, "Color"), (__name__, "Pair"),
            (__name__, "Conf")} <= names
    assert any(q == "relu" for _, q in names) and any(q == "clamp" for _, q in names)
