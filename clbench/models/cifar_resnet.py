"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", §4.2):
ResNet-20/32/44/56/110 with option-A shortcuts, the architecture of the CIFAR-10 weights in
``../shared/data/weights/cifar10-resnet`` (Y. Idelbayev's ``pytorch_resnet_cifar10``, BSD-2).

Depth ``6n + 2``: a 3x3 conv (16 channels), three stages of ``n`` basic blocks with 16, 32 and
64 channels (the first block of stages 2 and 3 has stride 2), global average pooling and a
linear head.  Option A: where a block changes the shape, the identity shortcut takes every
second pixel (stride-2 subsampling) and zero-pads the new channels (``planes // 4`` on each
side); it has no parameters.

``checkpoint`` loads such a file (``{'state_dict': {'module.conv1.weight', ...}, ...}``, a
``torch.save`` of a ``DataParallel`` model) with ``torch.load(weights_only=True)`` and maps its
keys onto :class:`~clbench.models.Classifier` (``module.linear.*`` -> ``head.*``, the rest ->
``backbone.*``).  Those weights were trained on inputs normalised with the *ImageNet* channel
statistics (mean 0.485/0.456/0.406, std 0.229/0.224/0.225; the repository's ``trainer.py``), so
a stream feeding them must normalise that way (``corruption_stream`` does by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from clbench.models import Classifier
from clbench.registry import ClbenchError, register_model
from clbench.safe_load import tensor_state_dict, torch_load
from clbench.validation import bounded, path

DEPTHS = (20, 32, 44, 56, 110)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the input normalisation of the provided weights
IMAGENET_STD = (0.229, 0.224, 0.225)


class OptionABlock(nn.Module):
    """A basic block (two 3x3 convs with BN) with the parameter-free option-A shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = stride != 1 or cin != cout
        self.pad = (cout - cin) // 2 if self.downsample else 0

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.downsample:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNetBackbone(nn.Module):
    """Everything of a CIFAR ResNet but the linear head: ``[B, 3, H, W]`` -> ``[B, 64]``."""

    def __init__(self, depth: int, in_channels: int = 3, width: int = 16):
        super().__init__()
        if depth not in DEPTHS:
            raise ClbenchError(f"model cifar_resnet: depth must be one of {DEPTHS} (6n+2), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin, stages = width, []
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(OptionABlock(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


@dataclass
class CifarResNetConfig:
    name: str = "cifar_resnet"
    depth: int = bounded(20, ge=8)  # 20 | 32 | 44 | 56 | 110
    width: int = bounded(16, ge=1)  # channels of the first stage (16 in He et al. and in the provided weights)
    checkpoint: Optional[str] = path(None)  # a pytorch_resnet_cifar10 .th file (e.g. resnet56-4bfd9763.th); None: random init


@register_model("cifar_resnet", config=CifarResNetConfig,
                description="CIFAR ResNet-20/32/44/56/110, option-A shortcuts; loads the provided CIFAR-10 weights")
def cifar_resnet(cfg: CifarResNetConfig, input_shape: tuple[int, int, int], num_classes: int) -> Classifier:
    backbone = CifarResNetBackbone(cfg.depth, in_channels=input_shape[0], width=cfg.width)
    model = Classifier(backbone, backbone.out_dim, num_classes)
    if cfg.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint)
    return model


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A pytorch_resnet_cifar10 state dict (``module.``-prefixed or not) in our key layout."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        key = key.replace("compressible_", "")  # a later revision of that repository renamed conv1/linear
        out[f"head.{key.removeprefix('linear.')}" if key.startswith("linear.") else f"backbone.{key}"] = value
    return out


def load_checkpoint(model: Classifier, path: str | Path) -> None:
    """Load a CIFAR ResNet checkpoint into ``model`` (shapes and keys must match exactly,
    except BN's ``num_batches_tracked`` counters, which those old files lack)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ClbenchError(
            f"model cifar_resnet: checkpoint not found: {file}. The CIFAR-10 ResNet weights are "
            f"resnet{{20,32,44,56}}-*.th in ../shared/data/weights/cifar10-resnet (set model.checkpoint to one), "
            f"or set model.checkpoint=null for a randomly initialised model"
        )
    raw = torch_load(file, "model cifar_resnet: checkpoint")  # weights_only=True: nothing in the file runs
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    state = convert_state_dict(tensor_state_dict(state, file, "model cifar_resnet: checkpoint"))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        depth_hint = ""
        n_blocks = len({k.split(".")[2] for k in state if k.startswith("backbone.layer1.")})
        if n_blocks:
            depth_hint = f" (the file looks like depth {6 * n_blocks + 2}: set model.depth)"
        raise ClbenchError(
            f"model cifar_resnet: {file} does not fit depth {sum(1 for _ in model.backbone.layer1) * 6 + 2} "
            f"with {model.head.out_features} classes{depth_hint}. Missing: {missing[:4]}; unexpected: {unexpected[:4]}; "
            f"shape mismatches: {wrong[:4]}"
        )
    model.load_state_dict(state, strict=False)
