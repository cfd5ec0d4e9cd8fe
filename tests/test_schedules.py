"""Learning-rate schedules (``train.scheduler``): per-iteration cosine, the CODA-Prompt code's
epoch-wise cosine and per-epoch MultiStepLR, checked against their definitions and torch's own
MultiStepLR, and end to end through a run's logged ``train/lr``."""

from __future__ import annotations

import math

import pytest
import torch

from clbench.config import load_config
from clbench.engine import run
from conftest import lr_per_iteration
from clbench.logging import read_metrics
from clbench.registry import ClbenchError


def lrs(scheduler_cfg: dict, n_iter: int, per_epoch: int | None, base: float = 0.1) -> list[float]:
    """The lr used at each of the ``n_iter`` iterations, the schedule read from a loaded config."""
    cfg = load_config(None, [f"train.{k}={v}" for k, v in scheduler_cfg.items()]).train
    return lr_per_iteration(cfg, n_iter, per_epoch, lr=base)


def test_multistep_equals_torch_multisteplr_stepped_per_epoch():
    per_epoch, epochs = 3, 7
    got = lrs({"scheduler": "multistep", "milestones": "[2,5]", "gamma": 0.5}, per_epoch * epochs, per_epoch)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 5], gamma=0.5)
    expected = []
    for _ in range(epochs):
        expected += [opt.param_groups[0]["lr"]] * per_epoch
        opt.step()
        ref.step()
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[0] == 0.1 and got[-1] == pytest.approx(0.025)


def test_coda_cosine_is_epochwise_and_ends_near_not_at_zero():
    per_epoch, epochs = 4, 5
    got = lrs({"scheduler": "coda_cosine"}, per_epoch * epochs, per_epoch)
    for e in range(epochs):
        # the released CosineSchedule lags one epoch (epochs 0 and 1 at the base lr; golden in test_reference_prompts)
        want = 0.1 * math.cos(99 * math.pi * max(e - 1, 0) / (200 * (epochs - 1)))
        assert got[e * per_epoch:(e + 1) * per_epoch] == pytest.approx([want] * per_epoch, rel=1e-12)
    assert got[-1] == pytest.approx(0.1 * math.cos(99 * math.pi * 3 / 800)) and got[-1] > 0
    # one epoch: constant (the CODA code's K == 1 case)
    assert lrs({"scheduler": "coda_cosine"}, 6, 6) == pytest.approx([0.1] * 6)
    # iterations that stop inside an epoch: the epoch count is rounded up
    partial = lrs({"scheduler": "coda_cosine"}, 9, 4)
    assert partial[8] == pytest.approx(0.1 * math.cos(99 * math.pi * 1 / (200 * 2)))


def test_per_iteration_cosine_unchanged_and_warmup_multiplies():
    got = lrs({"scheduler": "cosine"}, 10, 5)
    assert got == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(10)])
    warm = lrs({"scheduler": "multistep", "milestones": "[1]", "warmup_iters": 2}, 6, 3)
    assert warm == pytest.approx([0.05, 0.1, 0.1, 0.01, 0.01, 0.01])


@pytest.mark.parametrize("milestones", ["[]", "[5,3]", "[2,2]"])
def test_multistep_without_increasing_milestones_is_refused(milestones):
    with pytest.raises(ClbenchError, match="train.milestones"):
        lrs({"scheduler": "multistep", "milestones": milestones}, 4, 2)


def test_bad_schedule_values_are_refused_at_load():
    with pytest.raises(ClbenchError, match="train.scheduler"):
        load_config(None, ["train.scheduler=step"])
    with pytest.raises(ClbenchError, match="train.milestones"):
        load_config(None, ["train.milestones=[0]"])
    with pytest.raises(ClbenchError, match="train.gamma"):
        load_config(None, ["train.gamma=0"])


def test_run_logs_the_multistep_lr_per_epoch(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=ms", "logging.console=false", "logging.tensorboard=false",
                             "train.epochs=3", "train.batch_size=512", "train.lr=0.2",
                             "train.scheduler=multistep", "train.milestones=[1,2]", "train.gamma=0.5",
                             "logging.log_every=1", "eval.every=0", "strategy=finetune"])
    run(cfg)
    rows = [r for r in read_metrics(tmp_path / "ms") if r["kind"] == "train"]
    first = [r for r in rows if r["step"] <= len(rows) // 5]  # the first experience's iterations
    per_epoch = len(first) // 3
    assert per_epoch >= 1
    assert [round(r["train/lr"], 6) for r in first] == [0.2] * per_epoch + [0.1] * per_epoch + [0.05] * per_epoch
