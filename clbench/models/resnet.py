"""ResNets: ResNet-18 with a CIFAR-style stem (default) or the standard ImageNet stem, full or reduced width."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clbench.models import Classifier, set_classifier
from clbench.registry import ClbenchError, register_model
from clbench.validation import bounded, choice


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, relu_out: bool = True):
        super().__init__()
        self.relu_out = relu_out  # False: no ReLU after the residual sum (LUCIR's last block)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return torch.relu(out) if self.relu_out else out


STEMS = ("cifar", "imagenet")


class ResNet18Backbone(nn.Module):
    """ResNet-18; ``nf`` sets the widths (nf, 2nf, 4nf, 8nf).  ``nf=20`` is the *reduced*
    ResNet-18 of Lopez-Paz & Ranzato (GEM, 2017), ``nf=64`` the standard one.

    ``stem="cifar"``: a 3x3 stride-1 convolution and no max-pool (32 px inputs keep their
    resolution).  ``stem="imagenet"``: the standard stem of He et al. 2016 / torchvision, a 7x7
    stride-2 convolution then a 3x3 stride-2 max-pool (a 64 px Tiny-ImageNet image reaches the
    residual stages at 16 px, the last stage at 2 px).

    ``last_relu=False``: no ReLU after the last residual block, as LUCIR's modified ResNet-18
    (``lucir_models/modified_resnet.py`` in FeTrIL @ e3b139c: ``BasicBlock(last=True)``), so the
    features can be negative (they feed a cosine classifier there)."""

    def __init__(self, in_channels: int, nf: int, stem: str = "cifar", last_relu: bool = True):
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False), nn.BatchNorm2d(nf), nn.ReLU())
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, nf, 7, 2, 3, bias=False), nn.BatchNorm2d(nf), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"unknown ResNet stem '{stem}'; valid: {', '.join(STEMS)}")
        widths, blocks, cin = [nf, 2 * nf, 4 * nf, 8 * nf], [], nf
        for i, w in enumerate(widths):
            blocks += [_BasicBlock(cin, w, 1 if i == 0 else 2), _BasicBlock(w, w, 1, relu_out=last_relu or i < 3)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)


@dataclass
class ResNet18Config:
    name: str = "resnet18"
    nf: int = bounded(20, ge=1)  # 20 = reduced ResNet-18 (GEM); 64 = the standard widths
    stem: str = choice("cifar", "cifar", "imagenet")  # cifar: 3x3 conv, no max-pool (32 px) | imagenet: 7x7/2 conv + 3x3/2 max-pool (64 px and up)
    # linear | cosine: ER-ACE's cosine head (pclucas14/AML model.py distLinear, scale 10; AdaB2N's mammoth code uses linear)
    # | lucir: LUCIR's cosine head with a learnable scale initialised to 1 (utilsCIL modified_linear.CosineLinear; FeTrIL's initial model)
    classifier: str = choice("linear", "linear", "cosine", "lucir")
    cosine_scale: float = bounded(10.0, gt=0)  # scale factor of the cosine head (AML: 10)
    last_relu: bool = True  # false: no ReLU after the last residual block (LUCIR's modified ResNet-18, FeTrIL's released initial model)
    input_size: int = bounded(0, ge=0)  # 0: the data's resolution | N: inputs resized (bilinear, after augmentation) to N x N (FeTrIL's released recipe: 224)
    input_crop: float = bounded(1.0, gt=0, le=1)  # evaluation/features: resize to input_size / input_crop, keep the central input_size (FeTrIL: 0.875 = Resize 256 + CenterCrop 224)


@register_model("resnet18", config=ResNet18Config,
                description="ResNet-18, CIFAR (default) or ImageNet stem; nf=20 is the reduced variant")
def resnet18(cfg: ResNet18Config, input_shape: tuple[int, int, int], num_classes: int) -> Classifier:
    if cfg.stem not in STEMS:
        raise ClbenchError(f"model.stem must be one of {', '.join(STEMS)}, got '{cfg.stem}'")
    backbone = ResNet18Backbone(input_shape[0], cfg.nf, cfg.stem, last_relu=cfg.last_relu)
    model = set_classifier(Classifier(backbone, backbone.out_dim, num_classes), cfg.classifier, cfg.cosine_scale)
    if cfg.input_size:
        model.input_size = (cfg.input_size, cfg.input_size)
    model.input_crop = cfg.input_crop  # read by the engine's preprocessing (evaluation and feature extraction only)
    return model
