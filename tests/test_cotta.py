"""Continual test-time adaptation: the CIFAR ResNet (option A) and its real weights, the
CIFAR-10-C corruptions, the corruption stream, and the mechanisms of source / bn_adapt / tent /
cotta (restore rate, EMA formula, which parameters move, batch statistics), plus a tiny
end-to-end run of each through the engine."""

from __future__ import annotations

import copy
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clbench.config import component_config, load_config
from clbench.data.types import ImageDataset, ImageSplit
from clbench.models import build_model
from clbench.models.cifar_resnet import CifarResNetConfig, cifar_resnet
from clbench.registry import ClbenchError
from clbench.strategy import Batch, Context
from clbench.transforms import Preprocess
from clbench.scenarios import corruptions as C
from clbench.strategies.bn_adapt import BNAdapt, BNAdaptConfig
from clbench.strategies.cotta import CoTTA, CoTTAConfig, ema_update, stochastic_restore
from clbench.strategies.tent import Tent, TentConfig

from conftest import DATA_ROOT as SHARED  # noqa: E402  (the one data root, tests/conftest.py)
WEIGHTS = SHARED / "weights" / "cifar10-resnet"
CIFAR_TAR = SHARED / "cifar10-jpeg" / "CIFAR-10-images-jpg.tar.gz"
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def _tiny_model(width: int = 4, depth: int = 20) -> nn.Module:
    return cifar_resnet(CifarResNetConfig(depth=depth, width=width), (3, 32, 32), 10)


def _ctx(seed: int = 0) -> Context:
    return Context(stream=None, device=torch.device("cpu"), seed=seed,  # type: ignore[arg-type]
                   preprocess=Preprocess((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images (low-frequency patterns plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    x = x + 0.05 * torch.rand(n, 3, 32, 32, generator=g)
    return (x.clamp(0, 1) * 255).to(torch.uint8)


# --------------------------------------------------------------------------- the model
def test_cifar_resnet_sizes_and_option_a_shortcut():
    expected = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6}  # He et al. 2016, Table 6
    for depth, params in expected.items():
        model = cifar_resnet(CifarResNetConfig(depth=depth), (3, 32, 32), 10)
        n = sum(p.numel() for p in model.parameters())
        assert abs(n - params) / params < 0.02, (depth, n)
    model = _tiny_model().eval()
    assert model(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    block = model.backbone.layer2[0]  # 4 -> 8 channels, stride 2: subsample, zero-pad 2 channels each side
    x = torch.randn(2, 4, 8, 8)
    short = block.shortcut(x)
    assert short.shape == (2, 8, 4, 4)
    assert torch.equal(short[:, 2:6], x[:, :, ::2, ::2]) and not short[:, :2].any() and not short[:, 6:].any()
    assert not [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]  # no projections
    with pytest.raises(ClbenchError, match="depth"):
        cifar_resnet(CifarResNetConfig(depth=21), (3, 32, 32), 10)


def test_cifar_resnet_checkpoint_errors(tmp_path):
    with pytest.raises(ClbenchError, match="not found"):
        cifar_resnet(CifarResNetConfig(checkpoint=str(tmp_path / "missing.th")), (3, 32, 32), 10)
    other = cifar_resnet(CifarResNetConfig(depth=32), (3, 32, 32), 10)
    state = {f"module.{k.removeprefix('backbone.').replace('head.', 'linear.')}": v for k, v in other.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state, "best_prec1": 0.0}, tmp_path / "r32.th")
    with pytest.raises(ClbenchError, match="depth 32"):
        cifar_resnet(CifarResNetConfig(depth=20, checkpoint=str(tmp_path / "r32.th")), (3, 32, 32), 10)
    loaded = cifar_resnet(CifarResNetConfig(depth=32, checkpoint=str(tmp_path / "r32.th")), (3, 32, 32), 10)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.eval()(x), other.eval()(x))


def _cifar_test_images(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` test JPEGs of each class, streamed from the archive (the test
    folder comes first in it, so this stops after ~1/6 of the file)."""
    from PIL import Image

    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    found: dict[str, list[np.ndarray]] = {n: [] for n in names}
    with tarfile.open(CIFAR_TAR, "r|*") as archive:
        for member in archive:
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1] == "test" and member.isfile() and len(found[parts[2]]) < per_class:
                found[parts[2]].append(np.asarray(Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB")))
            elif len(parts) > 1 and parts[1] == "train":
                break
    x = torch.from_numpy(np.stack([a for n in names for a in found[n]])).permute(0, 3, 1, 2).contiguous()
    y = torch.arange(10).repeat_interleave(per_class)
    return x, y


@pytest.mark.skipif(not (WEIGHTS.is_dir() and CIFAR_TAR.is_file()), reason="CIFAR-10 ResNet weights or JPEGs absent")
def test_real_resnet20_weights_classify_cifar10():
    path = next(WEIGHTS.glob("resnet20-*.th"))
    model = cifar_resnet(CifarResNetConfig(depth=20, checkpoint=str(path)), (3, 32, 32), 10).eval()
    x, y = _cifar_test_images(per_class=10)
    pre = Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # the weights' (ImageNet) normalisation
    with torch.inference_mode():
        acc = (model(pre(x)).argmax(1) == y).float().mean().item()
    assert acc > 0.6, acc  # ~0.8 on the JPEG copy; chance is 0.1


# --------------------------------------------------------------------------- corruptions
def test_frost_blends_crops_of_the_shipped_frost_photographs():
    """imagecorruptions is a dependency, so frost always runs: every output image is
    ``uint8(0.75 * x + 0.45 * crop)`` (severity 5 of Hendrycks & Dietterich's make_cifar_c.py:
    c = [(1, .2), (1, .3), (.9, .4), (.85, .4), (.75, .45)]) for some 32x32 crop of one of the five
    photographs in the installed package's frost/ folder, downscaled as the original's
    ``cv2.resize(fx=0.2, fy=0.2)`` (bilinear, half-pixel centres: torch's interpolate here),
    found here by brute force."""
    import importlib.util

    from PIL import Image
    from torch.nn import functional as F

    package_dir = Path(importlib.util.find_spec("imagecorruptions").origin).parent / "frost"
    assert package_dir in C.frost_dirs()
    files = sorted(package_dir.glob("frost[1-5].*"))
    assert len(files) == 5
    photos = []
    for f in files:
        with Image.open(f) as im:
            rgb = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)[None].double()
        small = F.interpolate(rgb, scale_factor=0.2, mode="bilinear", align_corners=False, recompute_scale_factor=False)
        photos.append(small[0].permute(1, 2, 0).numpy())
    x = torch.full((6, 3, 32, 32), 100, dtype=torch.uint8)
    out = C.corrupt(x, "frost", 5, seed=3).permute(0, 2, 3, 1).numpy().astype(np.float64)
    assert len({o.tobytes() for o in out}) == 6  # different crops per image
    for img in out:
        crop = (img - 0.75 * 100) / 0.45  # truncation: the photo's pixels lie in [crop, crop + 1/0.45)
        matches = 0
        for photo in photos:
            h, w = photo.shape[0] - 31, photo.shape[1] - 31
            corner = photo[:h, :w] - crop[0, 0]  # candidates from the top-left pixel, then full check
            for top, left in zip(*np.nonzero(((corner >= -1e-9) & (corner < 1 / 0.45)).all(-1))):
                d = photo[top:top + 32, left:left + 32] - crop
                matches += bool(((d >= -1e-9) & (d < 1 / 0.45)).all())
        assert matches >= 1


def test_corruptions_shape_dtype_determinism():
    x = _images(3)
    for name in C.CORRUPTIONS:  # frost included: its photographs ship inside imagecorruptions (a dependency)
        out = C.corrupt(x, name, 5, seed=1)
        assert out.dtype == torch.uint8 and out.shape == x.shape, name
        assert torch.equal(out, C.corrupt(x, name, 5, seed=1)), name
        assert not torch.equal(out, x), name
    noisy = [C.corrupt(x, n, 5, seed=s) for n in ("gaussian_noise", "fog") for s in (1, 2)]
    assert not torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[2], noisy[3])
    with pytest.raises(ClbenchError, match="unknown corruption"):
        C.corrupt(x, "rain", 5)
    with pytest.raises(ClbenchError, match="32"):
        C.corrupt(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "contrast", 5)


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "defocus_blur", "contrast", "fog", "pixelate"])
def test_corruption_strength_grows_with_severity(name):
    x = _images(16, seed=3)
    diffs = [(C.corrupt(x, name, s, seed=0).float() - x.float()).abs().mean().item() for s in range(1, 6)]
    assert all(a < b for a, b in zip(diffs, diffs[1:])), diffs


def test_glass_blur_is_the_reference_loop():
    """One pass of make_cifar_c's loop (whose numpy-view "swap" copies the neighbour into
    (h, w)) equals our gather, given the same offsets."""
    x = _images(1, seed=5)[0].permute(1, 2, 0).numpy()
    rng = np.random.default_rng(0)
    dy, dx = rng.integers(-1, 1, size=(2, 30, 30))
    ref = x.copy()
    for h in range(31, 1, -1):
        for w in range(31, 1, -1):
            hp, wp = h + dy[h - 2, w - 2], w + dx[h - 2, w - 2]
            ref[h, w], ref[hp, wp] = ref[hp, wp], ref[h, w]  # views: a copy, as in the original

    class Fixed:
        def __init__(self):
            self.values = [dy[None], dx[None]]

        def integers(self, low, high, size):
            return self.values.pop(0).reshape(size)

    saved = C._GLASS
    C._GLASS = ((0.0001, 1, 1),) * 5  # no blur: isolate the pixel shuffle
    try:
        ours = C._to_uint8(C.glass_blur(x[None], 1, Fixed()))[0]
    finally:
        C._GLASS = saved
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


# --------------------------------------------------------------------------- the stream
def _fake_cifar(monkeypatch, n_test: int = 40):
    import clbench.scenarios.tta as tta

    x, y = _images(n_test, seed=11), torch.arange(10).repeat_interleave(n_test // 10)  # class-sorted, like the JPEG copy
    empty = ImageSplit(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    data = ImageDataset("fake10", empty, ImageSplit(x, y), tuple(f"c{i}" for i in range(10)), (0.5,) * 3, (0.25,) * 3)
    monkeypatch.setattr(tta, "load_dataset", lambda *args, **kw: data)
    return data


def test_corruption_stream_layout_and_cache(monkeypatch, tmp_path):
    from clbench.scenarios.tta import CorruptionStreamConfig, corruption_stream

    data = _fake_cifar(monkeypatch)
    cfg = CorruptionStreamConfig(corruptions=["contrast", "gaussian_noise"], severity=3, n_examples=20)
    stream = corruption_stream(cfg, seed=0, cache_dir=str(tmp_path))
    assert stream.protocol == "tta" and len(stream) == 2 and len(stream.train) == 0
    assert stream.info["domains"] == {0: "contrast", 1: "gaussian_noise"}
    assert stream.mean == (0.485, 0.456, 0.406)
    for k, exp in enumerate(stream):
        assert sorted(exp.test_idx.tolist()) == list(range(20 * k, 20 * (k + 1)))
        assert not torch.equal(exp.test_idx, torch.arange(20 * k, 20 * (k + 1)))  # shuffled
    # the same clean images (and labels) in every domain; contrast is deterministic per image
    assert torch.equal(stream.test.y[:20], stream.test.y[20:])
    contrasted = C.corrupt(data.test.x, "contrast", 3).flatten(1)
    match = (stream.test.x[:20].flatten(1)[:, None] == contrasted[None]).all(2)
    assert torch.equal(data.test.y[match.float().argmax(1)], stream.test.y[:20]) and bool(match.any(1).all())
    assert len(list(tmp_path.glob("fake10-c-*.pt"))) == 2
    again = corruption_stream(cfg, seed=1, cache_dir=str(tmp_path))  # cached images, a new order
    assert torch.equal(again.test.x, stream.test.x)
    assert not torch.equal(again[0].test_idx, stream[0].test_idx)
    with pytest.raises(ClbenchError, match="unknown corruption"):
        corruption_stream(CorruptionStreamConfig(corruptions=["rain"]), seed=0, cache_dir=str(tmp_path))


# --------------------------------------------------------------------------- mechanisms
def test_stochastic_restore_rate_and_values():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(400, 250, generator=g), torch.randn(1000, generator=g)]
    source = [torch.randn_like(p) for p in params]
    before = [p.clone() for p in params]
    restored = stochastic_restore(params, source, 0.01, torch.Generator().manual_seed(1))
    n = sum(p.numel() for p in params)
    assert abs(restored / n - 0.01) < 0.0012  # binomial sd 0.0002
    for p, s, b in zip(params, source, before):
        back = p == s
        assert torch.equal(p[~back], b[~back])
    assert sum(int((p == s).sum()) for p, s in zip(params, source)) == restored


def test_ema_update_matches_hand_computation():
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    s0 = [p.detach().clone() for p in student.parameters()]
    ema_update(teacher, student, 0.9)
    for t, a, b in zip(teacher.parameters(), t0, s0):
        assert torch.allclose(t, 0.9 * a + 0.1 * b, atol=1e-7)
    assert all(torch.equal(p, b) for p, b in zip(student.parameters(), s0))  # the student is untouched


def _step(strategy, model, x_uint8, ctx, optimizer=None):
    batch = Batch(x_uint8, torch.full((len(x_uint8),), -1), torch.zeros(len(x_uint8), dtype=torch.long))
    scores = strategy.forward(ctx.inputs(x_uint8), batch, ctx)
    loss = strategy.loss(scores, batch, ctx)
    if loss is not None:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    strategy.after_step(batch, ctx)
    return scores


def test_cotta_step_teacher_is_ema_and_restore_happens():
    torch.manual_seed(0)
    model, ctx = _tiny_model(), _ctx()
    # threshold 0: the anchor is always confident enough, so the prediction is the teacher's
    # plain forward (no augmentation average), and the teacher still holds the source weights
    strategy = CoTTA(CoTTAConfig(n_augmentations=2, restore_p=0.0, ema=0.9, threshold=0.0))
    strategy.setup(model, ctx)
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.running_mean is None for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    optimizer = torch.optim.Adam(strategy.param_groups()[0]["params"], lr=1e-2)
    t0 = [p.detach().clone() for p in strategy.teacher.parameters()]
    x = _images(8)
    with torch.no_grad():
        source_logits = copy.deepcopy(model).train()(ctx.inputs(x))  # test-batch BN statistics
    scores = _step(strategy, model, x, ctx, optimizer)
    torch.testing.assert_close(scores, source_logits)
    moved = [not torch.equal(a, b) for a, b in zip(t0, strategy.source)]
    assert not any(moved)  # teacher started at the source weights
    for t, a, s in zip(strategy.teacher.parameters(), t0, model.parameters()):
        assert torch.allclose(t, 0.9 * a + 0.1 * s.detach(), atol=1e-6)
    assert any(not torch.equal(p, s) for p, s in zip(model.parameters(), strategy.source))  # the student trained
    # full restore (p = 1) brings every student weight back to the source
    strategy.cfg.restore_p = 1.0
    _step(strategy, model, _images(8, seed=1), ctx, optimizer)
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), strategy.source))


def test_cotta_gate_uses_augmentations_only_below_threshold():
    torch.manual_seed(0)
    ctx = _ctx()
    x = _images(8)
    calls = {}
    for threshold in (0.0, 1.01):  # confidence is never < 0 (teacher only) and always < 1.01 (augmented)
        strategy = CoTTA(CoTTAConfig(n_augmentations=3, threshold=threshold))
        strategy.setup(_tiny_model(), ctx)
        n = 0
        original = strategy.augment.__call__

        def counting(img, original=original):
            nonlocal n
            n += 1
            return original(img)

        strategy.augment = counting  # type: ignore[assignment]
        strategy.pseudo_label(ctx.inputs(x), x)
        calls[threshold] = n
    assert calls == {0.0: 0, 1.01: 3}


def test_tent_updates_only_bn_affine_parameters():
    torch.manual_seed(0)
    model, ctx = _tiny_model(), _ctx()
    strategy = Tent(TentConfig())
    strategy.setup(model, ctx)
    bn_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in strategy.param_groups()[0]["params"]} == bn_params
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(strategy.param_groups()[0]["params"], lr=1e-3)
    _step(strategy, model, _images(16), ctx, optimizer)
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (id(p) in bn_params), name


def test_bn_adapt_uses_batch_statistics_only():
    torch.manual_seed(0)
    model, ctx = _tiny_model(), _ctx()
    reference = _tiny_model()
    reference.load_state_dict(model.state_dict())
    for m in model.modules():  # garbage running statistics must not matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(5.0)
            m.running_var.fill_(100.0)
    strategy = BNAdapt(BNAdaptConfig())
    strategy.setup(model, ctx)
    assert strategy.param_groups() == []
    x = _images(16)
    scores = _step(strategy, model, x, ctx)
    with torch.no_grad():
        expected = reference.train()(ctx.inputs(x))  # train-mode BN: batch statistics
    assert torch.allclose(scores, expected, atol=1e-5)
    model.eval()
    assert torch.allclose(strategy.forward(ctx.inputs(x), None, ctx), expected, atol=1e-5)  # mode-independent
    alone = strategy.forward(ctx.inputs(x[:4]), None, ctx)
    assert not torch.allclose(alone, expected[:4], atol=1e-4)  # depends on the batch it is normalised with


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("strategy", ["source", "bn_adapt", "tent", "cotta"])
def test_tiny_tta_run_through_the_engine(strategy, monkeypatch, tmp_path):
    from clbench.engine import run

    _fake_cifar(monkeypatch, n_test=40)
    overrides = [f"strategy={strategy}", "scenario.corruptions=[gaussian_noise,contrast]", "scenario.n_examples=32",
                 "model.depth=20", "model.width=4", "model.checkpoint=null", "train.batch_size=16",
                 f"output_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}", "device=cpu",
                 "logging.console=false", "logging.progress=false", "logging.tensorboard=false"]
    if strategy == "cotta":
        overrides.append("strategy.n_augmentations=2")
    cfg = load_config(REPO / "configs" / "cotta_cifar10c.yaml", overrides)
    summary = run(cfg)
    assert summary["status"] == "finished" and summary["iterations"] == 4
    assert summary["domains"] == ["gaussian_noise", "contrast"]
    errors = summary["online_error"]
    assert len(errors) == 2 and summary["mean_error"] == pytest.approx(sum(errors) / 2)
    assert all(e * 32 == pytest.approx(round(e * 32)) for e in errors)  # wrong predictions out of the 32 per domain


def test_tiny_model_builds_from_config():
    cfg = load_config(None, ["model=cifar_resnet", "model.width=4"])
    model = build_model(component_config(cfg.model), (3, 32, 32), 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_augmentation_ops_match_torchvision():
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    from clbench.strategies import cotta

    torch.manual_seed(0)
    img = torch.rand(3, 3, 32, 32)
    img[0, :, :4, :4] = 0.5  # grey pixels (hue undefined)
    n = len(img)
    for tv, ours, value in [(TF.adjust_brightness, cotta.adjust_brightness, 1.3), (TF.adjust_contrast, cotta.adjust_contrast, 0.7),
                            (TF.adjust_saturation, cotta.adjust_saturation, 1.5), (TF.adjust_hue, cotta.adjust_hue, -0.06),
                            (TF.adjust_gamma, cotta.adjust_gamma, 1.3)]:
        assert torch.allclose(tv(img, value), ours(img, torch.full((n,), value)), atol=1e-5), tv.__name__
    big = TF.pad(img, 16, padding_mode="edge")
    assert torch.equal(big, nn.functional.pad(img, (16,) * 4, mode="replicate"))
    ref = TF.affine(big, 12.0, [3, -4], 1.07, [0.0, 0.0], interpolation=InterpolationMode.BILINEAR)
    ours = cotta.affine(big, torch.full((n,), 12.0), torch.full((n,), 3.0), torch.full((n,), -4.0), torch.full((n,), 1.07))
    assert torch.allclose(ref, ours, atol=1e-4)
    assert torch.allclose(TF.gaussian_blur(big, [5, 5], [0.4, 0.4]), cotta.gaussian_blur(big, torch.full((n,), 0.4)), atol=1e-6)
    augment = cotta.TTAAugment(torch.zeros(3), torch.ones(3), per_sample=True)
    out = augment(img)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
