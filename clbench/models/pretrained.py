"""Pretrained backbones: any timm model by name, with weights from timm's hub or a local file.

``model: {name: timm, arch: vit_base_patch16_224, pretrained: true}`` downloads timm's weights
(for users who can); ``checkpoint: PATH`` loads a local file instead (``.safetensors``, or a
torch file read with ``weights_only=True``; a ``state_dict``/``model`` wrapper is unwrapped).
Weights are never silently replaced by a random initialisation: without ``checkpoint`` a
``pretrained: true`` model whose download fails stops with an error that says what to do, and
a random backbone must be asked for with ``pretrained: false``.

The classification head of the checkpoint is dropped (``head_prefixes``): a :class:`Classifier`
puts its own head over the stream's classes on the backbone's pooled features
(``forward_head(..., pre_logits=True)``, the [CLS] token for a ViT).  The input normalisation
the weights expect (``normalize``) overrides the dataset statistics in the engine.

The offline weights of this project are registered as ``vit_tiny_patch8_64`` (the ViT-Tiny/8 at
64 px of ``shared/data/weights/vit-tiny-tinyimagenet100``: timm's ``VisionTransformer`` with
``img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3``) and are loaded with
``arch: vit_tiny_patch8_64, checkpoint: .../vit_tiny_p8_64_tin100.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from clbench.models import Classifier
from clbench.registry import ClbenchError, register_model
from clbench.safe_load import load_problem, load_safetensors, tensor_state_dict, torch_load, weights_only_loads
from clbench.validation import bounded, choice, path

NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "dataset": None,  # the stream's own per-channel statistics
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # inputs in [-1, 1] (EfficientNet-Lite, ViT-21k)
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # inputs in [0, 1]
}

# Architectures timm does not name; the values are create_model kwargs over a base architecture.
CUSTOM_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_tiny_patch8_64": ("vit_tiny_patch16_224", {"img_size": 64, "patch_size": 8}),
}


@dataclass
class TimmConfig:
    name: str = "timm"
    arch: str = "vit_tiny_patch8_64"  # a timm model name (or one of CUSTOM_ARCHS)
    pretrained: bool = True  # load weights (checkpoint if given, else timm's hub); false = random init, on purpose
    checkpoint: Optional[str] = path(None)  # local .safetensors / torch state dict
    normalize: str = choice("imagenet", "dataset", "imagenet", "inception", "none")  # input normalisation the weights expect: dataset | imagenet | inception | none
    head_prefixes: List[str] = field(default_factory=lambda: ["head.", "fc.", "classifier."])  # dropped from checkpoints
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (drop_path_rate, ...)
    # resize the inputs to [H, W] before the model (bilinear), e.g. [224, 224] for an ImageNet CNN on 32-px CIFAR as
    # torchvision's weights.transforms() do; null: only where a ViT's position embeddings fix the size
    input_size: Optional[List[int]] = bounded(None, ge=1)
    # evaluation/features: resize to input_size / input_crop and keep the central input_size (torchvision's
    # Resize(256) + CenterCrop(224) = 0.875, as SLCA's test transform; weights.transforms() of ResNet-50 V2: 224/232)
    input_crop: float = bounded(1.0, gt=0, le=1)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``), as float32 tensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ClbenchError(f"model checkpoint not found: {path} (expected a .safetensors or torch state-dict file)")
    if path.suffix == ".safetensors":
        state = load_safetensors(path, "model checkpoint")
    else:
        state = torch_load(path, "model checkpoint")  # weights_only=True: nothing in the file runs
        for key in ("state_dict", "model", "module"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    state = tensor_state_dict(state, path, "model checkpoint")
    return {k.removeprefix("module."): v.float() if v.is_floating_point() else v for k, v in state.items()}


def create_timm_backbone(cfg: TimmConfig) -> nn.Module:
    """The timm model of ``cfg`` with its classification head removed (``num_classes=0``) and its weights loaded."""
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a dependency
        raise ClbenchError("model 'timm' needs the timm package: pip install timm") from e
    arch, kwargs = CUSTOM_ARCHS.get(cfg.arch, (cfg.arch, {}))
    kwargs = {**kwargs, **dict(cfg.kwargs)}
    if arch.split(".", 1)[0] not in timm.list_models() and arch not in CUSTOM_ARCHS:  # "name.tag" picks timm weights
        import difflib

        close = difflib.get_close_matches(cfg.arch, timm.list_models() + list(CUSTOM_ARCHS), n=3)
        raise ClbenchError(f"unknown timm architecture '{cfg.arch}'" + (f"; closest: {', '.join(close)}" if close else ""))
    hub = cfg.pretrained and cfg.checkpoint is None
    if hub and cfg.arch in CUSTOM_ARCHS:
        raise ClbenchError(f"'{cfg.arch}' has no weights on timm's hub: give the local file with model.checkpoint=PATH "
                           "(e.g. shared/data/weights/vit-tiny-tinyimagenet100/vit_tiny_p8_64_tin100.safetensors), "
                           "or ask for a random init with model.pretrained=false")
    try:
        with weights_only_loads():  # timm's own weight loading runs no code either
            model = timm.create_model(arch, pretrained=hub, num_classes=0, **kwargs)
    except Exception as e:
        if not hub:
            raise
        detail = load_problem(e) if "weights_only" in str(e) else " ".join(str(e).split())
        raise ClbenchError(
            f"could not fetch timm's pretrained weights for '{cfg.arch}' ({type(e).__name__}: {detail}). "
            "Give a local file with model.checkpoint=PATH, or train from a random init with model.pretrained=false"
        ) from e
    if cfg.checkpoint is not None:
        if not cfg.pretrained:
            raise ClbenchError("model.checkpoint is set but model.pretrained=false; drop one of them")
        state = {k: v for k, v in load_state_dict_file(cfg.checkpoint).items()
                 if not any(k.startswith(p) for p in cfg.head_prefixes)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ClbenchError(f"checkpoint {cfg.checkpoint} does not fit timm '{cfg.arch}' {kwargs}: "
                               f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                               f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    return model


class TimmBackbone(nn.Module):
    """Pooled pre-logit features of a timm model; ``model`` keeps timm's own modules (``blocks``,
    ``patch_embed``, ...) so that prompt methods can run their own forward through them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def feature_dim(self) -> int:
        return int(self.model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


@register_model("timm", config=TimmConfig,
                description="Any timm model by name (pretrained from the hub or a local checkpoint), new linear head")
def timm_model(cfg: TimmConfig, input_shape: tuple[int, int, int], num_classes: int) -> Classifier:
    if cfg.normalize not in NORMALIZATIONS:
        raise ClbenchError(f"model.normalize '{cfg.normalize}' is not one of {', '.join(NORMALIZATIONS)}")
    backbone = TimmBackbone(create_timm_backbone(cfg))
    model = Classifier(backbone, backbone.feature_dim, num_classes)
    stats = NORMALIZATIONS[cfg.normalize]
    if stats is not None and input_shape[0] != len(stats[0]):
        if input_shape[0] != 1:
            raise ClbenchError(f"model.normalize={cfg.normalize} has {len(stats[0])} channels, the data {input_shape[0]}")
        stats = ((sum(stats[0]) / len(stats[0]),), (sum(stats[1]) / len(stats[1]),))  # grayscale: channel mean
    model.input_stats = stats
    if cfg.input_size is not None and len(cfg.input_size) != 2:
        raise ClbenchError(f"model.input_size needs [H, W], got {cfg.input_size}")
    model.input_size = tuple(cfg.input_size) if cfg.input_size else fixed_input_size(backbone.model, input_shape)
    if cfg.input_crop < 1 and model.input_size is None:
        raise ClbenchError(f"model.input_crop={cfg.input_crop} needs a model input size: set model.input_size: [H, W]")
    model.input_crop = cfg.input_crop  # read by the engine's preprocessing (evaluation and feature extraction only)
    return model


def fixed_input_size(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int, int] | None:
    """The ``(H, W)`` a timm ViT's position embeddings fix, when the data's size differs from it
    (CIFAR's 32 px into a 64-px ViT: the engine upsamples, as the papers resize to 224); None for
    models that take any size (CNNs, ``dynamic_img_size=True``)."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None or getattr(model, "dynamic_img_size", False) or getattr(patch_embed, "dynamic_img_pad", False):
        return None
    size = tuple(int(v) for v in size)
    return None if size == tuple(input_shape[1:]) else size
