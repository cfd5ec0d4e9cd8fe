"""MVP (Moon et al., ICCV 2023) on a tiny random ViT (CPU, seeded): usage-scaled selection, the
instance-wise logit mask, the contrastive key loss, the closed-form gradient similarity against
autograd, per-sample vs batch-mean focal weighting, adaptive feature scaling, which parameters
train, per-block prompt tokens, and a short online Si-Blurry run on the built-in digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from clbench.config import load_config
from clbench.engine import Engine
from clbench.prompts import prompted_forward
from clbench.strategy import Batch
from clbench.strategies.mvp import (MVPOutput, afs_factor, contrastive_key_loss, focal_weights, gradient_similarity_ignore,
                            usage_scaled_selection)

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = ("model={name: timm, arch: vit_tiny_patch16_224, pretrained: false, normalize: dataset, "
            "kwargs: {img_size: 8, patch_size: 4, embed_dim: 32, depth: 5, num_heads: 2, in_chans: 1}}")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def engine(tmp_path, *overrides: str, iterations: int = 3) -> Engine:
    cfg = load_config(None, [
        f"output_dir={tmp_path}", "name=mvp", "logging.console=false", "logging.tensorboard=false",
        f"train.iterations={iterations}", "train.batch_size=16", "train.optimizer=adam", "train.lr=0.01",
        "eval.every=0", "eval.baseline=false", "eval.subset_size=50", "eval.batch_size=64",
        "scenario.n_tasks=2", "checkpoint.enabled=false", TINY_VIT, "strategy=mvp", "strategy.e_pool_size=4",
        *overrides])
    return Engine(cfg)


def setup_batch(eng: Engine, n: int = 8) -> tuple[torch.Tensor, Batch]:
    s, ctx = eng.strategy, eng.ctx
    ctx.experience, ctx.n_iterations, ctx.experience_iteration = 0, 10, 0
    ctx.class_mask = eng.stream.class_mask(0)
    s.before_experience(eng.stream[0], ctx)
    batch = next(ctx.batches([eng.stream[0]], n))
    return ctx.inputs(batch.x), batch


def _grad(p) -> float:
    return 0.0 if p.grad is None else float(p.grad.abs().sum())


# ------------------------------------------------------------------------------- selection, mask
def test_usage_scaled_selection_picks_the_less_used_key_on_ties(tmp_path):
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # keys 0 and 1 tie for every query
    q = torch.tensor([[2.0, 0.1], [1.0, -0.2]])
    assert usage_scaled_selection(q, keys, None).tolist() == [0, 0]
    assert usage_scaled_selection(q, keys, torch.tensor([3.0, 0.0, 0.0])).tolist() == [1, 1]
    assert usage_scaled_selection(q, keys, torch.tensor([0.0, 2.0, 0.0])).tolist() == [0, 0]
    # scaled distance: d * (count + 1); a far key wins when the near one is used often enough
    far = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # d(q, k0) ~ 0, d(q, k1) = 0.4 for q = e_0
    e0 = torch.tensor([[1.0, 0.0]])
    assert usage_scaled_selection(e0 + torch.tensor([[0.0, 0.05]]), far, torch.tensor([1000.0, 0.0])).item() == 1
    eng = engine(tmp_path)
    s = eng.strategy
    with torch.no_grad():
        s.prompt.e.keys[0][0, :2] = s.prompt.e.keys[0][0, 0].clone()  # keys 0 and 1 identical
        s.prompt.count.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    q = s.prompt.e.keys[0][0, 0].detach()[None].repeat(3, 1)
    assert s.select(q).tolist() == [1, 1, 1]
    s.cfg.use_contrastive = False  # the code's mass = 1: nearest key, counts ignored
    assert s.select(q).tolist() == [0, 0, 0]


def test_instance_mask_multiplies_logits_by_two_sigmoid_of_the_selected_prompt(tmp_path):
    eng = engine(tmp_path)
    s = eng.strategy
    x, batch = setup_batch(eng)
    with torch.no_grad():
        s.prompt.mask.normal_(0, 2, generator=torch.Generator().manual_seed(3))
    idx = s.select(s.query(x))
    pred = s.predict(x)
    assert s.prompt.count.sum() == 0  # inference does not count
    out = s.forward(x, batch, eng.ctx)
    expected = eng.model.head(out.features) * 2 * torch.sigmoid(s.prompt.mask[idx])
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(out.scale, 2 * torch.sigmoid(s.prompt.mask[idx]))
    torch.testing.assert_close(pred, expected.detach())  # same selection (counts were 0), no AFS at inference
    torch.testing.assert_close(s.prompt.count, torch.bincount(idx, minlength=4).float())  # training counts
    assert not torch.allclose(out.logits, eng.model.head(out.features))
    s.cfg.use_mask = False
    plain = s.forward(x, batch, eng.ctx)
    assert plain.scale is None and torch.equal(plain.logits, eng.model.head(plain.features))
    # a fresh mask (-1 everywhere) scales every logit by 2*sigmoid(-1)
    assert torch.allclose(torch.sigmoid(torch.tensor(-1.0)) * 2, torch.tensor(0.5379), atol=1e-4)
    assert (engine(tmp_path).strategy.prompt.mask == -1).all()


# ------------------------------------------------------------------------------- key loss
def test_contrastive_key_loss_hand_values_broadcast_parity_and_plain_distance(tmp_path):
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    q = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # d(q0, k0) = 1 - 1/sqrt2, d(q1, k1) = 0
    idx, mass = torch.tensor([0, 1]), torch.tensor([1.0, 3.0, 1.0])
    dk = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0]])  # 1 - cos(k_sel, k_m)
    dq = torch.tensor([1 - 2 ** -0.5, 0.0])
    mu = torch.tensor([1.0, 3.0])
    pos, neg = (dq / mu).exp().mean(), (dk / mu[:, None]).exp().mean()
    got = contrastive_key_loss(q, keys, idx, mass)
    assert got.item() == pytest.approx(-math.log(neg / (pos + neg) + 1e-6), rel=1e-5)
    pos_b = torch.stack([(dq[j] / mu[b]).exp() for b in range(2) for j in range(2)]).mean()
    neg_b = torch.stack([(dk[j, m] / mu[b]).exp() for b in range(2) for j in range(2) for m in range(3)]).mean()
    broad = contrastive_key_loss(q, keys, idx, mass, broadcast=True)
    assert broad.item() == pytest.approx(-math.log(neg_b / (pos_b + neg_b) + 1e-6), rel=1e-5)
    assert abs(broad.item() - got.item()) > 1e-3
    # the loss pulls the selected key towards its query and pushes it from the other keys
    k = keys.clone().requires_grad_(True)
    contrastive_key_loss(q, k, idx, mass).backward()
    assert k.grad.abs().sum() > 0
    eng = engine(tmp_path, "strategy.use_contrastive=false")
    s = eng.strategy
    qq = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    sel = s.select(qq)
    keys = s.prompt.e.all_keys()[0]
    expected = (1 - F.cosine_similarity(qq, keys[sel], dim=-1)).mean()
    torch.testing.assert_close(s.key_loss(qq, sel), expected)


# ------------------------------------------------------------------------------- GSF, AFS
def test_closed_form_gradient_similarity_equals_autograd():
    g = torch.Generator().manual_seed(0)
    B, D, C = 7, 6, 5
    head = torch.nn.Linear(D, C)
    with torch.no_grad():
        head.weight.copy_(torch.randn(C, D, generator=g))
        head.bias.copy_(torch.randn(C, generator=g))
    f = torch.randn(B, D, generator=g)
    scale = 2 * torch.sigmoid(torch.randn(B, C, generator=g))
    y = torch.tensor([0, 1, 1, 2, 0, 3, 1])
    allowed = torch.ones(B, C, dtype=torch.bool)
    allowed[:, 4] = False  # a class not exposed yet
    logits = lambda: (head(f) * scale).masked_fill(~allowed, float("-inf"))  # noqa: E731
    sample = []
    for i in range(B):  # the released _compute_grads: one backward per sample
        head.zero_grad()
        F.cross_entropy(logits(), y, reduction="none")[i].backward()
        sample.append(head.weight.grad[y[i]].clone())
    head.zero_grad()
    F.cross_entropy(logits(), y).backward()
    batch = head.weight.grad[y].clone()
    expected = 1 - F.cosine_similarity(torch.stack(sample), batch, dim=1)
    got = gradient_similarity_ignore(f, head.weight, head.bias, y, allowed, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got.std() > 1e-3  # samples differ
    nomask = gradient_similarity_ignore(f, head.weight, head.bias, y, allowed)
    assert not torch.allclose(nomask, got)  # the instance mask enters the gradient


def test_focal_weights_per_sample_vs_released_batch_mean(tmp_path):
    eng = engine(tmp_path, "strategy.use_afs=false")
    s = eng.strategy
    _, batch = setup_batch(eng)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(len(batch), 32, generator=g).requires_grad_(True)
    out = MVPOutput(eng.model.head(feats), None, None, feats, None)
    allowed = eng.ctx.class_mask[batch.task]
    ce = F.cross_entropy(out.logits.masked_fill(~allowed, float("-inf")), batch.y, reduction="none")
    ign = gradient_similarity_ignore(feats, eng.model.head.weight, eng.model.head.bias, batch.y, allowed)
    w = 0.5 + 0.5 * ign ** 2  # alpha 0.5, gamma 2
    per_sample = s.loss(out, batch, eng.ctx)
    assert per_sample.item() == pytest.approx((w * ce).mean().item(), rel=1e-5)
    s.cfg.focal_batch_mean = True
    released = s.loss(out, batch, eng.ctx)
    assert released.item() == pytest.approx((w.mean() * ce.mean()).item(), rel=1e-5)
    assert abs(per_sample.item() - released.item()) > 1e-4
    s.cfg.use_gsf = False
    assert s.loss(out, batch, eng.ctx).item() == pytest.approx(ce.mean().item(), rel=1e-5)
    torch.testing.assert_close(focal_weights(torch.tensor([0.0, 1.0, 2.0]), 0.5, 2.0), torch.tensor([0.5, 1.0, 2.5]))


def test_adaptive_feature_scaling_hand_values(tmp_path):
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    f = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    y = torch.tensor([0, 1, 1])
    got = afs_factor(f, w, y, 0.5)
    torch.testing.assert_close(got, torch.tensor([1 - 2 ** -0.5 + 0.5, 1.5, 0.5]))
    # in the loss: CE on head(f / factor) * 2 sigmoid(mask), factor detached
    eng = engine(tmp_path, "strategy.use_gsf=false")
    s = eng.strategy
    _, batch = setup_batch(eng, n=4)
    head = eng.model.head
    feats = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    scale = 2 * torch.sigmoid(torch.randn(4, 10, generator=torch.Generator().manual_seed(3)))
    out = MVPOutput(head(feats) * scale, None, None, feats, scale)
    cps = 1 - F.cosine_similarity(head.weight[batch.y], feats, dim=1) + 0.5
    allowed = eng.ctx.class_mask[batch.task]
    expected = F.cross_entropy((head(feats / cps[:, None]) * scale).masked_fill(~allowed, float("-inf")), batch.y)
    assert s.loss(out, batch, eng.ctx).item() == pytest.approx(expected.item(), rel=1e-5)
    s.cfg.use_afs = False
    plain = F.cross_entropy((head(feats) * scale).masked_fill(~allowed, float("-inf")), batch.y)
    assert s.loss(out, batch, eng.ctx).item() == pytest.approx(plain.item(), rel=1e-5)
    assert abs(plain.item() - expected.item()) > 1e-4


# ------------------------------------------------------------------------------- gradients, prompts
def test_only_prompts_keys_masks_and_head_get_gradients(tmp_path):
    eng = engine(tmp_path)
    s = eng.strategy
    x, batch = setup_batch(eng)
    idx = s.select(s.query(x))
    eng.model.zero_grad(set_to_none=True)
    s.loss(s.forward(x, batch, eng.ctx), batch, eng.ctx).backward()
    assert all(p.grad is None and not p.requires_grad for p in eng.model.backbone.parameters())
    assert _grad(eng.model.head.weight) > 0 and _grad(s.prompt.g.prompts[0]) > 0
    chosen = torch.zeros(4, dtype=torch.bool)
    chosen[idx] = True
    e_rows = s.prompt.e.prompts[0].grad.abs().sum((0, 2, 3))
    m_rows = s.prompt.mask.grad.abs().sum(1)
    assert (e_rows[chosen] > 0).all() and (e_rows[~chosen] == 0).all()
    assert (m_rows[chosen] > 0).all() and (m_rows[~chosen] == 0).all()
    assert _grad(s.prompt.e.keys[0]) > 0
    trained = {id(p) for g in s.param_groups() for p in g["params"]}
    expected = [*eng.model.head.parameters(), s.prompt.g.prompts[0], s.prompt.e.prompts[0], s.prompt.e.keys[0], s.prompt.mask]
    assert trained == {id(p) for p in expected}
    assert "prompt.count" in eng.model.state_dict() and "count" in s.state_dict()


def test_per_block_tokens_are_attended_in_their_block_only(tmp_path):
    eng = engine(tmp_path)
    vit = eng.strategy.vit
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    p = {1: torch.randn(3, 1, 4, 32), 3: torch.randn(3, 1, 2, 32)}
    with torch.no_grad():
        out = prompted_forward(vit, x, p, "tokens_per_block")
        assert out.tokens.shape == (3, 5, 32) and out.n_prompt == 0
        h = vit._pos_embed(vit.patch_embed(x))
        for i, blk in enumerate(vit.blocks):  # the released prompt_tuning: append, block, truncate
            n = h.shape[1]
            h = blk(torch.cat([h, p[i].reshape(3, -1, 32)], 1))[:, :n] if i in p else blk(h)
        torch.testing.assert_close(out.tokens, vit.norm(h), rtol=1e-5, atol=1e-5)
        kept = prompted_forward(vit, x, p, "tokens")
        assert kept.n_prompt == 6 and not torch.allclose(kept.tokens[:, 0], out.tokens[:, 0], atol=1e-4)


def test_released_query_is_penultimate_cls_without_norm(tmp_path):
    eng = engine(tmp_path, "strategy.query=penultimate")
    s, vit = eng.strategy, eng.strategy.vit
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = vit._pos_embed(vit.patch_embed(x))
        for blk in vit.blocks[:-1]:
            h = blk(h)
    torch.testing.assert_close(s.query(x), h[:, 0])
    s.cfg.query = "cls"
    torch.testing.assert_close(s.query(x), eng.model.backbone(x))


# ------------------------------------------------------------------------------- end to end
def test_online_si_blurry_run_backbone_frozen_prompts_masks_head_trained(tmp_path):
    cfg = load_config(REPO / "configs" / "si_blurry_digits.yaml", [
        f"output_dir={tmp_path}", "name=mvp_online", "logging.console=false", "logging.tensorboard=false",
        TINY_VIT, "strategy=mvp", "strategy.e_pool_size=4", "train.batch_size=32", "train.online_iter=2",
        "train.lr=0.01", "eval.every_samples=500", "scenario.n_tasks=3", "eval.batch_size=256"])
    eng = Engine(cfg)
    backbone = {k: v.clone() for k, v in eng.model.backbone.state_dict().items()}
    prompt = {k: v.clone() for k, v in eng.model.prompt.state_dict().items()}
    head = eng.model.head.weight.detach().clone()
    summary = eng.run()
    assert summary["status"] == "finished"
    after = eng.model.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone.items())  # bit-identical
    changed = {k for k, v in eng.model.prompt.state_dict().items() if not torch.equal(v, prompt[k])}
    assert {"g.prompts.0", "e.prompts.0", "e.keys.0", "mask", "count"} <= changed
    assert not torch.equal(head, eng.model.head.weight)
    n = eng.ctx.samples_seen
    assert n == sum(exp.train_idx.numel() for exp in eng.stream) > 1000
    # official A_auc points (eval.online_points=official): after the batch that passes each k*500, no end point
    assert len(summary["online_samples"]) == (n - 1) // 500
    assert all(k * 500 < s <= k * 500 + 32 for k, s in enumerate(summary["online_samples"], start=1))
    assert eng.strategy.prompt.count.sum().item() == 2 * n  # every training step counts its selections
    assert (eng.strategy.prompt.count > 0).sum() >= 2  # usage scaling spreads the selections
