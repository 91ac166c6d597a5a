"""Models for the save_model / load_model / export tests.

A real module (imported as ``model_zoo``, so load_model must be told to trust it),
and absent from the loader's sys.path in the export tests, where no class may be
importable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
from torch import nn

import ckpt


class Act(enum.Enum):
    RELU = "relu"
    GELU = "gelu"

    def layer(self) -> nn.Module:
        return nn.ReLU() if self is Act.RELU else nn.GELU()


@ckpt.rebuildable
class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: Tuple[int, ...], out_features: int,
                 act: Act = Act.RELU, dropout: float = 0.0) -> None:
        super().__init__()
        dims = (in_features, *hidden)
        layers = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), act.layer(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@ckpt.rebuildable
class CNN(nn.Module):
    def __init__(self, channels: Tuple[int, ...] = (3, 8, 16), num_classes: int = 10) -> None:
        super().__init__()
        blocks = []
        for a, b in zip(channels, channels[1:]):
            blocks += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Block(nn.Module):
    """A custom sub-module built inside Custom.__init__: needs no decorator."""

    def __init__(self, dim: int, scale: float, residual: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = scale
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.norm(x)) * self.scale
        return x + y if self.residual else y


@dataclass
class HeadConfig:
    dim: int
    bias: bool = True


@ckpt.rebuildable
class Custom(nn.Module):
    """Non-tensor constructor arguments: a tuple, an enum, a nested dict, a dataclass, a class."""

    def __init__(self, dims: Tuple[int, int], kind: Act, cfg: Dict[str, Any], head: HeadConfig,
                 *, norm: type = nn.LayerNorm) -> None:
        super().__init__()
        width, depth_scale = dims
        self.embed = nn.Linear(cfg["in"], width)
        self.act = kind.layer()
        self.blocks = nn.ModuleList(Block(width, b["scale"] * depth_scale, cfg["residual"])
                                    for b in cfg["blocks"])
        self.norm = norm(width)
        self.head = nn.Linear(width, head.dim, bias=head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.embed(x))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@ckpt.rebuildable
class Wrapper(nn.Module):
    """Takes other modules as arguments (one of them itself rebuildable)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x) / self.temperature)


@ckpt.rebuildable
class Holder(nn.Module):
    """Its only child is named ``module``, like a DDP wrapper's: its keys are not a prefix."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.module = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot trace it, TorchScript can."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            return self.a(x)
        return self.b(x)


class Undecorated(nn.Module):
    """A user class without @ckpt.rebuildable: its arguments cannot be known."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def make_models() -> Dict[str, Tuple[nn.Module, torch.Tensor]]:
    """name -> (model in eval mode with non-trivial weights and statistics, example input)."""
    torch.manual_seed(0)
    cfg = {"in": 6, "residual": True, "blocks": [{"scale": 0.5}, {"scale": 2.0}], "names": ("a", "b")}
    models = {
        "mlp": (MLP(8, (16, 16), 4, act=Act.GELU, dropout=0.1), torch.randn(5, 8)),
        "cnn": (CNN((3, 8, 16), 10), torch.randn(4, 3, 16, 16)),
        "custom": (Custom((12, 3), Act.RELU, cfg, HeadConfig(dim=5, bias=False), norm=nn.LayerNorm), torch.randn(3, 6)),
        "wrapper": (Wrapper(MLP(8, (16,), 12), nn.Sequential(nn.Linear(12, 3), nn.Softmax(dim=-1)),
                            temperature=2.0), torch.randn(6, 8)),
        "sequential": (nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 4)),
                       torch.randn(2, 8)),
    }
    with torch.no_grad():
        for model, x in models.values():
            model.train()
            for _ in range(3):  # move BatchNorm statistics away from their initial values
                model(x + torch.randn_like(x))
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            model.eval()
    return models


def run_fresh(script: str, *args: str, cwd: str, pythonpath: str = "") -> str:
    """Run ``script`` in a fresh interpreter; ``pythonpath`` decides what it can import."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"fresh process failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout
