"""L2P++, DualPrompt and CODA-Prompt against the CODA-Prompt code (``GT-RIPL/CODA-Prompt`` @ 6417d4f).

The goldens ``tests/reference/coda_prompt_{l2p,l2p_deep,dualprompt,coda,schedule}.safetensors`` were written by
``tools/reference/coda_prompt.py``, which runs the official ``models/zoo.py`` prompt modules inside the
official ``models/vit.py`` ViT (the shared ViT-Tiny/8 weights, 64 px) and ``ViTZoo.forward``, trains them
with the official ``learners/prompt.py`` ``Prompt.update_model`` (Adam, 1-2 steps per task, 2 tasks), and
records ``utils/schedulers.py``'s ``CosineSchedule``.  Here clbench's own strategies rebuild each case
from the stored initial parameters (copied into clbench's parameter layout) and the same seeded batches:

* parity modes (``l2p``: ``key_loss_gather, key_loss_reduction: sum``, plus ``key_sharing: per_layer`` for
  Deep L2P++; ``dualprompt``: ``key_sharing: per_layer, key_loss_reduction: sum``; ``coda_prompt``: the
  defaults, ``gram_schmidt: released`` for the task-1 re-initialisation): the selected prompt indices
  (exact), the CODA composition weights, the logits, the prompt/key loss, the total loss, the gradient of
  every prompt, key, attention vector and the head after each backward, the Adam-updated parameters after
  each step, and the inference logits and selections after each task;
* paper modes (clbench's defaults ``key_loss_reduction: mean``, L2P's own-selection key loss,
  ``key_sharing: shared``): the same prompts, logits and prompt gradients where the modes agree, a
  different key loss, and different selections/logits where the CODA code's per-block keys disagree
  (DualPrompt at inference, Deep L2P++);
* CODA-P's Gram-Schmidt with the official draws: task 0 (construction) both modes = the official
  components; task 1 ``released`` = the official components, ``exact`` orthonormal to the old span, off the
  released ones by the old components' loss of orthogonality;
* the ``train.scheduler: coda_cosine`` lr per epoch = ``CosineSchedule`` as ``learn_batch`` steps it (epochs
  0 and 1 both at the base lr: the class's ``__init__`` leaves ``last_epoch`` at -1);
* the repro configs that follow the CODA code turn these modes on.

Tolerances: float32 through 12 blocks (clbench's SDPA vs the official explicit softmax) and
float64 vs float32 Gram-Schmidt; stated per comparison below (``TOL``).
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from clbench.models import Classifier
from clbench.models.pretrained import TimmBackbone
from clbench.prompts import cosine_to_keys
from clbench.strategies.coda_prompt import CodaPrompt, CodaPromptConfig
from clbench.strategies.dualprompt import DualPrompt, DualPromptConfig
from clbench.strategies.l2p import L2P, L2PConfig
from clbench.strategy import Batch
from conftest import DATA_ROOT
from reference_golden import load_golden

VIT_TINY = DATA_ROOT / "weights" / "vit-tiny-tinyimagenet100" / "vit_tiny_p8_64_tin100.safetensors"
pytestmark = pytest.mark.skipif(not VIT_TINY.exists(), reason=f"needs the shared ViT-Tiny/8 weights at {VIT_TINY}")

# (atol, rtol) per quantity.  grad: atol is that fraction of the official tensor's largest |entry| (CODA's
# prompt gradients are ~1e-5 at most, the head's ~0.5).  param: Adam's first step is lr * g / (|g| + eps),
# so an element whose gradient is within a few eps of zero turns float noise into a few % of one lr step;
# every other element moves by ~lr (1e-3), so atol 5e-5 still tells an update from none or a wrong one.
# Largest differences seen (CPU, torch 2.x): logits 1.3e-6, loss 9.5e-7, grad 1.9e-5 (relative to the
# tensor's max), param 3.4e-6, alpha 1.8e-7, gs 3.0e-8.
TOL = {"logits": (2e-5, 1e-4), "loss": (2e-5, 1e-5), "grad": (1e-3, 1e-3), "param": (5e-5, 1e-5),
       "alpha": (1e-6, 1e-5), "gs": (2e-6, 1e-4)}
SEEN: dict[str, float] = {}  # largest |difference| per kind (grad: relative to the tensor's max), see below


def close(actual, expected, kind: str, what: str) -> None:
    atol, rtol = TOL[kind]
    diff = float((actual.detach().double() - expected.double()).abs().max())
    if kind == "grad":
        scale = float(expected.abs().max())
        atol, diff = atol * scale + 1e-12, diff / max(scale, 1e-30)
    SEEN[kind] = max(SEEN.get(kind, 0.0), diff)
    if os.environ.get("CLBENCH_REFERENCE_REPORT"):  # pytest -s: the largest differences seen so far
        print(f"max diff {kind}: {SEEN[kind]:.3g} ({what}: {diff:.3g})")
    torch.testing.assert_close(actual.detach().float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ the case
def case_inputs(gold, seed: int = 1234) -> dict[str, torch.Tensor]:
    """``tools/reference/coda_prompt.py`` ``case_inputs``, checked against the golden's fingerprint."""
    e = gold.extra
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in range(e["n_tasks"]):
        for s in range(e["steps"]):
            out[f"x/t{t}s{s}"] = torch.randn(e["batch"], 3, 64, 64, generator=g)
            out[f"y/t{t}s{s}"] = t * e["classes_per_task"] + torch.randint(0, e["classes_per_task"], (e["batch"],), generator=g)
    out["x_eval"] = torch.randn(6, 3, 64, 64, generator=g)
    for k, v in out.items():
        if k.startswith("y/"):
            assert torch.equal(v, gold[k]), k
        else:
            check = torch.stack([v.double().sum(), v.flatten()[:997].double().sum()])
            torch.testing.assert_close(check, gold[f"check/{k}"], atol=1e-6, rtol=0)
    return out


_VIT = {}


def vit_tiny():
    import timm
    from safetensors.torch import load_file

    if "sd" not in _VIT:
        _VIT["sd"] = {k: v for k, v in load_file(str(VIT_TINY)).items() if not k.startswith("head.")}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=8)
    vit.load_state_dict(_VIT["sd"])
    return vit.eval()


def build(cls, cfg, gold):
    e = gold.extra
    n_classes = e["n_tasks"] * e["classes_per_task"]
    model = Classifier(TimmBackbone(vit_tiny()), e["dim"], n_classes)
    exps = [SimpleNamespace(index=t, classes=torch.arange(t * e["classes_per_task"], (t + 1) * e["classes_per_task"]))
            for t in range(e["n_tasks"])]
    ctx = SimpleNamespace(stream=exps, device=torch.device("cpu"), seed=0, experience=0, experience_iteration=0,
                          n_iterations=e["steps"], class_mask=None)
    strategy = cls(cfg)
    strategy.setup(model, ctx)
    return strategy, model, ctx, exps


def begin_task(strategy, ctx, exps, t: int, n_classes: int, cpt: int) -> None:
    ctx.experience = t
    seen = torch.arange(n_classes) < (t + 1) * cpt
    ctx.class_mask = seen.expand(len(exps), -1).clone()  # class-incremental: every task id sees the seen classes
    strategy.before_experience(exps[t], ctx)


# ----------------------------------------------------------- official parameter names <-> clbench's layout
def official_view(strategy) -> dict[str, torch.Tensor]:
    """clbench's prompt parameters as the official module names them (``prompt.e_p_<l>`` ...), plus the head.
    Values are views / concatenations of clbench's parameters; ``grads=True`` variant below."""
    return _view(strategy, lambda p: p)


def official_grads(strategy) -> dict[str, torch.Tensor]:
    return _view(strategy, lambda p: p.grad if p.grad is not None else torch.zeros_like(p))


def _view(strategy, f) -> dict[str, torch.Tensor]:
    out, pr = {}, strategy.prompt
    if isinstance(strategy, CodaPrompt):
        for j, layer in enumerate(pr.layers):
            out[f"prompt.e_p_{layer}"] = torch.cat([f(c)[j] for c in pr.prompts])
            out[f"prompt.e_k_{layer}"] = torch.cat([f(c)[j] for c in pr.keys])
            out[f"prompt.e_a_{layer}"] = torch.cat([f(c)[j] for c in pr.attn])
    elif isinstance(strategy, DualPrompt):
        for j, layer in enumerate(pr.g.layers):
            out[f"prompt.g_p_{layer}"] = f(pr.g.prompts[0])[j, 0]
        keys = f(pr.e.keys[0])
        for j, layer in enumerate(pr.e.layers):
            out[f"prompt.e_p_{layer}"] = f(pr.e.prompts[0])[j]
            out[f"prompt.e_k_{layer}"] = keys[j if keys.shape[0] > 1 else 0]
    else:
        keys = f(pr.keys[0])
        for j, layer in enumerate(pr.layers):
            out[f"prompt.e_p_{layer}"] = f(pr.prompts[0])[j]
            out[f"prompt.e_k_{layer}"] = keys[j if keys.shape[0] > 1 else 0]
    head = strategy.model.head
    out["last.weight"], out["last.bias"] = f(head.weight), f(head.bias)
    return out


@torch.no_grad()
def load_official(strategy, gold, prefix: str) -> None:
    """Copy the golden's parameters ``<prefix>/<official name>`` into clbench's (shared keys: block 0's)."""
    pr = strategy.prompt
    if isinstance(strategy, CodaPrompt):
        m = pr.chunk
        for j, layer in enumerate(pr.layers):
            for plist, kind in ((pr.prompts, "p"), (pr.keys, "k"), (pr.attn, "a")):
                full = gold[f"{prefix}/prompt.e_{kind}_{layer}"]
                for c, param in enumerate(plist):
                    param[j].copy_(full[c * m:(c + 1) * m])
    elif isinstance(strategy, DualPrompt):
        for j, layer in enumerate(pr.g.layers):
            pr.g.prompts[0][j, 0].copy_(gold[f"{prefix}/prompt.g_p_{layer}"])
        keys = pr.e.keys[0]
        for j, layer in enumerate(pr.e.layers):
            pr.e.prompts[0][j].copy_(gold[f"{prefix}/prompt.e_p_{layer}"])
            if j < keys.shape[0]:
                keys[j].copy_(gold[f"{prefix}/prompt.e_k_{layer}"])
    else:
        keys = pr.keys[0]
        for j, layer in enumerate(pr.layers):
            pr.prompts[0][j].copy_(gold[f"{prefix}/prompt.e_p_{layer}"])
            if j < keys.shape[0]:
                keys[j].copy_(gold[f"{prefix}/prompt.e_k_{layer}"])
    strategy.model.head.weight.copy_(gold[f"{prefix}/last.weight"])
    strategy.model.head.bias.copy_(gold[f"{prefix}/last.bias"])


# --------------------------------------------------------------------------------- selections / weights
def l2p_selection(strategy, x) -> torch.Tensor:
    """[key sets, B, k]: the prompts selected (one key set, or one per block with key_sharing per_layer)."""
    return torch.stack([idx for _, idx in strategy.selections(strategy.query(x))])


def dualprompt_selection(strategy, x) -> torch.Tensor:
    """[n_e_blocks, B, 1]: the E-prompt each E-prompt block uses at inference."""
    q, keys = strategy.query(x), strategy.prompt.e.all_keys()
    idx = torch.stack([cosine_to_keys(q, k).argmax(1) for k in keys])
    return idx.expand(len(strategy.prompt.e.layers), -1)[..., None]


def coda_alpha(strategy, x, train: bool) -> torch.Tensor:
    _, k, a = strategy.components(train)
    return strategy.weights(strategy.query(x), k, a).transpose(0, 1)  # [blocks, B, M']


# ------------------------------------------------------------------------------------------- the run
def run(strategy, ctx, exps, gold, tag: str, inputs, *, start_t1=None, check_keys=True, check_eval=True,
        on_step=None):
    """Train clbench's strategy through the golden's case and compare every recorded quantity.

    Before every step the parameters are set to the official ones before that step (the initial ones, then
    the golden's post-step ones), so each step is compared from the same state and Adam's amplification of
    float noise in near-zero gradients (``TOL['param']``) does not carry over; clbench's own Adam update is
    compared with the official one after every step."""
    e = gold.extra
    n_classes, cpt, steps = e["n_tasks"] * e["classes_per_task"], e["classes_per_task"], e["cases"][tag]["steps"]
    key_names = ("e_k_",) if not check_keys else ()
    prev = f"{tag}/init"
    for t in range(e["n_tasks"]):
        begin_task(strategy, ctx, exps, t, n_classes, cpt)
        for s in range(steps):
            key = f"{tag}/t{t}s{s}"
            load_official(strategy, gold, prev)
            if s == 0 and t > 0 and start_t1 is not None:  # clbench's re-initialisation of the new components,
                start_t1(strategy)  # then the official one (float32 Gram-Schmidt) to continue from the same state
                for name, p in official_view(strategy).items():
                    close(p, gold[f"{tag}/t{t}/start/{name}"], "gs", f"{tag}/t{t}/start/{name}")
                load_official(strategy, gold, f"{tag}/t{t}/start")
            if s == 0:
                opt = torch.optim.Adam(strategy.param_groups(), lr=e["lr"], betas=tuple(e["adam_betas"]))
            x, y = inputs[f"x/t{t}s{s}"], inputs[f"y/t{t}s{s}"]
            batch = Batch(x, y, torch.full_like(y, t))
            ctx.experience_iteration = s
            if f"{key}/topk" in gold.tensors and isinstance(strategy, L2P):
                assert torch.equal(l2p_selection(strategy, x), gold[f"{key}/topk"]), f"{key}: selection"
            if f"{key}/alpha" in gold.tensors:
                close(coda_alpha(strategy, x, train=True), gold[f"{key}/alpha"], "alpha", f"{key}/alpha")
            strategy.model.zero_grad(set_to_none=True)  # also the frozen chunks' stale .grad (not in opt)
            out = strategy.forward(x, batch, ctx)
            loss = strategy.loss(out, batch, ctx)
            loss.backward()
            close(out.logits, gold[f"{key}/logits"], "logits", f"{key}/logits")
            if on_step is not None:
                on_step(key, out, loss)
            else:
                aux = out.aux_loss if out.aux_loss is not None else torch.zeros(())
                close(aux.reshape(1), gold[f"{key}/prompt_loss"], "loss", f"{key}/prompt_loss")
                close(loss, gold[f"{key}/loss"], "loss", f"{key}/loss")
            for name, g in official_grads(strategy).items():
                if any(k in name for k in key_names) or f"{key}/grad/{name}" not in gold.tensors:
                    continue
                close(g, gold[f"{key}/grad/{name}"], "grad", f"{key}/grad/{name}")
            opt.step()
            for name, p in official_view(strategy).items():
                if not any(k in name for k in key_names):
                    close(p, gold[f"{key}/after/{name}"], "param", f"{key}/after/{name}")
            prev = f"{key}/after"
        if check_eval:
            load_official(strategy, gold, prev)
            x_eval = inputs["x_eval"]
            close(strategy.predict(x_eval), gold[f"{tag}/t{t}/eval/logits"], "logits", f"{tag}/t{t}/eval/logits")
            if isinstance(strategy, L2P):
                assert torch.equal(l2p_selection(strategy, x_eval), gold[f"{tag}/t{t}/eval/topk"])
            if isinstance(strategy, DualPrompt):
                assert torch.equal(dualprompt_selection(strategy, x_eval), gold[f"{tag}/t{t}/eval/topk"])
            if isinstance(strategy, CodaPrompt):
                close(coda_alpha(strategy, x_eval, train=False), gold[f"{tag}/t{t}/eval/alpha"], "alpha", "eval alpha")


# --------------------------------------------------------------------------------------------- tests
def test_goldens_name_their_source():
    for name in ("coda_prompt_l2p", "coda_prompt_l2p_deep", "coda_prompt_dualprompt", "coda_prompt_coda",
                 "coda_prompt_schedule"):
        gold = load_golden(name)
        assert gold.repository == "GT-RIPL/CODA-Prompt" and gold.commit.startswith("6417d4f")
        assert gold.script == "tools/reference/coda_prompt.py" and gold.files


def l2p_cfg(gold, **kw) -> L2PConfig:
    pool, length, _ = gold.extra["cases"]["l2p"]["prompt_param"]
    return L2PConfig(pool_size=pool, length=length, top_k=5, layers=[0], **kw)


def test_l2p_parity_mode_equals_the_coda_code():
    gold = load_golden("coda_prompt_l2p")
    inputs = case_inputs(gold)
    strategy, _, ctx, exps = build(L2P, l2p_cfg(gold, key_loss_gather=True, key_loss_reduction="sum"), gold)
    run(strategy, ctx, exps, gold, "l2p", inputs)


def test_l2p_paper_mode_same_prompts_and_logits_other_key_loss():
    """Default key loss (mean over each query's own selection): the prompts, selections and logits follow the
    golden (the key loss does not reach them); the key loss and the keys' gradients do not."""
    gold = load_golden("coda_prompt_l2p")
    inputs = case_inputs(gold)
    strategy, _, ctx, exps = build(L2P, l2p_cfg(gold), gold)
    seen = []

    def on_step(key, out, loss):
        seen.append((float(out.aux_loss.detach()), float(gold[f"{key}/prompt_loss"])))

    run(strategy, ctx, exps, gold, "l2p", inputs, check_keys=False, on_step=on_step)
    for ours, official in seen:
        assert ours < 1 and official > 10 * ours  # mean of B*k own terms vs the sum of B*B*k gathered terms


def test_deep_l2p_per_layer_keys_parity_mode_equals_the_coda_code():
    """Deep L2P++ (``prompt_param [.., .., 1]``: blocks 0-4, keys per block): ``key_sharing: per_layer``."""
    gold = load_golden("coda_prompt_l2p_deep")
    inputs = case_inputs(gold)
    pool, length, _ = gold.extra["cases"]["l2p_deep"]["prompt_param"]
    sel = gold["l2p_deep/t0s0/topk"]
    assert any(not torch.equal(sel[0], sel[j]) for j in range(1, 5)), "the blocks' selections must differ"
    cfg = L2PConfig(pool_size=pool, length=length, top_k=5, layers=[0, 1, 2, 3, 4], key_loss_gather=True,
                    key_loss_reduction="sum", key_sharing="per_layer")
    strategy, _, ctx, exps = build(L2P, cfg, gold)
    run(strategy, ctx, exps, gold, "l2p_deep", inputs)


def test_deep_l2p_shared_keys_differs_from_the_coda_code():
    """Shared keys (block 0's official keys select for every block): the logits of the first step differ."""
    gold = load_golden("coda_prompt_l2p_deep")
    inputs = case_inputs(gold)
    pool, length, _ = gold.extra["cases"]["l2p_deep"]["prompt_param"]
    cfg = L2PConfig(pool_size=pool, length=length, top_k=5, layers=[0, 1, 2, 3, 4], key_loss_gather=True,
                    key_loss_reduction="sum")
    strategy, _, ctx, exps = build(L2P, cfg, gold)
    begin_task(strategy, ctx, exps, 0, 4, 2)
    load_official(strategy, gold, "l2p_deep/init")
    x, y = inputs["x/t0s0"], inputs["y/t0s0"]
    assert torch.equal(l2p_selection(strategy, x)[0], gold["l2p_deep/t0s0/topk"][0])
    out = strategy.forward(x, Batch(x, y, torch.zeros_like(y)), SimpleNamespace(**vars(ctx)))
    assert (out.logits - gold["l2p_deep/t0s0/logits"]).abs().max() > 1e-3


def dual_cfg(gold, **kw) -> DualPromptConfig:
    pool, e_len, g_len = gold.extra["cases"]["dualprompt"]["prompt_param"]
    return DualPromptConfig(g_length=g_len, g_layers=[0, 1], e_length=e_len, e_layers=[2, 3, 4], e_pool_size=pool, **kw)


def test_dualprompt_per_layer_keys_parity_mode_equals_the_coda_code():
    gold = load_golden("coda_prompt_dualprompt")
    inputs = case_inputs(gold)
    sel = gold["dualprompt/t1/eval/topk"]
    assert not torch.equal(sel[0], sel[1]), "the case must make the blocks' selections differ"
    strategy, _, ctx, exps = build(DualPrompt, dual_cfg(gold, key_sharing="per_layer", key_loss_reduction="sum"), gold)
    assert strategy.prompt.e.keys[0].shape[0] == 3
    run(strategy, ctx, exps, gold, "dualprompt", inputs)


def test_dualprompt_shared_keys_paper_mode_differs_where_the_blocks_disagree():
    """Shared keys (paper/JAX), loaded with block 2's official keys: training (task id picks the E-prompt)
    gives the golden's logits and prompt gradients; at inference every block uses block 2's selection, so
    the logits equal the golden's exactly for the samples whose official blocks agreed and differ for the others."""
    gold = load_golden("coda_prompt_dualprompt")
    inputs = case_inputs(gold)
    strategy, _, ctx, exps = build(DualPrompt, dual_cfg(gold), gold)
    assert strategy.prompt.e.keys[0].shape[0] == 1

    def on_step(key, out, loss):  # the key loss: mean over the batch of block 2's term only
        assert float(out.aux_loss.detach()) < float(gold[f"{key}/prompt_loss"]) / 4

    run(strategy, ctx, exps, gold, "dualprompt", inputs, check_keys=False, check_eval=False, on_step=on_step)
    load_official(strategy, gold, "dualprompt/t1s1/after")  # shared keys: block 2's
    official = gold["dualprompt/t1/eval/topk"][..., 0]  # [blocks, B]
    agree = (official == official[0]).all(0)
    assert agree.any() and not agree.all()
    assert torch.equal(dualprompt_selection(strategy, inputs["x_eval"])[0, :, 0], official[0])
    logits = strategy.predict(inputs["x_eval"])
    ref = gold["dualprompt/t1/eval/logits"]
    close(logits[agree], ref[agree], "logits", "agreeing samples")
    assert ((logits[~agree] - ref[~agree]).abs().amax(1) > 2e-4).all()  # 10x the logits' tolerance


def coda_cfg(gold, tag="coda", **kw) -> CodaPromptConfig:
    pool, length, mu = gold.extra["cases"][tag]["prompt_param"]
    return CodaPromptConfig(pool_size=pool, length=length, layers=[0, 1, 2, 3, 4], ortho_mu=mu, **kw)


def _gs_start(gold):
    draws = {k: gold[f"coda/t1/gs_draws/{k}"] for k in "pka"}

    def start(strategy):
        strategy.orthogonalise(1, 0, draws=draws)  # the official draws, clbench's Gram-Schmidt
    return start


@pytest.mark.parametrize("tag", ["coda", "coda_ortho"])
def test_coda_prompt_equals_the_coda_code(tag):
    """Two tasks; task 1's new components by clbench's ``released`` Gram-Schmidt from the official draws
    against the trained task-0 components (``coda_ortho``: with the orthogonality penalty)."""
    gold = load_golden("coda_prompt_coda")
    inputs = case_inputs(gold)
    strategy, _, ctx, exps = build(CodaPrompt, coda_cfg(gold, tag, gram_schmidt="released"), gold)
    if tag == "coda_ortho":  # same seed as "coda": its initial parameters are stored once
        gold.tensors.update({k.replace("coda/init/", "coda_ortho/init/"): v for k, v in gold.tensors.items()
                             if k.startswith("coda/init/")})
    run(strategy, ctx, exps, gold, tag, inputs, start_t1=_gs_start(gold))


def test_coda_prompt_task_increment_gram_schmidt():
    """The official task-1 components from its draws: ``released`` reproduces them; ``exact`` is orthonormal
    to the old span and differs from them because one Adam step on task 0 broke the old ones' orthogonality."""
    gold = load_golden("coda_prompt_coda")
    draws = {k: gold[f"coda/t1/gs_draws/{k}"] for k in "pka"}
    out = {}
    for mode in ("released", "exact"):
        strategy, _, ctx, exps = build(CodaPrompt, coda_cfg(gold, gram_schmidt=mode), gold)
        load_official(strategy, gold, "coda/t0s1/after")
        strategy.task = 1
        strategy.orthogonalise(1, 0, draws=draws)
        out[mode] = official_view(strategy)
    for layer in range(5):
        for kind in "pka":
            name = f"prompt.e_{kind}_{layer}"
            official = gold[f"coda/t1/start/{name}"]
            m = official.shape[0] // 2
            ours = out["released"][name]
            assert torch.equal(ours[:m], official[:m])  # old components unchanged
            close(ours[m:], official[m:], "gs", f"released {name}")
            new, old = out["exact"][name][m:].reshape(m, -1).double(), official[:m].reshape(m, -1).double()
            q = torch.linalg.qr(old.t()).Q
            assert (new @ q).abs().max() < 1e-6 and (new.norm(dim=1) - 1).abs().max() < 1e-6
            rel = official[m:].reshape(m, -1).double()
            assert (rel @ q).abs().max() > 1e-5  # the released components are not orthogonal to the old span


@pytest.mark.parametrize("mode", ["released", "exact"])
def test_coda_prompt_task0_orthogonal_init(mode):
    """Task 0's components (the official ``__init__``'s Gram-Schmidt of its draws, no old components): both
    modes give the official ones (they differ only in how old components are projected out)."""
    gold = load_golden("coda_prompt_coda")
    draws = {k: gold[f"coda/t0/gs_draws/{k}"] for k in "pka"}
    strategy, _, ctx, exps = build(CodaPrompt, coda_cfg(gold, gram_schmidt=mode), gold)
    strategy.orthogonalise(0, 0, draws=draws)
    ours = official_view(strategy)
    for layer in range(5):
        for kind in "pka":
            name = f"prompt.e_{kind}_{layer}"
            m = gold[f"coda/init/{name}"].shape[0] // 2
            close(ours[name][:m], gold[f"coda/init/{name}"][:m], "gs", f"{mode} {name}")


def test_coda_cosine_schedule_equals_the_coda_code():
    """``train.scheduler: coda_cosine`` stepped per iteration gives ``CosineSchedule``'s lr in every epoch."""
    from clbench.config import SCHEDULERS
    from conftest import lr_per_iteration

    assert "coda_cosine" in SCHEDULERS
    gold = load_golden("coda_prompt_schedule")
    base, per_epoch = gold.extra["base_lr"], 3
    for K in gold.extra["Ks"]:
        lrs = lr_per_iteration("coda_cosine", K * per_epoch, per_epoch, lr=base)
        per_iter = torch.tensor(lrs, dtype=torch.float64).reshape(K, per_epoch)
        assert torch.equal(per_iter, per_iter[:, :1].expand(-1, per_epoch)), "lr must be constant within an epoch"
        torch.testing.assert_close(per_iter[:, 0], gold[f"lr/K{K}"], atol=1e-15, rtol=1e-12,
                                   msg=lambda m: f"K={K}: {m}")
        # the official schedule: epochs 0 and 1 both at the base lr, then cos(99 pi (e - 1) / (200 (K - 1)))
        e = torch.arange(K, dtype=torch.float64)
        want = base * torch.cos(99 * math.pi * (e - 1).clamp(min=0) / (200 * (K - 1)))
        torch.testing.assert_close(gold[f"lr/K{K}"], want, atol=1e-15, rtol=1e-12)


def test_coda_code_repro_configs_turn_the_tested_parity_modes_on():
    """The configs that follow the CODA code use the modes the goldens above check, and its schedule."""
    from pathlib import Path

    from clbench.config import load_config

    repro = Path(__file__).resolve().parents[1] / "configs" / "repro"
    want = {"coda_prompt_imagenet_r.yaml": {"name": "coda_prompt", "gram_schmidt": "released", "ortho_mu": 0.0},
            "coda_prompt_l2p_pp_imagenet_r.yaml": {"name": "l2p", "key_loss_gather": True, "key_loss_reduction": "sum",
                                                   "layers": [0], "top_k": 5},
            "coda_prompt_dualprompt_imagenet_r.yaml": {"name": "dualprompt", "key_sharing": "per_layer",
                                                       "key_loss_reduction": "sum", "train_task_id": True}}
    for file, fields in want.items():
        cfg = load_config(repro / file, [])
        assert {k: getattr(cfg.strategy, k) for k in fields} == fields, file
        assert (cfg.train.scheduler, cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size) == ("coda_cosine", "adam", 0.001, 128)
    assert load_config(repro / "dualprompt_imagenet_r.yaml", []).strategy.key_sharing == "shared"  # paper / JAX
