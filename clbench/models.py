"""Models: a backbone producing features plus a linear head over all classes of the stream.

Every model is a :class:`Classifier`, so strategies can reach ``model.backbone``,
``model.head`` and ``model.features(x)`` the same way (EWC excludes the head, FeTrIL and
SLCA work on features).  Builders are registered by name with a typed config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from clbench.registry import register_model


class Classifier(nn.Module):
    """``head(backbone(x))``; ``backbone`` maps an input batch to ``[B, feature_dim]`` features."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: List[int] = field(default_factory=lambda: [400, 400])  # van de Ven et al. 2022: 2 x 400 for MNIST
    dropout: float = 0.0


@register_model("mlp", config=MLPConfig, description="Fully connected ReLU network on flattened pixels")
def mlp(cfg: MLPConfig, input_shape: tuple[int, int, int], num_classes: int) -> Classifier:
    layers: list[nn.Module] = [nn.Flatten()]
    width = input_shape[0] * input_shape[1] * input_shape[2]
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        width = h
    return Classifier(nn.Sequential(*layers), width, num_classes)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18Backbone(nn.Module):
    """ResNet-18 with a 3x3 stem and no max-pool (CIFAR style); ``nf`` sets the widths
    (nf, 2nf, 4nf, 8nf).  ``nf=20`` is the *reduced* ResNet-18 of Lopez-Paz & Ranzato (GEM, 2017)."""

    def __init__(self, in_channels: int, nf: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False), nn.BatchNorm2d(nf), nn.ReLU())
        widths, blocks, cin = [nf, 2 * nf, 4 * nf, 8 * nf], [], nf
        for i, w in enumerate(widths):
            blocks += [_BasicBlock(cin, w, 1 if i == 0 else 2), _BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)


@dataclass
class ResNet18Config:
    name: str = "resnet18"
    nf: int = 20  # 20 = reduced ResNet-18 (GEM); 64 = the standard widths


@register_model("resnet18", config=ResNet18Config, description="ResNet-18, CIFAR stem; nf=20 is the reduced variant")
def resnet18(cfg: ResNet18Config, input_shape: tuple[int, int, int], num_classes: int) -> Classifier:
    backbone = ResNet18Backbone(input_shape[0], cfg.nf)
    return Classifier(backbone, backbone.out_dim, num_classes)


def build_model(cfg, input_shape: tuple[int, int, int], num_classes: int) -> Classifier:
    """Build the model described by a model config section (``cfg.name`` picks the builder)."""
    from clbench.registry import MODELS

    return MODELS.get(cfg.name).obj(cfg, input_shape, num_classes)
