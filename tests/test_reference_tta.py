"""Reference equivalence of clbench's CoTTA, TENT and BN-adapt with the released code
(``qinenergy/cotta`` @ c212a20, ``cifar/cotta.py``, ``cifar/tent.py``, ``cifar/norm.py``).

The goldens ``cotta``, ``tent`` and ``bn_adapt`` were written by ``tools/reference/cotta.py``, which
runs the official wrappers on a tiny BatchNorm CNN over 4 test batches (see its docstring).  Here the
same case is rebuilt with clbench's strategies, stepped as the engine's test-time loop does
(``forward`` -> ``loss`` -> Adam step -> ``after_step``), and compared step by step.

CoTTA's stochastic parts are compared with **matched RNG**: before each step the global torch RNG is
set to the official run's state (clbench's ``TTAAugment`` draws its random parameters from it in the
order of the official ``get_tta_transforms`` chain) and the strategy's restore generator to the state
the official restore masks were drawn from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clbench.strategy import Batch, Context
from clbench.strategies.bn_adapt import BNAdapt, BNAdaptConfig
from clbench.strategies.cotta import CoTTA, CoTTAConfig
from clbench.strategies.tent import Tent, TentConfig
from clbench.transforms import Preprocess
from reference_golden import load_golden

pytestmark = pytest.mark.usefixtures("one_thread")

# Tolerances.  Seen on the generating machine: pseudo-labels within 2e-7 (32 augmentations through clbench's
# batched re-implementation of the torchvision ops), weights within 4e-7, bit-exact on the plain-teacher steps
# and for TENT / BN-adapt.  The bounds are wider because Adam divides by sqrt(v): a weight whose gradient is
# nearly zero moves by ~lr whatever the gradient's rounding, so a 1-ulp difference upstream (another CPU's
# conv kernels; a mathematically equal EMA formula) can move it by up to ~3e-5 (lr 1e-3); ``_close`` also
# requires 98% of the elements to agree within 1e-6.
LOGITS = dict(atol=5e-5, rtol=1e-5)
PARAMS = dict(atol=1e-4, rtol=1e-4)


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **PARAMS, msg=lambda m: f"{what}: {m}")
    far = (actual - expected).abs() > 1e-6 + 1e-5 * expected.abs()
    assert far.float().mean() <= 0.02, f"{what}: {int(far.sum())} of {far.numel()} elements beyond 1e-6"


def tiny_bn_cnn() -> nn.Module:
    """The golden's model (same definition as in tools/reference/cotta.py)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _setup(golden, strategy):
    model = tiny_bn_cnn()
    model.load_state_dict({k[len("init."):]: v for k, v in golden.tensors.items() if k.startswith("init.")})
    ctx = Context(stream=None, device=torch.device("cpu"), seed=0,  # type: ignore[arg-type]
                  preprocess=Preprocess((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))  # the model takes x / 255
    strategy.setup(model, ctx)
    groups = strategy.param_groups()
    optimizer = torch.optim.Adam(groups[0]["params"], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0) if groups else None
    return model, ctx, optimizer


def _step(strategy, x, ctx, optimizer):
    """One batch as the engine's ``_adapt_experience`` runs it."""
    batch = Batch(x, torch.full((len(x),), -1), torch.zeros(len(x), dtype=torch.long))
    scores = strategy.forward(ctx.inputs(x), batch, ctx)
    loss = strategy.loss(scores, batch, ctx)
    if loss is not None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    strategy.after_step(batch, ctx)
    return scores.detach()


def _cotta(golden, **overrides):
    e = golden.extra
    cfg = CoTTAConfig(ema=e["mt_alpha"], restore_p=e["rst_m"], threshold=e["ap"], n_augmentations=e["n_augmentations"],
                      **overrides)
    strategy = CoTTA(cfg)
    model, ctx, optimizer = _setup(golden, strategy)
    return strategy, model, ctx, optimizer


def test_cotta_matches_released_code_step_by_step():
    """Default (= released CIFAR code) mode: pseudo-label/prediction, student, EMA teacher and the
    restore masks after each of 4 steps, two with the augmentation-averaged pseudo-label."""
    g = load_golden("cotta")
    assert (g.repository, g.commit) == ("qinenergy/cotta", "c212a20")
    strategy, model, ctx, optimizer = _cotta(g)
    assert all(m.running_mean is None for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert sorted(g.extra["gated"]) == [False, False, True, True]  # both pseudo-label branches are exercised
    for t in range(g.extra["steps"]):
        torch.set_rng_state(g[f"rng_before.{t}"])
        strategy.generator.set_state(g[f"rng_restore.{t}"])
        x = g["images"][t]
        batch = Batch(x, torch.full((len(x),), -1), torch.zeros(len(x), dtype=torch.long))
        scores = strategy.forward(ctx.inputs(x), batch, ctx).detach()
        if g.extra["gated"][t]:  # 32 augmentations drew exactly the official chain's random numbers
            assert torch.equal(torch.get_rng_state(), g[f"rng_restore.{t}"]), t
        torch.testing.assert_close(strategy._student.detach(), g[f"student_logits.{t}"], **LOGITS)
        torch.testing.assert_close(scores, g[f"outputs.{t}"], **LOGITS)
        assert torch.equal(scores.argmax(1), g[f"outputs.{t}"].argmax(1))
        loss = strategy.loss(scores, batch, ctx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trained = [p.detach().clone() for p in strategy.params]
        strategy.after_step(batch, ctx)
        # which weights were restored to the source: exactly the official Bernoulli masks (checked where
        # the Adam step had moved the weight, i.e. where a restore is visible)
        after = torch.cat([p.detach().flatten() for p in strategy.params])
        moved = torch.cat([(q != s).flatten() for q, s in zip(trained, strategy.source)])
        source = torch.cat([s.flatten() for s in strategy.source])
        mask = g[f"restore_mask.{t}"].bool()
        assert moved.float().mean() > 0.9
        assert torch.equal((after == source)[moved], mask[moved]), t
        for name, p in model.named_parameters():
            _close(p.detach(), g[f"student.{t}.{name}"], f"step {t} student {name}")
        for name, p in strategy.teacher.named_parameters():
            _close(p.detach(), g[f"teacher.{t}.{name}"], f"step {t} teacher {name}")


def test_cotta_restore_masks_come_from_the_matched_generator():
    """With the official restore state and restore probability 1 / 0.1, clbench's masks are the
    official ``torch.rand(p.shape) < rst`` masks, element for element."""
    from clbench.strategies.cotta import stochastic_restore

    g = load_golden("cotta")
    for t in range(g.extra["steps"]):
        params = [p.clone() for p in (g[f"student.{t}.{n}"] for n in _names(g))]
        marker = [torch.full_like(p, float("nan")) for p in params]
        gen = torch.Generator().manual_seed(0)
        gen.set_state(g[f"rng_restore.{t}"])
        stochastic_restore(params, marker, g.extra["rst_m"], gen)
        drawn = torch.cat([p.isnan().flatten() for p in params])
        assert torch.equal(drawn, g[f"restore_mask.{t}"].bool()), t


def _names(g):
    return [k[len("student.0."):] for k in g.tensors if k.startswith("student.0.")]


def test_cotta_predict_student_mode_scores_the_student_and_trains_the_same():
    """``predict=student`` (a non-code mode) returns the student's pre-update logits; the update is the
    code's (same pseudo-labels), so the parameters still equal the golden's."""
    g = load_golden("cotta")
    strategy, model, ctx, optimizer = _cotta(g, predict="student")
    for t in range(2):
        torch.set_rng_state(g[f"rng_before.{t}"])
        strategy.generator.set_state(g[f"rng_restore.{t}"])
        scores = _step(strategy, g["images"][t], ctx, optimizer)
        torch.testing.assert_close(scores, g[f"student_logits.{t}"], **LOGITS)
        for name, p in model.named_parameters():
            _close(p.detach(), g[f"student.{t}.{name}"], f"step {t} student {name}")


def test_cotta_probability_average_differs_from_the_code_where_it_must():
    """``average=probs`` (not the code): the augmented step's pseudo-label is log of the mean softmax, not
    the mean logits, so it differs from the golden; the plain-teacher step only by a log-softmax shift."""
    g = load_golden("cotta")
    strategy, model, ctx, optimizer = _cotta(g, average="probs")
    first = g.extra["gated"].index(True)
    for t in range(first + 1):  # plain-teacher steps train identically (softmax of a log-softmax is the softmax)
        torch.set_rng_state(g[f"rng_before.{t}"])
        strategy.generator.set_state(g[f"rng_restore.{t}"])
        scores = _step(strategy, g["images"][t], ctx, optimizer)
        if t < first:
            torch.testing.assert_close(scores, g[f"outputs.{t}"].log_softmax(1), **LOGITS)
    assert not torch.allclose(scores.log_softmax(1), g[f"outputs.{first}"].log_softmax(1), atol=1e-4)


def test_tent_matches_released_code_step_by_step():
    g = load_golden("tent")
    assert (g.repository, g.commit) == ("qinenergy/cotta", "c212a20")
    strategy = Tent(TentConfig())
    model, ctx, optimizer = _setup(g, strategy)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(g.extra["steps"]):
        scores = _step(strategy, g["images"][t], ctx, optimizer)
        torch.testing.assert_close(scores, g[f"outputs.{t}"], **LOGITS)
        assert torch.equal(scores.argmax(1), g[f"outputs.{t}"].argmax(1))
        for name, p in model.named_parameters():
            _close(p.detach(), g[f"params.{t}.{name}"], f"step {t} {name}")
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, init[n])}
    assert moved == {"1.weight", "1.bias", "4.weight", "4.bias"}  # BN affine only, as in the code


def test_bn_adapt_matches_released_norm_predictions():
    """``Norm`` keeps updating running statistics (momentum 0.1) that train-mode BN never uses; clbench
    removes them instead (``strategies/bn_adapt.py``), so only the predictions are compared (and the
    golden's statistics are checked to have moved, i.e. the case would notice a model that used them)."""
    g = load_golden("bn_adapt")
    assert (g.repository, g.commit) == ("qinenergy/cotta", "c212a20")
    strategy = BNAdapt(BNAdaptConfig())
    model, ctx, _ = _setup(g, strategy)
    assert all(m.running_mean is None for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    for t in range(g.extra["steps"]):
        scores = _step(strategy, g["images"][t], ctx, None)
        torch.testing.assert_close(scores, g[f"outputs.{t}"], atol=1e-6, rtol=1e-6)
        assert torch.equal(scores.argmax(1), g[f"outputs.{t}"].argmax(1))
    assert not torch.allclose(g["stats.3.1.running_mean"], g["init.1.running_mean"])
    source = tiny_bn_cnn()
    source.load_state_dict({k[len("init."):]: v for k, v in g.tensors.items() if k.startswith("init.")})
    with torch.no_grad():
        eval_mode = source.eval()(g["images"][0].float() / 255)
    assert not torch.allclose(eval_mode, g["outputs.0"], atol=1e-3)  # running statistics would change the answer
