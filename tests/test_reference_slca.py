"""SLCA (strategies/slca.py, clbench/alignment.py) against the official learner's golden (tools/reference/slca.py):
``GengDavid/SLCA`` @ 169d4e6, ``models/slca.py::SLCA.incremental_train``/``after_task`` (slow-learner param groups,
MultiStepLR per epoch, ``_compute_class_mean``, ``_stage2_compact_classifier``, ``fc.backup``/``recall``) with
``SimpleContinualLinear`` heads and the released ``vit_base_patch16_224_in21k`` constructor (final LayerNorm
re-created) over the shared ViT-Tiny/8 in the official ``VisionTransformer`` class; 2 tasks x 2 classes, 4
images per class, 2 epochs of 2 steps (milestone 1), 5 alignment epochs of 4 mini-batches of 256 samples.

clbench runs the same case with its own code: the ``vit_tiny_patch8_64`` timm backbone, the strategy's
``setup`` (``reset_final_norm``), ``param_groups`` -> ``make_optimizer``, ``make_scheduler`` (``multistep``),
``forward``/``loss`` per step in the official batch order, ``after_experience`` (``class_gaussians``,
``align_classifier`` with a generator seeded as the official global RNG), ``before_experience`` (the
unaligned heads come back) and ``predict``.  The initial heads are the official ones (stored).

Parity mode (``reset_final_norm=true``, the released code) equals the golden; the default mode
(``reset_final_norm=false``, the pretrained norm kept) gives other features (checked to differ).
``configs/repro/slca_*.yaml`` are checked against ``exps/slca/*.json`` and ``models/slca.py``'s globals (as the
script recorded them), and the engine's ``multistep`` schedule against torch's ``MultiStepLR`` stepped per epoch.

Tolerances (largest differences seen in brackets; timm's attention kernel vs the official explicit
softmax attention, and float32 summation orders, are the only sources):
* features 1e-5 absolute (before training [3.3e-6], after stage 1 [2.9e-6]; stage 1 moved them by 6e-3);
  class means 1e-5 [1.3e-6], covariance diagonal 1e-5 [7.9e-7], cov @ v 2e-5 [3.8e-6], cov[:8, :8] 1e-5 [5.5e-7];
* stage-1 losses 2e-6 relative [2.2e-7]; the lr of both groups at every step 1e-12 relative [0]; heads after
  stage 1 1e-6 [1.5e-8; they moved by 0.02]; the re-created norm after each task 1e-7 [1.6e-12; the slow
  learner moved it by 2.2e-5];
* alignment: first sampled mini-batch rows 1e-4 [1.8e-5, values up to 5], losses 1e-5 relative [7.6e-7],
  aligned heads 5e-5 [6e-6; alignment moved them by 1-2], logits of the aligned heads 1e-3 [2.2e-4, values
  up to 98] and the predictions exactly; heads recalled after the task 1e-6 [1.5e-8].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clbench.config import load_config
from clbench.data.types import ImageSplit
from clbench.engine import make_optimizer, make_scheduler
from clbench.models.pretrained import TimmConfig, timm_model
from clbench.scenarios.base import Experience, Stream
from clbench.strategies import slca as slca_module
from clbench.strategies.slca import SLCA, SLCAConfig
from clbench.strategy import Batch, Context
from clbench.transforms import Preprocess
from conftest import DATA_ROOT
from reference_golden import load_golden

VIT_TINY = DATA_ROOT / "weights" / "vit-tiny-tinyimagenet100" / "vit_tiny_p8_64_tin100.safetensors"
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not VIT_TINY.exists(), reason=f"shared ViT-Tiny/8 weights not at {VIT_TINY}")]

G = load_golden("slca")
X = G.extra


def close(actual, expected, atol, rtol=0.0, msg=""):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=msg)


def build(reset_final_norm: bool):
    images, labels = G["images"], G["labels"]
    tasks = [torch.arange(t * X["task_size"], (t + 1) * X["task_size"]) for t in range(2)]
    exps = tuple(Experience(t, t, c, torch.nonzero(torch.isin(labels, c)).flatten(),
                            torch.nonzero(torch.isin(labels, c)).flatten()) for t, c in enumerate(tasks))
    split = ImageSplit(images, labels)
    stream = Stream("reference", "class", split, split, exps, 4, (0, 1, 2, 3), ("0", "1", "2", "3"),
                    tuple(X["mean"]), tuple(X["std"]))
    torch.manual_seed(0)
    model = timm_model(TimmConfig(arch="vit_tiny_patch8_64", checkpoint=str(VIT_TINY), normalize="imagenet"),
                       stream.image_shape, stream.num_classes)
    ctx = Context(stream=stream, device=torch.device("cpu"), seed=0, preprocess=Preprocess(*model.input_stats))
    strategy = SLCA(SLCAConfig(reset_final_norm=reset_final_norm, logit_norm=X["logit_norm"],
                               ca_epochs=X["ca_epochs"], backbone_lr_scale=X["bcb_lrscale"]))
    strategy.setup(model, ctx)
    with torch.no_grad():
        for t, head in enumerate(model.head.heads):  # the official initial heads
            head.weight.copy_(G[f"head_init_t{t}_w"])
            head.bias.copy_(G[f"head_init_t{t}_b"])
    return strategy, model, ctx


def train_cfg():
    return load_config(None, [f"train.lr={X['lr']}", "train.optimizer=sgd", "train.momentum=0.9",
                              f"train.weight_decay={X['weight_decay']}", "train.scheduler=multistep",
                              f"train.milestones={X['milestones']}", f"train.gamma={X['gamma']}"]).train


@pytest.fixture(scope="module")
def run():
    """clbench's SLCA over the golden's 2 tasks; records what the golden holds."""
    torch.set_num_threads(1)
    strategy, model, ctx = build(reset_final_norm=True)
    out: dict[str, torch.Tensor] = {}
    model.eval()
    with torch.no_grad():
        out["feats_init"] = model.features(ctx.inputs(G["images"]))
    mp = pytest.MonkeyPatch()
    ca_losses: list[float] = []
    logit_ce = slca_module.align_classifier.__globals__["logit_norm_cross_entropy"]
    first_ca: list[torch.Tensor] = []

    def recorded_ce(logits, targets, blocks, tau):
        loss = logit_ce(logits, targets, blocks, tau)
        ca_losses.append(loss.item())
        return loss

    sample = slca_module.align_classifier.__globals__["sample_features"]
    extract = slca_module.experience_features
    extracted: list[torch.Tensor] = []

    def recorded_extract(*a, **k):
        feats, labels = extract(*a, **k)
        extracted.append(feats.detach().clone())
        return feats, labels

    mp.setattr(slca_module, "experience_features", recorded_extract)
    mp.setitem(slca_module.align_classifier.__globals__, "logit_norm_cross_entropy", recorded_ce)
    mp.setattr(slca_module, "seeded_generator", lambda *ints: torch.Generator().manual_seed(X["ca_seed"]))
    randperm = torch.randperm

    def recorded_randperm(*a, **k):  # the first mini-batch after the shuffle, as the official forward saw it
        perm = randperm(*a, **k)
        first_ca.append(perm[:4])
        return perm

    cfg = train_cfg()
    steps_per_epoch = G["order_t0"].shape[0] // X["epochs"]
    try:
        for t, exp in enumerate(ctx.stream):
            ctx.experience = t
            ctx.class_mask = ctx.stream.class_mask(t)
            strategy.before_experience(exp, ctx)
            opt = make_optimizer(strategy.param_groups(), cfg)
            sched = make_scheduler(opt, cfg, G[f"order_t{t}"].shape[0], steps_per_epoch)
            losses, lrs = [], []
            model.train()
            for rows in G[f"order_t{t}"]:
                batch = Batch(G["images"][rows], G["labels"][rows], torch.full((len(rows),), t))
                full = strategy.prepare_batch(batch, ctx)
                output = strategy.forward(ctx.inputs(full.x, train=True), full, ctx)
                loss = strategy.loss(output, full, ctx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                strategy.before_optimizer_step(ctx)
                lrs.append([g["lr"] for g in sorted(opt.param_groups, key=lambda g: g["name"] != "backbone")])
                opt.step()
                sched.step()
                losses.append(loss.item())
            out[f"loss_stage1_t{t}"], out[f"lr_stage1_t{t}"] = torch.tensor(losses), torch.tensor(lrs, dtype=torch.float64)
            out[f"heads_stage1_t{t}"] = [(h.weight.detach().clone(), h.bias.detach().clone()) for h in model.head.heads]
            norm = model.backbone.model.norm
            out[f"norm_t{t}"] = (norm.weight.detach().clone(), norm.bias.detach().clone())
            if t == 1:
                mp.setattr(torch, "randperm", recorded_randperm)
            ca_losses.clear()
            strategy.after_experience(exp, ctx)
            mp.setattr(torch, "randperm", randperm)
            out[f"feats_stats_t{t}"] = extracted[-1]  # what the strategy's statistics were computed from
        out["loss_ca"] = torch.tensor(ca_losses)
        out["aligned"] = [(h.weight.clone(), h.bias.clone()) for h in strategy.aligned.heads]
        out["logits_aligned"] = strategy.predict(ctx.inputs(G["images"]))
        # the sampled rows of the first mini-batch: regenerate the first epoch's draws with the same generator
        g = torch.Generator().manual_seed(X["ca_seed"])
        seen = torch.arange(4)
        scales = slca_module.mean_shrink(strategy.class_task[seen], 1)
        x, _ = sample(strategy.means[seen], strategy.covs[seen], 256, g, scales)
        out["ca_first"] = x[first_ca[0]]
        strategy.before_experience(ctx.stream[1], ctx)  # a next task would start from the unaligned heads
        out["recalled"] = [(h.weight.detach().clone(), h.bias.detach().clone()) for h in model.head.heads]
        out["strategy"] = strategy
    finally:
        mp.undo()
    return out


def test_final_norm_is_recreated_as_in_the_released_in21k_constructor(run):
    norm_facts = X["in21k_norm"]  # the official vit_base_patch16_224_in21k on the real ViT-B/16 architecture
    assert norm_facts == {"type": "LayerNorm", "eps": 1e-5, "normalized_shape": [768], "weight_all_one": True,
                          "bias_all_zero": True, "block_norm_eps": 1e-6}
    _, kept, _ = build(reset_final_norm=False)
    pretrained = kept.backbone.model.norm
    strategy, model, ctx = build(reset_final_norm=True)
    norm = model.backbone.model.norm
    assert type(norm) is nn.LayerNorm and norm is not pretrained and norm.eps == 1e-5 and pretrained.eps == 1e-6
    assert torch.equal(norm.weight, torch.ones(192)) and torch.equal(norm.bias, torch.zeros(192))
    assert not torch.equal(pretrained.weight, torch.ones(192))  # the checkpoint's norm was a trained one
    groups = {g["name"]: g for g in strategy.param_groups()}  # the fresh norm trains with the backbone (slow lr)
    assert any(p is norm.weight for p in groups["backbone"]["params"])
    with torch.no_grad():
        old = kept.features(ctx.inputs(G["images"]))
    close(run["feats_init"], G["feats_init"], atol=1e-5, msg="parity mode: the official features")
    assert (old - G["feats_init"]).abs().max() > 0.1  # default mode: the pretrained norm, other features


def test_final_norm_reset_refuses_a_backbone_without_one():
    from clbench.registry import ClbenchError

    model = nn.Sequential()
    model.backbone = nn.Linear(3, 3)
    with pytest.raises(ClbenchError, match="reset_final_norm"):
        slca_module.reset_final_norm(model)


def test_stage1_matches_the_official_slow_learner(run):
    close(run["feats_init"], G["feats_init"], atol=1e-5)
    for t in range(2):
        close(run[f"loss_stage1_t{t}"], G[f"loss_stage1_t{t}"], atol=0, rtol=2e-6, msg=f"losses task {t}")
        # [backbone, head] lr per step: 0.01/100 and 0.01, x0.1 in epoch 1 (MultiStepLR stepped per epoch)
        close(run[f"lr_stage1_t{t}"], G[f"lr_stage1_t{t}"], atol=0, rtol=1e-12, msg=f"lrs task {t}")
        for k, (w, b) in enumerate(run[f"heads_stage1_t{t}"][:t + 1]):  # the official has t + 1 heads
            close(w, G[f"heads_stage1_t{t}_h{k}_w"], atol=1e-6, msg=f"head {k} after task {t}")
            close(b, G[f"heads_stage1_t{t}_h{k}_b"], atol=1e-6)
        close(run[f"norm_t{t}"][0], G[f"norm_w_t{t}"], atol=1e-7, msg="re-created norm, trained")
        close(run[f"norm_t{t}"][1], G[f"norm_b_t{t}"], atol=1e-7)
        close(run[f"feats_stats_t{t}"], G[f"feats_stats_t{t}"], atol=1e-5, msg=f"features for the statistics, task {t}")
    # the slow learner moved the backbone by more than the tolerances (so the backbone lr is tested)
    assert (G["norm_w_t1"] - 1).abs().max() > 1e-5 and (G["feats_stats_t0"] - G["feats_init"][:8]).abs().max() > 1e-3
    assert (G["heads_stage1_t1_h0_w"] == G["heads_stage1_t0_h0_w"]).all()  # old head frozen in stage 1


def test_class_statistics_match_compute_class_mean(run):
    s = run["strategy"]
    close(s.means, G["means"], atol=1e-5)
    close(torch.diagonal(s.covs, dim1=1, dim2=2), G["cov_diag"], atol=1e-5)
    close(s.covs @ G["proj"], G["cov_proj"], atol=2e-5)
    close(s.covs[:, :8, :8], G["cov_block"], atol=1e-5)


def test_classifier_alignment_matches_the_official_stage2(run):
    close(run["ca_first"], G["ca_first"], atol=1e-4, msg="the same Gaussian samples, shuffled the same way")
    assert run["loss_ca"].numel() == G["loss_ca"].numel() == X["ca_epochs"] * 4
    close(run["loss_ca"], G["loss_ca"], atol=0, rtol=1e-5, msg="alignment losses (logit norm, tau 0.1)")
    for k, (w, b) in enumerate(run["aligned"]):
        close(w, G[f"aligned_h{k}_w"], atol=5e-5, msg=f"aligned head {k}")
        close(b, G[f"aligned_h{k}_b"], atol=5e-5)
    close(run["logits_aligned"], G["logits_aligned"], atol=1e-3)
    assert torch.equal(run["logits_aligned"].argmax(1), G["logits_aligned"].argmax(1))
    for k, (w, b) in enumerate(run["recalled"]):  # fc.recall(): the unaligned heads come back
        close(w, G[f"recalled_h{k}_w"], atol=1e-6)
        close(b, G[f"recalled_h{k}_b"], atol=1e-6)
        assert not torch.allclose(G[f"recalled_h{k}_w"], G[f"aligned_h{k}_w"])


# ------------------------------------------------------------------ repro configs vs exps/slca/*.json
REPO = Path(__file__).resolve().parents[1]
RECIPES = {"slca_imagenet_r": "slca_imgnetr", "slca_cifar100": "slca_cifar"}


@pytest.mark.parametrize("config, recipe", sorted(RECIPES.items()))
def test_repro_configs_follow_the_released_recipe(config, recipe):
    """configs/repro/slca_*.yaml against the official json (recorded in the golden by the script) and the
    module globals of models/slca.py; the engine's multistep schedule against torch's MultiStepLR stepped
    once per epoch, as ``SLCA._run`` steps it, for both the backbone (slow) and the head group."""
    cfg = load_config(REPO / "configs" / "repro" / f"{config}.yaml", [])
    r, g = X["recipes"][recipe], X["recipes"]["_module_globals"]
    assert r["convnet_type"] == "vit-b-p16"  # vit_base_patch16_224_in21k: the final LayerNorm is re-created
    assert cfg.strategy.name == "slca" and cfg.strategy.reset_final_norm
    assert cfg.model.arch == "vit_base_patch16_224.augreg_in21k"
    assert (cfg.train.optimizer, cfg.train.scheduler, cfg.train.momentum) == ("sgd", "multistep", 0.9)
    assert cfg.train.epochs == r["epochs"] and cfg.train.milestones == r["milestones"]
    assert cfg.train.gamma == g["lrate_decay"] and cfg.train.lr == g["lrate"]
    assert cfg.train.weight_decay == g["weight_decay"] and cfg.train.batch_size == g["batch_size"]
    assert cfg.strategy.backbone_lr_scale == pytest.approx(X["bcb_lrscale"])  # the default 1/100
    assert cfg.strategy.ca_epochs == r["ca_epochs"] and cfg.strategy.logit_norm == r["ca_with_logit_norm"]
    assert cfg.strategy.ca_samples_per_class == 256  # num_sampled_pcls in _stage2_compact_classifier
    # utils/data.py iImageNetR / iCIFAR100_224: RandomResizedCrop(224) + flip; Resize(256) + CenterCrop(224)
    assert cfg.train.augment == "resized_crop_flip" and cfg.model.input_crop == pytest.approx(224 / 256)
    n = len(cfg.scenario.class_order)
    assert r["init_cls"] == r["increment"] and n // r["increment"] == cfg.scenario.n_tasks
    assert cfg.seed in r["seed"] and r["shuffle"]  # PyCIL DataManager: np.random.seed(seed); permutation(n)
    assert list(cfg.scenario.class_order) == np.random.RandomState(cfg.seed).permutation(n).tolist()

    per_epoch = 3
    mine = [nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = make_optimizer([{"params": [mine[0]], "lr_scale": cfg.strategy.backbone_lr_scale, "name": "backbone"},
                          {"params": [mine[1]], "name": "heads"}], cfg.train)
    sched = make_scheduler(opt, cfg.train, per_epoch * cfg.train.epochs, per_epoch)
    theirs = [nn.Parameter(torch.zeros(1)) for _ in range(2)]
    ref_opt = torch.optim.SGD([{"params": [theirs[0]], "lr": g["lrate"] * X["bcb_lrscale"]},
                               {"params": [theirs[1]], "lr": g["lrate"]}], lr=g["lrate"], momentum=0.9)
    ref = torch.optim.lr_scheduler.MultiStepLR(ref_opt, milestones=r["milestones"], gamma=g["lrate_decay"])
    got, want = [], []
    for _ in range(cfg.train.epochs):
        for _ in range(per_epoch):
            got += [group["lr"] for group in opt.param_groups]
            want += [group["lr"] for group in ref_opt.param_groups]
            opt.step()
            sched.step()
            ref_opt.step()
        ref.step()
    assert got == pytest.approx(want, rel=1e-12)
    assert want[-2:] == pytest.approx([g["lrate"] * X["bcb_lrscale"] * 0.1, g["lrate"] * 0.1])
