"""The ``timm`` model: architectures by name, local checkpoints, clear errors, input normalisation."""

from __future__ import annotations

import pytest
import torch

from clbench.models.pretrained import NORMALIZATIONS, TimmConfig, load_state_dict_file, timm_model
from clbench.registry import ClbenchError

timm = pytest.importorskip("timm")

from conftest import DATA_ROOT  # noqa: E402  (the one data root, tests/conftest.py)
VIT_TINY = DATA_ROOT / "weights" / "vit-tiny-tinyimagenet100" / "vit_tiny_p8_64_tin100.safetensors"
TINY_KWARGS = {"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "in_chans": 1}


def _tiny_cfg(**kw) -> TimmConfig:
    return TimmConfig(**{"arch": "vit_tiny_patch16_224", "pretrained": False, "normalize": "dataset",
                         "kwargs": dict(TINY_KWARGS), **kw})


def test_random_tiny_vit_has_a_new_head_over_the_stream_classes():
    model = timm_model(_tiny_cfg(), (1, 8, 8), 7)
    assert model.feature_dim == 32 and model.head.out_features == 7
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 7)
    assert model.input_stats is None  # normalize=dataset: the stream's statistics


def test_local_checkpoint_roundtrip_drops_the_head_and_loads_every_other_tensor(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **TINY_KWARGS)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = timm_model(TimmConfig(arch="vit_tiny_patch16_224", checkpoint=str(path), kwargs=dict(TINY_KWARGS)), (1, 8, 8), 3)
    x = torch.randn(4, 1, 8, 8)
    expected = source.forward_head(source.forward_features(x), pre_logits=True)
    torch.testing.assert_close(model.features(x), expected)
    (mean,), (std,) = model.input_stats  # ImageNet statistics averaged for the one grayscale channel
    assert mean == pytest.approx(sum(NORMALIZATIONS["imagenet"][0]) / 3) and std == pytest.approx(0.226, abs=1e-3)


def test_checkpoint_of_another_architecture_is_refused_with_the_mismatch(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **{**TINY_KWARGS, "depth": 3})
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(ClbenchError, match="unexpected.*blocks.2"):
        timm_model(TimmConfig(arch="vit_tiny_patch16_224", checkpoint=str(path), kwargs=dict(TINY_KWARGS)), (1, 8, 8), 3)


def test_errors_a_user_can_act_on(tmp_path):
    with pytest.raises(ClbenchError, match="checkpoint not found"):
        load_state_dict_file(tmp_path / "missing.safetensors")
    with pytest.raises(ClbenchError, match="no weights on timm's hub.*model.checkpoint"):
        timm_model(TimmConfig(arch="vit_tiny_patch8_64"), (3, 64, 64), 10)  # never a silent random init
    with pytest.raises(ClbenchError, match="unknown timm architecture 'vit_tiny_patch16_22'.*vit_tiny_patch16_224"):
        timm_model(TimmConfig(arch="vit_tiny_patch16_22", pretrained=False), (3, 32, 32), 10)
    with pytest.raises(ClbenchError, match="normalize"):
        timm_model(_tiny_cfg(normalize="imagnet"), (1, 8, 8), 3)


@pytest.mark.skipif(not VIT_TINY.is_file(), reason="ViT-Tiny/8 weights not found under shared/data")
def test_offline_vit_tiny_matches_the_weights_readme_reference():
    """The README's reference code (timm VisionTransformer + strict load) gives the same features."""
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    reference = VisionTransformer(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=100)
    reference.load_state_dict({k: v.float() for k, v in load_file(str(VIT_TINY)).items()}, strict=True)
    model = timm_model(TimmConfig(arch="vit_tiny_patch8_64", checkpoint=str(VIT_TINY)), (3, 64, 64), 100)
    reference.eval(), model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(model.features(x), reference.forward_head(reference.forward_features(x), pre_logits=True))
    assert sum(p.numel() for p in model.backbone.parameters()) == 5_407_780 - (192 * 100 + 100)  # README count minus head


def test_engine_normalises_with_the_models_statistics(tmp_path):
    from clbench.config import load_config
    from clbench.engine import Engine

    overrides = [f"output_dir={tmp_path}", "name=vit", "logging.console=false", "logging.tensorboard=false",
                 "checkpoint.enabled=false", "train.iterations=2", "eval.every=0", "scenario.n_tasks=2",
                 "model=timm", "model.arch=vit_tiny_patch16_224", "model.pretrained=false", "model.normalize=inception",
                 *[f"model.kwargs.{k}={v}" for k, v in TINY_KWARGS.items()]]
    engine = Engine(load_config(None, overrides))
    assert engine.ctx.preprocess.mean.flatten().tolist() == [0.5]  # grayscale digits: one channel
    # inception statistics (mean 0.5, std 0.5): uint8 v -> v / 255 * 2 - 1, by hand
    x = torch.tensor([0, 51, 255, 102], dtype=torch.uint8).view(1, 1, 2, 2)
    torch.testing.assert_close(engine.ctx.inputs(x), torch.tensor([-1.0, -0.6, 1.0, -0.2]).view(1, 1, 2, 2))


def test_engine_resizes_inputs_to_a_fixed_size_vit(tmp_path):
    """8-px digits into a ViT built for 16 px: upsampled by the preprocessing, train and eval alike."""
    from clbench.config import load_config
    from clbench.engine import Engine

    kwargs = {**TINY_KWARGS, "img_size": 16}
    overrides = [f"output_dir={tmp_path}", "name=vit16", "logging.console=false", "logging.tensorboard=false",
                 "checkpoint.enabled=false", "train.iterations=2", "eval.every=0", "scenario.n_tasks=2",
                 "train.augment=crop_flip", "model=timm", "model.arch=vit_tiny_patch16_224", "model.pretrained=false",
                 *[f"model.kwargs.{k}={v}" for k, v in kwargs.items()]]
    engine = Engine(load_config(None, overrides))
    assert engine.model.input_size == (16, 16)
    x = engine.stream.train.x[:4]
    assert engine.ctx.inputs(x, train=True).shape == (4, 1, 16, 16)
    assert engine.ctx.inputs(x).shape == (4, 1, 16, 16)
    seen = []  # (training?, input size) of every forward of the run
    engine.model.register_forward_pre_hook(lambda m, args: seen.append((m.training, tuple(args[0].shape[-2:]))))
    assert engine.run()["status"] == "finished"
    assert {mode for mode, _ in seen} == {True, False} and {size for _, size in seen} == {(16, 16)}


def test_any_size_models_are_not_resized():
    kwargs = {**TINY_KWARGS, "img_size": 16, "dynamic_img_size": True}
    assert timm_model(TimmConfig(arch="vit_tiny_patch16_224", pretrained=False, kwargs=kwargs), (1, 8, 8), 3).input_size is None
    assert timm_model(_tiny_cfg(), (1, 8, 8), 3).input_size is None  # built for the data's 8 px


def test_timm_input_crop_centre_crops_evaluation_inputs_and_needs_a_size():
    """``model.input_crop`` on a timm model: the engine's evaluation preprocessing resizes to
    input_size / input_crop and keeps the centre (SLCA's Resize(256) + CenterCrop(224)); a model
    without a fixed input size must be given one."""
    from clbench import transforms as T
    from clbench.config import component_config, load_config
    from clbench.models import build_model
    from clbench.registry import ClbenchError

    cfg = load_config(None, ["model=timm", "model.arch=vit_tiny_patch16_224", "model.pretrained=false",
                             "model.input_crop=0.875"])
    model = build_model(component_config(cfg.model), (3, 32, 32), 10)
    assert model.input_size == (224, 224) and model.input_crop == 0.875
    pre = T.Preprocess((0.5,) * 3, (0.25,) * 3, "none", size=model.input_size, crop=model.input_crop)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    norm = (x.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(pre(x), T.resize_center_crop(norm, (224, 224), 0.875), rtol=0, atol=1e-5)
    cnn = load_config(None, ["model=timm", "model.arch=resnet18", "model.pretrained=false", "model.input_crop=0.9"])
    with pytest.raises(ClbenchError, match="model.input_size"):
        build_model(component_config(cnn.model), (3, 32, 32), 10)
