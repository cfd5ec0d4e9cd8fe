"""Fully connected networks on flattened pixels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from torch import nn

from clbench.models import Classifier
from clbench.registry import register_model
from clbench.validation import bounded


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: List[int] = bounded(default_factory=lambda: [400, 400], ge=1)  # van de Ven et al. 2022: 2 x 400 for MNIST
    dropout: float = bounded(0.0, ge=0, le=1)


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
