"""Prompt methods on a tiny random ViT (CPU, seeded): the prompted forward against timm's, prefix vs
token prompts, which parameters train, CODA-P's frozen and orthogonal components, VOR's outliers,
and one short end-to-end run per strategy on the built-in digits."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from clbench.config import load_config
from clbench.engine import Engine
from clbench.prompts import PromptPool, attention, pool_features, prompted_forward
from clbench.strategy import Batch
from clbench.vor import energy, energy_regularizer, kth_neighbour_distance, synthesize_outliers
from clbench.strategies.coda_prompt import CodaPromptConfig, gram_schmidt
from clbench.strategies.l2p import key_loss

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = ("model={name: timm, arch: vit_tiny_patch16_224, pretrained: false, normalize: dataset, "
            "kwargs: {img_size: 8, patch_size: 4, embed_dim: 32, depth: 5, num_heads: 2, in_chans: 1}}")
SMALL = {"coda_prompt": ["strategy.pool_size=4"], "l2p": ["strategy.pool_size=6", "strategy.top_k=2"]}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # three agents share 2 cores; tiny tensors run fastest on one thread


def tiny_vit(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=8, patch_size=4,
                            embed_dim=32, depth=3, num_heads=2, in_chans=1)
    return vit.eval()


def engine(tmp_path, strategy: str, *overrides: str, n_tasks: int = 2, iterations: int = 3) -> Engine:
    cfg = load_config(None, [
        f"output_dir={tmp_path}", f"name={strategy}", "logging.console=false", "logging.tensorboard=false",
        f"train.iterations={iterations}", "train.batch_size=16", "train.optimizer=adam", "train.lr=0.01",
        "eval.every=0", "eval.baseline=false", "eval.subset_size=50", "eval.batch_size=64",
        f"scenario.n_tasks={n_tasks}", "checkpoint.enabled=false", TINY_VIT, f"strategy={strategy}",
        *SMALL.get(strategy, []), *overrides])
    return Engine(cfg)


def first_batch(eng: Engine, n: int = 8) -> tuple[torch.Tensor, Batch]:
    exp = eng.stream[eng.ctx.experience]
    batch = next(eng.ctx.batches([exp], n))
    return eng.ctx.inputs(batch.x), batch


def train_step(eng: Engine, exp_index: int = 0) -> Batch:
    """Set up experience ``exp_index`` as the engine does and back-propagate one batch's loss."""
    s, ctx = eng.strategy, eng.ctx
    ctx.experience, ctx.n_iterations, ctx.experience_iteration = exp_index, 10, 0
    ctx.class_mask = eng.stream.class_mask(exp_index)
    s.before_experience(eng.stream[exp_index], ctx)
    x, batch = first_batch(eng)
    eng.model.zero_grad(set_to_none=True)
    s.loss(s.forward(x, batch, ctx), batch, ctx).backward()
    return batch


# ------------------------------------------------------------------------------- prompted forward
def test_prompted_forward_without_prompts_equals_timm():
    vit = tiny_vit()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        for mode in ("prefix", "tokens"):
            out = prompted_forward(vit, x, None, mode)
            torch.testing.assert_close(out.tokens, vit.forward_features(x), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(pool_features(vit, out), vit.forward_head(vit.forward_features(x), pre_logits=True),
                                       rtol=1e-5, atol=1e-6)
        for blk in vit.blocks:  # timm's explicit (non-fused) attention path too
            blk.attn.fused_attn = False
        torch.testing.assert_close(prompted_forward(vit, x).tokens, vit.forward_features(x), rtol=1e-5, atol=1e-6)


def test_prefix_attention_is_softmax_over_prefix_and_tokens():
    vit = tiny_vit()
    attn = vit.blocks[0].attn
    g = torch.Generator().manual_seed(1)
    x, pk, pv = torch.randn(2, 5, 32, generator=g), torch.randn(2, 3, 32, generator=g), torch.randn(2, 3, 32, generator=g)
    with torch.no_grad():
        got = attention(attn, x, pk, pv)
        q, k, v = attn.qkv(x).split(32, dim=-1)
        k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)  # 3 prefix + 5 token keys/values
        heads = lambda t: t.view(2, t.shape[1], 2, 16).transpose(1, 2)  # noqa: E731
        w = (heads(q) @ heads(k).transpose(-1, -2) / 4.0).softmax(-1)
        assert w.shape == (2, 2, 5, 8)
        expected = attn.proj((w @ heads(v)).transpose(1, 2).reshape(2, 5, 32))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, attention(attn, x), atol=1e-3)  # the prefix does change the output


def test_prefix_keeps_sequence_tokens_are_inserted_after_cls():
    vit = tiny_vit()
    x = torch.randn(3, 1, 8, 8)
    p = torch.randn(3, 2, 4, 32)  # 2 prompts of length 4 at block 1
    with torch.no_grad():
        pre = prompted_forward(vit, x, {1: p}, "prefix")
        assert pre.tokens.shape == (3, 5, 32) and pre.n_prompt == 0  # [CLS] + 4 patches: prefixes are not output
        h0 = vit.blocks[0](vit._pos_embed(vit.patch_embed(x)))
        same_block0 = prompted_forward(vit, x, {2: p}, "prefix")
        tok = prompted_forward(vit, x, {1: p}, "tokens")
        assert tok.tokens.shape == (3, 5 + 8, 32) and tok.n_prompt == 8 and tok.n_prefix == 1
        # by hand with timm's own blocks: [CLS], the 8 prompt tokens, the 4 patches
        h = torch.cat([h0[:, :1], p.reshape(3, 8, 32), h0[:, 1:]], 1)
        torch.testing.assert_close(tok.tokens, vit.norm(vit.blocks[2](vit.blocks[1](h))), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pool_features(vit, tok, "prompt"), tok.tokens[:, 1:9].mean(1))
        torch.testing.assert_close(pool_features(vit, tok, "cls"), tok.tokens[:, 0])
        # prefix at block 1: split per prompt into 2 key + 2 value tokens, concatenated over the prompts
        blk = vit.blocks[1]
        pk, pv = p[:, :, :2].reshape(3, 4, 32), p[:, :, 2:].reshape(3, 4, 32)
        h1 = h0 + blk.ls1(attention(blk.attn, blk.norm1(h0), pk, pv))
        h1 = h1 + blk.ls2(blk.mlp(blk.norm2(h1)))
        torch.testing.assert_close(pre.tokens, vit.norm(vit.blocks[2](h1)), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(same_block0.tokens, pre.tokens)


def test_prompt_pool_select_and_chunks():
    pool = PromptPool([0, 2], size=6, length=4, dim=8, key_dim=8, key_per_layer=True, attention=True, chunks=3)
    assert pool.all_prompts().shape == (2, 6, 4, 8) and pool.all_keys().shape == (2, 6, 8)
    idx = torch.tensor([[5, 0], [1, 1]])
    sel = pool.select(idx)
    assert set(sel) == {0, 2} and sel[2].shape == (2, 2, 4, 8)
    torch.testing.assert_close(sel[2][0, 0], pool.prompts[2][1, 1])  # index 5 = chunk 2, row 1; layer 2 = slot 1
    old = pool.all_prompts(upto=2, detach_before=1)
    assert old.shape[1] == 4 and old.requires_grad
    old.sum().backward()
    assert pool.prompts[0].grad is None and pool.prompts[1].grad is not None and pool.prompts[2].grad is None


# ------------------------------------------------------------------------------- gradients, queries
def _grad(p) -> float:
    return 0.0 if p.grad is None else float(p.grad.abs().sum())


@pytest.mark.parametrize("strategy", ["l2p", "dualprompt", "coda_prompt", "oneprompt"])
def test_only_prompts_and_head_get_gradients(tmp_path, strategy):
    eng = engine(tmp_path, strategy)
    train_step(eng)
    assert all(p.grad is None and not p.requires_grad for p in eng.model.backbone.parameters())
    assert _grad(eng.model.head.weight) > 0
    trained = {id(p) for g in eng.strategy.param_groups() for p in g["params"]}
    assert trained == {id(p) for p in eng.strategy.trainable_prompt_parameters()} | {id(p) for p in eng.model.head.parameters()}
    assert all(id(p) not in trained for p in eng.model.backbone.parameters())
    s = eng.strategy
    if strategy == "l2p":  # the selected prompts and keys only
        rows = s.prompt.prompts[0].grad[0].abs().sum((1, 2))
        assert 0 < int((rows > 0).sum()) < 6 and _grad(s.prompt.keys[0]) > 0
    elif strategy == "dualprompt":  # G-prompt and the task's E-prompt and key (task id at training)
        assert _grad(s.prompt.g.prompts[0]) > 0
        e_rows = s.prompt.e.prompts[0].grad.abs().sum((0, 2, 3))
        k_rows = s.prompt.e.keys[0].grad[0].abs().sum(1)
        assert e_rows[0] > 0 and e_rows[1] == 0 and k_rows[0] > 0 and k_rows[1] == 0
    elif strategy == "coda_prompt":  # task 0's chunk: prompts, keys and attention vectors
        assert all(_grad(p) > 0 for p in s.prompt.chunk_parameters(0))
        assert all(p.grad is None for p in s.prompt.chunk_parameters(1))
    else:
        assert _grad(s.prompt.g.prompts[0]) > 0 and _grad(s.prompt.e.prompts[0]) > 0


@pytest.mark.parametrize("strategy,passes", [("l2p", 2), ("dualprompt", 2), ("coda_prompt", 2), ("oneprompt", 1)])
def test_query_pass_only_where_the_method_needs_one(tmp_path, strategy, passes):
    eng = engine(tmp_path, strategy)
    calls = []
    eng.model.backbone.model.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    eng.ctx.class_mask = eng.stream.class_mask(0)
    eng.strategy.before_experience(eng.stream[0], eng.ctx)
    x, batch = first_batch(eng)
    eng.strategy.forward(x, batch, eng.ctx)
    assert len(calls) == passes
    eng.strategy.predict(x)
    assert len(calls) == 2 * passes


def test_coda_prompt_second_task_freezes_first_tasks_components(tmp_path):
    eng = engine(tmp_path, "coda_prompt")
    train_step(eng, 0)
    s = eng.strategy
    train_step(eng, 1)
    assert all(p.grad is None for p in s.prompt.chunk_parameters(0))  # detached: no gradient at all
    assert all(_grad(p) > 0 for p in s.prompt.chunk_parameters(1))
    trained = {id(p) for g in s.param_groups() for p in g["params"]}
    assert not any(id(p) in trained for p in s.prompt.chunk_parameters(0))


def test_l2p_key_loss_own_selection_vs_released_gather():
    cos = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    idx = torch.tensor([[0, 2], [1, 2]])
    own = ((1 - 0.9) + (1 - 0.5) + (1 - 0.8) + (1 - 0.3)) / 4
    assert key_loss(cos, idx).item() == pytest.approx(own)
    # cos[:, idx]: every query against every sample's selections, (2 x 2 x 2) entries
    gathered = sum(1 - cos[b, idx[c, j]] for b in range(2) for c in range(2) for j in range(2)) / 8
    assert key_loss(cos, idx, gather_all=True).item() == pytest.approx(float(gathered))


def test_dualprompt_task_id_in_training_key_at_inference(tmp_path):
    eng = engine(tmp_path, "dualprompt")
    s = eng.strategy
    s.task = 1
    q = torch.tensor([[1.0] + [0.0] * 31, [0.0, 1.0] + [0.0] * 30])
    with torch.no_grad():
        s.prompt.e.keys[0][0] = torch.eye(32)[:2]  # key t = basis vector t
    pe = s.prompt.e.all_prompts()
    train, aux = s.prompts_for(q, 2, None, train=True)
    test, _ = s.prompts_for(q, 2, None, train=False)
    assert set(train) == {0, 1, 2, 3, 4}
    torch.testing.assert_close(train[2][:, 0], pe[0, 1].expand(2, -1, -1))  # task 1's E-prompt for everyone
    torch.testing.assert_close(test[2][0, 0], pe[0, 0])  # sample 0's query matches key 0
    torch.testing.assert_close(test[2][1, 0], pe[0, 1])
    assert aux.item() == pytest.approx(((1 - 0.0) + (1 - 1.0)) / 2)  # 1 - cos(q, k_1)


# ------------------------------------------------------------------------------- Gram-Schmidt
def test_gram_schmidt_new_components_orthonormal_to_old_span():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(6, 20, generator=g) + 0.5  # trained components: not orthogonal to each other
    new = gram_schmidt(old, 4, torch.Generator().manual_seed(1))
    q = torch.linalg.qr(old.t().double()).Q.float()
    torch.testing.assert_close(new @ new.t(), torch.eye(4), atol=1e-5, rtol=0)
    assert (new @ q).abs().max() < 1e-5  # orthogonal to the whole span of the old ones
    released = gram_schmidt(old, 4, torch.Generator().manual_seed(1), released=True)
    assert (released @ q).abs().max() > 1e-2  # the code's per-vector projections miss the span
    ortho_old = torch.linalg.qr(torch.randn(20, 6, generator=g)).Q.t()
    rel = gram_schmidt(ortho_old, 4, torch.Generator().manual_seed(1), released=True)
    assert (rel @ ortho_old.t()).abs().max() < 1e-5  # ... but agree when the old ones are orthonormal
    torch.testing.assert_close(rel @ rel.t(), torch.eye(4), atol=1e-5, rtol=0)


def test_coda_prompt_each_task_starts_with_components_orthogonal_to_earlier_ones(tmp_path):
    eng = engine(tmp_path, "coda_prompt", n_tasks=2)
    s = eng.strategy
    train_step(eng, 0)
    with torch.no_grad():  # training moves task 0's components away from orthonormality
        for p in s.prompt.chunk_parameters(0):
            p.add_(0.3)
    before = [p.detach().clone() for p in s.prompt.chunk_parameters(0)]
    s.before_experience(eng.stream[1], eng.ctx)
    for p, b in zip(s.prompt.chunk_parameters(0), before):
        torch.testing.assert_close(p, b)  # old components untouched
    for plist in (s.prompt.prompts, s.prompt.keys, s.prompt.attn):
        for layer in range(5):
            old, new = plist[0][layer].flatten(1), plist[1][layer].flatten(1)
            q = torch.linalg.qr(old.t().double()).Q.float()
            assert (new @ q).abs().max() < 1e-4
            torch.testing.assert_close(new @ new.t(), torch.eye(2), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- VOR
def _vor_cfg(**kw) -> CodaPromptConfig:
    cfg = CodaPromptConfig(vor_k=10, vor_select=20, vor_sample_from=50, vor_per_class=30)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_vor_outliers_lie_outside_the_features_knn_radius():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(3, 64, generator=g), dim=1)
    feats = 7.0 * (centers.repeat_interleave(100, 0) + 0.03 * torch.randn(300, 64, generator=g))
    out = synthesize_outliers(feats, _vor_cfg(), n_classes=3, generator=torch.Generator().manual_seed(1))
    assert out.shape == (90, 64)
    normed = F.normalize(feats, dim=1)
    scale = feats.norm(dim=1).mean()
    radius = kth_neighbour_distance(normed, normed, 10)  # each ID point's 10-NN radius
    d_out = kth_neighbour_distance(out / scale, normed, 10)
    assert d_out.min() > radius.max()  # every outlier is farther from the ID set than any ID point's radius
    nearest = torch.cdist(out / scale, normed).min(1).values
    assert nearest.max() < 1.5  # ... yet around the boundary, not anywhere (unit-sphere diameter is 2)
    torch.testing.assert_close(out.norm(dim=1).mean() / scale, (out / scale).norm(dim=1).mean())


def test_vor_released_outliers_are_centred_at_the_origin():
    g = torch.Generator().manual_seed(0)
    feats = 5.0 + torch.randn(200, 64, generator=g)
    out = synthesize_outliers(feats, _vor_cfg(vor_outlier_center="origin", vor_select=5, vor_sample_from=200), 2,
                              torch.Generator().manual_seed(1))
    assert 0.6 < out.norm(dim=1).mean() < 1.0 and out.norm(dim=1).max() < 1.2  # N(0, 0.01 I): norm ~ 0.1 sqrt(64)
    assert out.mean(0).norm() < 0.5  # about the origin (the kept ones lean away from the ID direction)
    assert torch.cdist(out, feats).min() > 30  # far from the raw features, unlike paper-version outliers


def test_vor_origin_repeats_one_draw_of_offsets_as_the_released_code():
    """ood.py: offsets = rsample((sample_from,)) once, ood_list = cov * offsets.repeat(select, 1),
    then the per_class * C candidates with the largest k-NN distance: 60 kept of 20 x 50
    candidates are 3 distinct offsets (the 3 farthest of the 50), 20 + 20 + 20 copies."""
    g = torch.Generator().manual_seed(0)
    feats = 5.0 + torch.randn(200, 64, generator=g)
    cfg = _vor_cfg(vor_outlier_center="origin")  # k 10, select 20, sample_from 50, per_class 30
    out = synthesize_outliers(feats, cfg, 2, torch.Generator().manual_seed(1))
    assert out.shape == (60, 64)
    offsets = 0.1 * torch.randn(50, 64, generator=torch.Generator().manual_seed(1))  # the one draw
    d = torch.cdist(offsets, F.normalize(feats, dim=1)).sort(dim=1).values[:, 9]  # 10th neighbour
    top3 = offsets[d.argsort(descending=True)[:3]]
    distinct, counts = out.unique(dim=0, return_counts=True)
    assert len(distinct) == 3 and sorted(counts.tolist()) == [20, 20, 20]
    assert torch.cdist(distinct, top3).min(1).values.max() < 1e-6
    cfg.vor_per_class = 25  # 50 kept: 20 + 20 + 10 copies
    out = synthesize_outliers(feats, cfg, 2, torch.Generator().manual_seed(1))
    assert sorted(out.unique(dim=0, return_counts=True)[1].tolist()) == [10, 20, 20]
    # the paper default draws independent offsets: every kept outlier is distinct
    out = synthesize_outliers(feats, _vor_cfg(), 2, torch.Generator().manual_seed(1))
    assert len(out.unique(dim=0)) == len(out) == 60


def test_vor_energy_regulariser_margins():
    classes = torch.tensor([False, True, True])
    id_logits = torch.tensor([[0.0, 20.0, 0.0]])  # E_id ~ -20 < tau_id = -15: no penalty
    ood_logits = torch.tensor([[5.0, -10.0, -10.0]])  # E_ood ~ 9.3 > tau_ood = -3: no penalty (class 0 ignored)
    assert energy_regularizer(id_logits, ood_logits, classes, -15.0, -3.0).item() == 0.0
    bad_id, bad_ood = torch.zeros(1, 3, requires_grad=True), torch.full((1, 3), 10.0, requires_grad=True)
    loss = energy_regularizer(bad_id, bad_ood, classes, -15.0, -3.0)
    e_id, e_ood = energy(bad_id, classes).item(), energy(bad_ood, classes).item()
    assert loss.item() == pytest.approx((e_id + 15 - 0.5) + (-3 - e_ood - 0.5), rel=1e-5)  # Huber, linear part
    loss.backward()
    assert (bad_id.grad[0, 1:] < 0).all() and (bad_ood.grad[0, 1:] > 0).all() and bad_ood.grad[0, 0] == 0


# ------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("strategy", ["l2p", "dualprompt", "coda_prompt", "oneprompt"])
def test_end_to_end_backbone_frozen_prompts_and_head_trained(tmp_path, strategy):
    eng = engine(tmp_path, strategy)
    backbone = {k: v.clone() for k, v in eng.model.backbone.state_dict().items()}
    prompts = {k: v.clone() for k, v in eng.model.prompt.state_dict().items()}
    head = eng.model.head.weight.detach().clone()
    summary = eng.run()
    assert summary["status"] == "finished" and len(summary["matrix"]) == 2
    after = eng.model.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone.items())  # bit-identical
    changed = [k for k, v in eng.model.prompt.state_dict().items() if not torch.equal(v, prompts[k])]
    assert changed and not torch.equal(head, eng.model.head.weight)
    assert "g.prompts.0" in changed if strategy in ("dualprompt", "oneprompt") else True
    if strategy == "coda_prompt":
        assert {"prompts.0", "prompts.1", "keys.1", "attn.1"} <= set(changed)


def test_oneprompt_vor_phase_trains_only_the_head(tmp_path):
    eng = engine(tmp_path, "oneprompt", "strategy.vor=true", "strategy.vor_fraction=0.5", "strategy.vor_epochs=2",
                 "strategy.vor_k=5", "strategy.vor_select=10", "strategy.vor_sample_from=20", "strategy.vor_per_class=8",
                 n_tasks=2, iterations=4)
    s = eng.strategy
    seen = []
    forward = s.forward

    def recording_forward(x, batch, ctx):
        out = forward(x, batch, ctx)
        seen.append((ctx.experience_iteration, s.prompt.g.prompts[0].detach().clone(),
                     eng.model.head.weight.detach().clone(), out.ood_logits is not None))
        return out

    s.forward = recording_forward
    eng.run()
    phases = [vor for _, _, _, vor in seen]
    assert phases == [False, False, True, True] * 2
    assert s.outliers is not None and s.outliers.shape == (8 * 5, 32)  # per_class x 5 classes of the task
    (_, p2, h2, _), (_, p3, h3, _) = seen[2], seen[3]
    assert torch.equal(p2, p3) and not torch.equal(h2, h3)  # VOR step: prompts fixed, head trained
    assert not torch.equal(seen[0][1], seen[1][1])  # normal step: prompts trained


# ------------------------------------------------------------------------------- configs
def test_tiny_imagenet_config_uses_the_classes_never_seen_in_pretraining():
    cfg = load_config(REPO / "configs" / "split_tiny_imagenet100_vit.yaml", [])
    assert list(cfg.scenario.classes) == list(range(100, 200)) and cfg.scenario.n_tasks == 10
    assert cfg.model.arch == "vit_tiny_patch8_64" and cfg.model.checkpoint.endswith("vit_tiny_p8_64_tin100.safetensors")


def _wnids_from_tar(tar_path: Path) -> list[str]:
    """``tiny-imagenet-200/wnids.txt`` read from the shipped archive (it is the last member but
    a few: GNU tar's C scan takes ~1 s where :mod:`tarfile` takes ~3 s; tarfile if tar is absent)."""
    member = "tiny-imagenet-200/wnids.txt"
    if shutil.which("tar"):
        out = subprocess.run(["tar", "-xzOf", str(tar_path), "--occurrence=1", member], capture_output=True, check=True)
        return out.stdout.decode().split()
    with tarfile.open(tar_path, "r|gz") as tar:
        for info in tar:
            if info.name == member:
                return tar.extractfile(info).read().decode().split()
    raise AssertionError(f"{member} not in {tar_path}")


def test_pretraining_classes_are_the_first_100_sorted_wnids(data_root):
    """Labels are sorted-wnid indices and the ViT was pretrained on the first 100 of them, so
    the config's classes 100..199 are exactly the ones it never saw."""
    tar_path = data_root / "tiny-imagenet-200" / "tiny-imagenet-200.tar.gz"
    classes_txt = data_root / "weights" / "vit-tiny-tinyimagenet100" / "classes.txt"
    if not (tar_path.is_file() and classes_txt.is_file()):
        pytest.skip(f"needs {tar_path} and {classes_txt} (the shared data; set CLBENCH_DATA_ROOT)")
    wnids = _wnids_from_tar(tar_path)
    pretrained = classes_txt.read_text().split()
    assert len(wnids) == 200 and len(pretrained) == 100
    assert sorted(wnids)[:100] == pretrained


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "repro").glob("*.yaml")), ids=lambda p: p.name)
def test_repro_configs_load(path):
    cfg = load_config(path, [])
    assert cfg.strategy.name and cfg.model.name  # every repro config (any method) loads and validates


# ------------------------------------------------------------------------------- JAX-code parity options
def test_l2p_batchwise_prompt_uses_the_batchs_most_frequent_prompts(tmp_path):
    from clbench.strategies.l2p import batchwise_top_k

    # per-sample top-2 of pool 6: counts 0:1, 1:3, 2:2, 3:0, 4:2, 5:0 -> {1, then 2 (tie with 4: smaller id)}
    idx = torch.tensor([[1, 2], [1, 4], [4, 1], [0, 2]])
    assert batchwise_top_k(idx, 6).tolist() == [[1, 2]] * 4
    eng = engine(tmp_path, "l2p", "strategy.batchwise_prompt=true")  # pool 6, top-2
    s = eng.strategy
    with torch.no_grad():
        s.prompt.keys[0][0] = torch.eye(32)[:6]  # key m = basis vector m
    q = torch.stack([torch.eye(32)[0] * 2 + torch.eye(32)[3], torch.eye(32)[3] * 2 + torch.eye(32)[5],
                     torch.eye(32)[3] * 2 + torch.eye(32)[0]])  # own top-2: {0,3}, {3,5}, {3,0} -> batch: 3, 0
    prompts, aux = s.prompts_for(q, 3, None, train=True)
    pool = s.prompt.all_prompts()
    for b in range(3):
        torch.testing.assert_close(prompts[0][b], pool[0, [3, 0]])
    cos = F.normalize(q, dim=1)[:, [3, 0]]
    assert aux.item() == pytest.approx(float((1 - cos).mean()))  # the pull towards the batch's keys
    off = engine(tmp_path, "l2p")
    with torch.no_grad():
        off.strategy.prompt.keys[0][0] = torch.eye(32)[:6]
    own, _ = off.strategy.prompts_for(q, 3, None, train=False)
    torch.testing.assert_close(own[0][1], off.strategy.prompt.all_prompts()[0, [3, 5]])  # default: per sample


@pytest.mark.parametrize("strategy", ["l2p", "dualprompt"])
def test_jax_prompt_init_and_zero_head(tmp_path, strategy):
    eng = engine(tmp_path, strategy, "strategy.prompt_init_scale=0.01", "strategy.zero_head=true")
    params = [p.detach() for p in eng.strategy.prompt.parameters()]
    assert params and all(0 <= float(p.min()) and float(p.max()) <= 0.01 for p in params)
    assert float(torch.cat([p.flatten() for p in params]).max()) > 0.009  # U(0, 0.01), not smaller
    assert (eng.model.head.weight == 0).all() and (eng.model.head.bias == 0).all()
    default = engine(tmp_path, strategy)
    assert float(torch.cat([p.detach().flatten() for p in default.strategy.prompt.parameters()]).max()) > 0.9  # U(0, 1)
    assert default.model.head.weight.abs().sum() > 0


def test_dualprompt_shared_prompt_pool_copies_previous_e_prompt_once(tmp_path):
    eng = engine(tmp_path, "dualprompt", "strategy.shared_prompt_pool=true", n_tasks=5)
    s, ctx = eng.strategy, eng.ctx
    s.before_experience(eng.stream[0], ctx)
    initial = s.prompt.e.all_prompts().detach().clone()  # [n_layers, 5, L, D]
    assert not torch.equal(initial[:, 0], initial[:, 1])
    s.before_experience(eng.stream[1], ctx)
    after = s.prompt.e.all_prompts().detach()
    torch.testing.assert_close(after[:, 1], initial[:, 0])  # task 1 starts from task 0's E-prompt
    torch.testing.assert_close(after[:, [0, 2, 3, 4]], initial[:, [0, 2, 3, 4]])  # nothing else changes
    with torch.no_grad():
        s.prompt.e.prompts[0][:, 1] += 1.0  # "trained" on task 1
    trained = s.prompt.e.all_prompts().detach().clone()
    s.before_experience(eng.stream[1], ctx)  # e.g. a resume inside task 1: no second copy
    torch.testing.assert_close(s.prompt.e.all_prompts().detach(), trained)
    assert int(eng.model.state_dict()["prompt.transferred"]) == 1  # in the checkpointed model state
    s.before_experience(eng.stream[2], ctx)
    torch.testing.assert_close(s.prompt.e.all_prompts().detach()[:, 2], trained[:, 1])
    off = engine(tmp_path, "dualprompt", n_tasks=5)
    before = off.strategy.prompt.e.all_prompts().detach().clone()
    off.strategy.before_experience(off.stream[1], off.ctx)
    torch.testing.assert_close(off.strategy.prompt.e.all_prompts().detach(), before)  # default: no transfer


def test_jax_repro_configs_scale_lr_and_clip():
    l2p = load_config(REPO / "configs" / "repro" / "l2p_original_imagenet_r.yaml", [])
    assert l2p.train.lr == pytest.approx(0.03 * 128 / 256) and l2p.train.batch_size == 128
    assert l2p.train.grad_clip == 1.0 and l2p.strategy.batchwise_prompt and l2p.strategy.zero_head
    assert l2p.strategy.prompt_init_scale == 0.01
    dual = load_config(REPO / "configs" / "repro" / "dualprompt_imagenet_r.yaml", [])
    assert dual.train.lr == pytest.approx(0.005 * 192 / 256) and dual.train.batch_size == 192
    assert dual.train.grad_clip == 1.0 and dual.strategy.shared_prompt_pool and dual.strategy.zero_head
    assert dual.strategy.prompt_init_scale == 0.01
