"""Models: a backbone producing features plus a linear head over all classes of the stream.

Every model is a :class:`Classifier`, so strategies can reach ``model.backbone``,
``model.head`` and ``model.features(x)`` the same way (EWC excludes the head, FeTrIL and
SLCA work on features).  Builders are registered by name with a typed config, one family
per module of this package (``mlp``, ``resnet``, ...).
"""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """``head(backbone(x))``; ``backbone`` maps an input batch to ``[B, feature_dim]`` features.

    ``input_stats``: the ``(mean, std)`` input normalisation that pretrained weights expect; the
    engine uses it instead of the dataset's statistics when it is set.  ``input_size``: the
    ``(H, W)`` a fixed-size model (a ViT's position embeddings) needs; the engine resizes inputs
    of another size to it.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)
        self.input_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self.input_size: tuple[int, int] | None = None  # (H, W) the model needs; inputs are resized to it

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_model(cfg, input_shape: tuple[int, int, int], num_classes: int) -> Classifier:
    """Build the model described by a model config section (``cfg.name`` picks the builder)."""
    from clbench.registry import MODELS

    return MODELS.get(cfg.name).obj(cfg, input_shape, num_classes)
