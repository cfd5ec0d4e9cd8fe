"""FeTrIL's released initial-model recipe (GregoirePetit/FeTrIL@e3b139c ``codes/scratch.py``) as clbench options:
``train.augment: resized_crop_flip`` (torchvision ``RandomResizedCrop`` + flip on the batch), ``model.input_crop``
(``Resize(256) + CenterCrop(224)`` at evaluation) against torchvision's own functions, and
``configs/repro/fetril_tiny_imagenet_official_initial.yaml`` against the released values.  The LUCIR ResNet-18
options (``model.last_relu``, ``model.classifier: lucir``) are checked against the official module in
``tests/test_reference_fetril.py``.  CPU, seconds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from clbench import transforms as T
from clbench.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "repro" / "fetril_tiny_imagenet_official_initial.yaml"


def test_crop_boxes_follow_torchvisions_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    boxes = T.crop_boxes(4000, 64, 64, torch.device("cpu"))
    top, left, h, w = boxes.unbind(1)
    assert bool(((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1) & (top + h <= 64) & (left + w <= 64)).all())
    assert torch.equal(boxes, boxes.round())  # whole pixels, as torchvision
    area, aspect = h * w / 64 ** 2, w / h
    assert area.min() >= 0.08 - 0.02 and area.max() <= 1.0  # scale (0.08, 1) up to the rounding of h and w
    assert aspect.min() >= 0.75 * 0.9 and aspect.max() <= 4 / 3 / 0.9  # ratio (3/4, 4/3) up to rounding
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.zeros(3, 64, 64), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(4000)], dtype=torch.float64)  # (i, j, h, w)
    ref_area = ref[:, 2] * ref[:, 3] / 64 ** 2
    assert abs(float(area.mean()) - float(ref_area.mean())) < 0.02  # the same distribution (means ~0.54)
    assert abs(float(aspect.log().std()) - float((ref[:, 3] / ref[:, 2]).log().std())) < 0.02
    assert abs(float(top.mean()) - float(ref[:, 0].mean())) < 1.0


def test_crop_resize_is_torchvisions_resized_crop_inside_the_box():
    import torchvision.transforms.functional as TF

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [5.0, 11.0, 40.0, 30.0], [20.0, 3.0, 17.0, 23.0]])
    out = T.crop_resize(x, boxes, (224, 224))
    assert out.shape == (3, 3, 224, 224)
    for k, (i, j, h, w) in enumerate(boxes.long().tolist()):
        ref = TF.resized_crop(x[k], i, j, h, w, [224, 224], antialias=False)  # bilinear
        # away from the box's border (where the crop clamps and clbench samples the neighbours) they agree
        m = 224 // min(h, w) + 1
        torch.testing.assert_close(out[k, :, m:-m, m:-m], ref[:, m:-m, m:-m], rtol=0, atol=1e-5)
        if (h, w) == (64, 64):  # the whole image: identical everywhere
            torch.testing.assert_close(out[k], ref, rtol=0, atol=1e-5)


def test_resize_center_crop_is_torchvisions_resize_256_center_crop_224():
    import torchvision.transforms.functional as TF

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref = TF.center_crop(TF.resize(x, [256, 256], antialias=False), [224, 224])
    torch.testing.assert_close(T.resize_center_crop(x, (224, 224), 0.875), ref, rtol=0, atol=1e-6)


def test_preprocess_trains_on_random_resized_crops_and_evaluates_on_the_centre():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pre = T.Preprocess(mean, std, "resized_crop_flip", size=(224, 224), crop=0.875)
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    a = pre(x, train=True)
    b = pre(x, train=True)
    assert a.shape == b.shape == (4, 3, 224, 224) and not torch.allclose(a, b)  # fresh crops every call
    norm = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(pre(x), T.resize_center_crop(norm, (224, 224), 0.875), rtol=0, atol=1e-5)
    plain = T.Preprocess(mean, std, "none", size=(224, 224))  # input_crop 1: the whole image resized, as before
    torch.testing.assert_close(plain(x), torch.nn.functional.interpolate(norm, size=(224, 224), mode="bilinear",
                                                                         align_corners=False), rtol=0, atol=1e-5)


def test_official_initial_config_is_the_released_recipe(monkeypatch):
    from conftest import DATA_ROOT
    from clbench.models.resnet import ResNet18Config, resnet18

    monkeypatch.setenv("CLBENCH_DATA_ROOT", str(DATA_ROOT))
    cfg = load_config(str(CONFIG), [])
    t, m = cfg.train, cfg.model
    # codes/scratch.py: base_lr 0.1, custom_momentum 0.9, custom_weight_decay 1e-4, train_batch_size 128,
    # epochs_lucir 90 (configs/*.cf), MultiStepLR(lr_strat [30, 60], lr_factor 0.1)
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs) == ("sgd", 0.1, 0.9, 1e-4, 128, 90)
    assert (t.scheduler, list(t.milestones), t.gamma, t.warmup_iters, t.amp) == ("multistep", [30, 60], 0.1, 0, "none")
    assert t.augment == "resized_crop_flip"
    assert (m.name, m.nf, m.stem, m.last_relu, m.classifier, m.input_size, m.input_crop) == (
        "resnet18", 64, "imagenet", False, "lucir", 224, 0.875)
    assert cfg.strategy.name == "fetril" and cfg.scenario.initial_classes == 100 and cfg.scenario.n_tasks == 6
    model = resnet18(ResNet18Config(**{k: getattr(m, k) for k in ("nf", "stem", "last_relu", "classifier",
                                                                   "input_size", "input_crop")}), (3, 64, 64), 200)
    assert model.input_size == (224, 224) and model.input_crop == 0.875
    assert hasattr(model.head, "sigma") and model.head.bias is None  # LUCIR's cosine head


def test_multistep_schedule_steps_at_epochs_30_and_60():
    from clbench.engine import make_scheduler

    cfg = load_config(str(CONFIG), []).train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    per_epoch = 3
    sched = make_scheduler(opt, cfg, n_iter=90 * per_epoch, per_epoch=per_epoch)
    lrs = []
    for _ in range(90 * per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    by_epoch = [lrs[e * per_epoch] for e in range(90)]
    for e, lr in enumerate(by_epoch):  # torch MultiStepLR stepped once per epoch, as scratch.py
        assert math.isclose(lr, 0.1 * 0.1 ** ((e >= 30) + (e >= 60)), rel_tol=1e-12), (e, lr)


def test_fetril_fc_refuses_the_lucir_head():
    """FeTrIL^fc warm-starts its layer from the model's linear head; with LUCIR's cosine head it says so."""
    from types import SimpleNamespace

    from clbench.models.resnet import ResNet18Config, resnet18
    from clbench.registry import ClbenchError
    from clbench.strategies.fetril import FeTrIL, FeTrILConfig

    model = resnet18(ResNet18Config(nf=4, stem="imagenet", classifier="lucir", last_relu=False), (3, 32, 32), 4)
    ctx = SimpleNamespace(stream=SimpleNamespace(num_classes=4, protocol="class"), device=torch.device("cpu"))
    with pytest.raises(ClbenchError, match="model.classifier=linear"):
        FeTrIL(FeTrILConfig(classifier="fc")).setup(model, ctx)
    FeTrIL(FeTrILConfig(classifier="fc", fc_normalize=True)).setup(model, ctx)  # fits its own layer: fine
    FeTrIL(FeTrILConfig(classifier="svm")).setup(model, ctx)
