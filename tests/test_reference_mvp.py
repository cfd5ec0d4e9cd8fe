"""Reference equivalence: MVP against the official code (``KHU-AGI/Si-Blurry`` @ 61bd5eb,
``models/mvp.py`` + the trainer's ``methods/mvp.py`` update; golden ``tests/reference/mvp.safetensors``
written by ``tools/reference/mvp.py``) on the shared ViT-Tiny/8 at 64 px.

The same initial parameters (stored in the golden) go into clbench's MVP; two incoming batches
of 4 images get ``online_iter=3`` Adam steps (lr 5e-3) each, as in the official online step.

* Parity mode (the released code: ``query: penultimate``, ``contrastive_broadcast: true``,
  ``focal_batch_mean: true``, ``mode: tokens_per_block``, gamma 2): at every step the selected
  E-prompt of each sample (exact), the key loss, the training logits (exposed classes), the
  gradient-similarity ``ign`` and AFS ``cps`` scores, the loss and the usage counts equal the
  official ones; so do the gradients of step 0 and the parameters after step 0 and after the
  last step.  Tolerances: forward values atol 2e-5 / rtol 1e-4 (the token order inside the
  blocks differs: prompts after [CLS] here, appended at the end there); gradients atol 1e-6 /
  rtol 1e-4; parameters atol 1e-5 / rtol 1e-4.
* Paper mode (clbench's defaults for the loss: per-sample focal weighting, each sample's own
  mass in the key loss), flag by flag with the released query: the same selection and logits
  as the golden at step 0 (the modes agree there), a different key loss / loss (they must
  differ: the state has prompts of unequal usage selected within one batch).
* Usage-scaled selection: the golden's run never needs the scaling (the nearest key wins at every
  step's counts), so clbench's selection and key loss are also checked against a second golden,
  ``mvp_usage_selection`` (same script): the official ``forward_features`` on the initial keys with
  usage counts that flip choices against the plain nearest key (exact indices; key loss as FWD).
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from conftest import DATA_ROOT
from clbench.engine import make_optimizer
from clbench.models.pretrained import TimmConfig, timm_model
from clbench.strategies.mvp import MVP, MVPConfig, afs_factor, gradient_similarity_ignore, usage_scaled_selection
from clbench.strategy import Batch, Context
from reference_golden import load_golden

WEIGHTS = DATA_ROOT / "weights" / "vit-tiny-tinyimagenet100" / "vit_tiny_p8_64_tin100.safetensors"
pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"needs the shared ViT-Tiny/8 ({WEIGHTS})")

GOLDEN = load_golden("mvp")
X = GOLDEN.extra
FWD = dict(atol=2e-5, rtol=1e-4)
GRAD = dict(atol=1e-6, rtol=1e-4)
PARAM = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def parity_cfg(**over) -> MVPConfig:
    base = dict(g_length=X["g_length"], g_layers=X["g_layers"], e_length=X["e_length"], e_layers=X["e_layers"],
                e_pool_size=X["pool"], mode="tokens_per_block", query="penultimate", use_mask=True,
                use_contrastive=True, contrastive_broadcast=True, use_gsf=True, alpha=X["alpha"], gamma=X["gamma"],
                focal_batch_mean=True, use_afs=True, margin=X["margin"], mask_past_logits=False)
    return MVPConfig(**{**base, **over})


def build(cfg: MVPConfig) -> tuple[MVP, Context, torch.optim.Optimizer]:
    """clbench's MVP on the ViT-Tiny/8 with the golden's initial parameters."""
    torch.manual_seed(0)
    model = timm_model(TimmConfig(arch="vit_tiny_patch8_64", checkpoint=str(WEIGHTS), normalize="imagenet"),
                       (3, 64, 64), X["n_classes"])
    ctx = Context(stream=[None], device=torch.device("cpu"), seed=0, preprocess=None)
    s = MVP(cfg)
    s.setup(model, ctx)
    init = {k: GOLDEN[f"init/{k}"] for k in X["params"]}
    with torch.no_grad():
        for mine, theirs in official_to_clbench(s, init):
            mine.copy_(theirs)
        s.prompt.count.copy_(GOLDEN["init/count"])
    opt = make_optimizer(s.param_groups(), types.SimpleNamespace(optimizer="adam", lr=X["lr"], weight_decay=0.0))
    select = s.select

    def recorded(q):  # the selection of the forward being run (before its count update)
        s.selected = select(q)
        return s.selected

    s.select = recorded
    return s, ctx, opt


def official_to_clbench(s: MVP, official: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(clbench tensor, official tensor in clbench's layout) for every trained parameter.

    Official: ``key [M, D]``, ``mask [M, C]``, ``g_prompts [1, n_g*L, D]``, ``e_prompts [M, n_e*L, D]``
    (layer-major within a prompt); clbench: keys ``[1, M, D]``, prompts ``[n_layers, M, L, D]``."""
    m, d = X["pool"], official["key"].shape[1]
    g = official["g_prompts"].reshape(1, len(X["g_layers"]), X["g_length"], d).permute(1, 0, 2, 3)
    e = official["e_prompts"].reshape(m, len(X["e_layers"]), X["e_length"], d).permute(1, 0, 2, 3)
    return [(s.prompt.e.keys[0], official["key"][None]), (s.prompt.mask, official["mask"]),
            (s.prompt.g.prompts[0], g), (s.prompt.e.prompts[0], e),
            (s.model.head.weight, official["backbone.head.weight"]), (s.model.head.bias, official["backbone.head.bias"])]


def grads_of(s: MVP) -> list[torch.Tensor]:
    return [p.grad for p in (s.prompt.e.keys[0], s.prompt.mask, s.prompt.g.prompts[0], s.prompt.e.prompts[0],
                             s.model.head.weight, s.model.head.bias)]


def images(b: int) -> torch.Tensor:
    mean, std = torch.tensor(X["mean"]).view(1, 3, 1, 1), torch.tensor(X["std"]).view(1, 3, 1, 1)
    return (GOLDEN[f"images/{b}"].float() / 255 - mean) / std


def steps(s: MVP, ctx: Context, opt):
    """The official online steps: exposure on arrival, then online_iter updates per batch."""
    exposed = torch.zeros(X["n_classes"], dtype=torch.bool)
    step = 0
    for b, labels in enumerate(X["labels"]):
        y = torch.tensor(labels)
        exposed[y] = True
        ctx.class_mask = exposed[None].clone()
        x = images(b)
        batch = Batch(x, y, torch.zeros_like(y))
        for _ in range(X["online_iter"]):
            opt.zero_grad()
            out = s.forward(x, batch, ctx)
            loss = s.loss(out, batch, ctx)
            loss.backward()
            yield step, s.selected, out, loss, exposed.clone()
            opt.step()
            step += 1


def test_parity_mode_equals_the_official_update_at_every_step():
    s, ctx, opt = build(parity_cfg())
    head = s.model.head
    for step, idx, out, loss, exposed in steps(s, ctx, opt):
        g = lambda k: GOLDEN[f"step{step}/{k}"]  # noqa: E731
        assert idx.tolist() == g("idx").tolist(), f"step {step}: selected E-prompts"
        torch.testing.assert_close(out.aux_loss, g("key_loss"), **FWD)
        official_logits = g("logits")
        assert torch.isinf(official_logits[:, ~exposed]).all()  # the code's exposure mask
        torch.testing.assert_close(out.logits[:, exposed], official_logits[:, exposed], **FWD)
        f = out.features.detach()
        ign = gradient_similarity_ignore(f, head.weight.detach(), head.bias.detach(), torch.tensor(X["labels"][step // 3]),
                                         exposed[None].expand(f.shape[0], -1), out.scale.detach())
        torch.testing.assert_close(ign, g("ign"), atol=1e-4, rtol=1e-3)  # closed form vs per-sample autograd
        torch.testing.assert_close(afs_factor(f, head.weight.detach(), torch.tensor(X["labels"][step // 3]), X["margin"]),
                                   g("cps"), **FWD)
        torch.testing.assert_close(loss, g("loss"), **FWD)
        torch.testing.assert_close(s.prompt.count, g("count"), atol=0, rtol=0)
        if step == 0:
            for mine, theirs in zip(grads_of(s), (t for _, t in official_to_clbench(
                    s, {k: GOLDEN[f"grad0/{k}"] for k in X["params"]}))):
                torch.testing.assert_close(mine, theirs, **GRAD)
        if step == 0:  # parameters right after this step's Adam update (checked at the next step's start)
            after0 = {k: GOLDEN[f"after0/{k}"] for k in X["params"]}
        if step == 1:
            for mine, theirs in official_to_clbench(s, after0):
                torch.testing.assert_close(mine.detach(), theirs, **PARAM)
    for mine, theirs in official_to_clbench(s, {k: GOLDEN[f"final/{k}"] for k in X["params"]}):
        torch.testing.assert_close(mine.detach(), theirs, **PARAM)


def test_usage_scaled_selection_equals_the_official_selection():
    """In the golden's training run the usage scaling never changes a selection, so the step test above
    cannot tell ``(1 - cos) * (count + 1)`` from the plain nearest key.  Golden ``mvp_usage_selection``:
    the official ``forward_features`` on the same initial keys and both batches with usage counts that
    do flip selections (and with ``use_contrastiv`` off: plain nearest key).  clbench's selection (and
    its contrastive key loss with those counts) must equal the official ones."""
    sel = load_golden("mvp_usage_selection")
    assert sel.repository == GOLDEN.repository and sel.commit == GOLDEN.commit
    assert torch.equal(sel["init/key"], GOLDEN["init/key"])  # the same state as the training golden
    s, ctx, opt = build(parity_cfg())
    flipped = 0
    for b in range(sel.extra["batches"]):
        q = s.query(images(b))
        plain = sel[f"plain/{b}"]
        assert usage_scaled_selection(q, s.prompt.e.all_keys()[0], None).tolist() == plain.tolist(), b
        for c, count in enumerate(sel["counts"]):
            with torch.no_grad():
                s.prompt.count.copy_(count)
            idx = s.select(q)
            assert idx.tolist() == sel[f"idx/{b}/{c}"].tolist(), (b, count.tolist())
            torch.testing.assert_close(s.key_loss(q, idx), sel[f"key_loss/{b}/{c}"], **FWD)
            flipped += int((sel[f"idx/{b}/{c}"] != plain).sum())
    assert flipped > 0  # the official selections differ from the plain nearest key: the scaling is load-bearing


def test_paper_mode_agrees_where_the_modes_agree_and_differs_in_the_losses():
    # each sample's own mass in the key loss (paper) vs the code's [B, B, M] broadcast: the same
    # selection and logits, a different key loss (the batch selects prompts of unequal usage)
    s, ctx, opt = build(parity_cfg(contrastive_broadcast=False))
    step, idx, out, loss, exposed = next(steps(s, ctx, opt))
    masses = (GOLDEN["init/count"] + 1)[GOLDEN["step0/idx"]]
    assert masses.unique().numel() > 1
    assert idx.tolist() == GOLDEN["step0/idx"].tolist()
    torch.testing.assert_close(out.logits[:, exposed], GOLDEN["step0/logits"][:, exposed], **FWD)
    assert abs(out.aux_loss.item() - GOLDEN["step0/key_loss"].item()) > 1e-3
    # per-sample focal weights (paper) vs the code's mean weight times the batch-mean CE
    s, ctx, opt = build(parity_cfg(focal_batch_mean=False))
    step, idx, out, loss, exposed = next(steps(s, ctx, opt))
    assert idx.tolist() == GOLDEN["step0/idx"].tolist()
    torch.testing.assert_close(out.logits[:, exposed], GOLDEN["step0/logits"][:, exposed], **FWD)
    torch.testing.assert_close(out.aux_loss, GOLDEN["step0/key_loss"], **FWD)
    assert abs(loss.item() - GOLDEN["step0/loss"].item()) > 1e-3
    # clbench's default query (the final, normed [CLS]) is not the released one
    assert MVPConfig().query == "cls" and parity_cfg().query == "penultimate"
    assert MVPConfig().gamma == X["gamma"] == 2.0  # the released argparse default, no override


def test_repro_config_uses_the_parity_mode():
    from clbench.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "repro" / "si_blurry_mvp_tiny_imagenet100.yaml")
    flags = ("mode", "query", "contrastive_broadcast", "focal_batch_mean", "use_mask", "use_contrastive", "use_gsf",
             "use_afs", "alpha", "gamma", "margin", "mask_past_logits")
    assert {k: getattr(cfg.strategy, k) for k in flags} == {k: getattr(parity_cfg(), k) for k in flags}
    assert cfg.scenario.sampler == "official" and cfg.eval.online_points == "official"
