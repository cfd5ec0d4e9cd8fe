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


class CosineLinear(nn.Linear):
    """Cosine classifier: ``scale * <x/(|x|+1e-5), w_c/(|w_c|+1e-5)>`` per class ``c``, no bias.

    The ``distLinear`` head of the ER-ACE/ER-AML code (``pclucas14/AML`` @ 7c92936, ``model.py``;
    ``main.py`` builds it for every method whose name contains "ace" or "aml"), scale factor 10
    there; the 1e-5 is added to the norms as in that code.  An ``nn.Linear`` (``weight``
    ``[C, D]``, same initialisation, ``bias=None``), so code that reads ``head.weight`` keeps working."""

    def __init__(self, in_features: int, out_features: int, scale: float = 10.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / (x.norm(p=2, dim=1, keepdim=True) + 1e-5)
        w = self.weight / (self.weight.norm(p=2, dim=1, keepdim=True) + 1e-5)
        return self.scale * x @ w.t()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"


class LucirCosineLinear(nn.Linear):
    """LUCIR's cosine classifier (Hou et al. 2019): ``sigma * <x/|x|, w_c/|w_c|>`` with a learnable
    scale ``sigma`` initialised to 1, weight ~ U(-1/sqrt(D), 1/sqrt(D)), no bias.  As
    ``utilsCIL/modified_linear.py::CosineLinear`` (GregoirePetit/utilsCIL), the head of the LUCIR
    ResNet-18 FeTrIL's released ``scratch.py`` trains its initial model with."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        bound = 1.0 / in_features ** 0.5
        nn.init.uniform_(self.weight, -bound, bound)
        self.sigma = nn.Parameter(torch.ones(1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigma * nn.functional.linear(nn.functional.normalize(x, p=2, dim=1),
                                                 nn.functional.normalize(self.weight, p=2, dim=1))


CLASSIFIERS = ("linear", "cosine", "lucir")


def set_classifier(model: Classifier, kind: str, scale: float = 10.0) -> Classifier:
    """Replace ``model.head`` by a fresh head of ``kind`` (``linear``: keep the ``nn.Linear``;
    ``cosine``: :class:`CosineLinear` with ``scale``; ``lucir``: :class:`LucirCosineLinear`)."""
    if kind not in CLASSIFIERS:
        raise ValueError(f"unknown classifier '{kind}'; valid: {', '.join(CLASSIFIERS)}")
    w = model.head.weight
    if kind == "cosine":
        model.head = CosineLinear(model.head.in_features, model.head.out_features, scale, device=w.device, dtype=w.dtype)
    elif kind == "lucir":
        model.head = LucirCosineLinear(model.head.in_features, model.head.out_features, device=w.device, dtype=w.dtype)
    return model


def build_model(cfg, input_shape: tuple[int, int, int], num_classes: int) -> Classifier:
    """Build the model described by a model config section (``cfg.name`` picks the builder)."""
    from clbench.registry import MODELS

    return MODELS.get(cfg.name).obj(cfg, input_shape, num_classes)
