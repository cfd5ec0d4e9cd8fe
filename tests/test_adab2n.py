"""AdaB2N (clbench/norms.py) and the base methods it is evaluated with (strategies/er_ace.py,
strategies/der.py): statistics against a hand computation, equality with BatchNorm2d, the
swap, ER-ACE's masks, DER++'s stored logits, and tiny online runs through the engine."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from clbench.registry import ClbenchError
from torch import nn

from clbench.config import component_config, load_config
from clbench.engine import Engine
from clbench.models import build_model
from clbench.norms import AdaB2N, adab2n_layers, sample_tasks, statistics_loss, swap_batchnorm
from clbench.strategy import Batch, Context
from clbench.transforms import Preprocess
from clbench.scenarios import build_stream


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


# --------------------------------------------------------------------------- the layer


def _hand_stats(x: torch.Tensor, a: list[float]) -> tuple[list[float], list[float]]:
    """Weighted mean and biased variance per channel, by explicit loops over the values."""
    b, c, h, w = x.shape
    means, variances = [], []
    for ch in range(c):
        mu = sum(a[i] * sum(x[i, ch].flatten().tolist()) / (h * w) for i in range(b))
        var = sum(a[i] * sum((v - mu) ** 2 for v in x[i, ch].flatten().tolist()) / (h * w) for i in range(b))
        means.append(mu)
        variances.append(var)
    return means, variances


def test_statistics_and_running_update_match_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 1, 3, generator=g) * 2 + 1  # B=4, C=2, HW=3
    task = torch.tensor([0, 0, 0, 1])
    layer = AdaB2N(2, num_tasks=3, kappa=0.5, momentum=0.1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, 0.5]))
        layer.bias.copy_(torch.tensor([0.2, -0.3]))
        layer.task_weight.copy_(torch.tensor([0.0, math.log(2.0), 5.0]))  # alpha = (1, 2, e^5); task 2 absent
    # posterior over the present tasks: (1 + 3, 2 + 1) / 7 -> per sample (4/7)/3 for task 0, 3/7 for task 1
    a = [4 / 21, 4 / 21, 4 / 21, 3 / 7]
    mu, var = _hand_stats(x, a)
    with sample_tasks(layer, task, current_task=1):
        torch.testing.assert_close(layer.sample_weights(4, x.device), torch.tensor(a))
        out = layer(x)
    expected = torch.empty_like(x)
    for ch in range(2):
        expected[:, ch] = (x[:, ch] - mu[ch]) / math.sqrt(var[ch] + layer.eps) * layer.weight[ch] + layer.bias[ch]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    eta1 = 0.1 ** 0.5
    corr = 1 / (1 - sum(ai * ai for ai in a) / 3)  # unbiased for weights a_i / HW per value
    run_mean = [eta1 * m for m in mu]
    run_var = [(1 - eta1) * 1.0 + eta1 * v * corr for v in var]
    torch.testing.assert_close(layer.running_mean, torch.tensor(run_mean), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var, torch.tensor(run_var), rtol=1e-5, atol=1e-6)
    reg = sum((m - r) ** 2 for m, r in zip(mu, run_mean)) / 2 + sum((v * corr - r) ** 2 for v, r in zip(var, run_var)) / 2
    assert float(statistics_loss(layer).detach()) == pytest.approx(reg, rel=1e-4)
    assert statistics_loss(layer) is None  # consumed

    # second step: eta_2 = eta_1 / (eta_1 + (1 - m)^kappa)
    x2 = torch.randn(4, 2, 1, 3, generator=g)
    with sample_tasks(layer, task, current_task=1):
        layer(x2)
    eta2 = eta1 / (eta1 + 0.9 ** 0.5)
    assert float(layer.eta) == pytest.approx(eta2, rel=1e-12)
    mu2, _ = _hand_stats(x2, a)
    torch.testing.assert_close(layer.running_mean, torch.tensor([(1 - eta2) * r + eta2 * m for r, m in zip(run_mean, mu2)]),
                               rtol=1e-5, atol=1e-6)


def test_released_variant_keeps_absent_tasks_mass_and_biased_variance():
    x = torch.arange(12.0).view(4, 1, 1, 3)
    task = torch.tensor([0, 0, 1, 1])
    layer = AdaB2N(1, num_tasks=3, kappa=1.0, variant="released")
    with sample_tasks(layer, task, current_task=2):  # task 2 is seen so far but absent from the batch
        weights = layer.sample_weights(4, x.device)
        layer(x)
    # concentration (1 + 2, 1 + 2, 1 + 0) / 7: the samples' weights sum to 6/7, not 1
    torch.testing.assert_close(weights, torch.full((4,), 3 / 14))
    mu, var = _hand_stats(x, weights.tolist())
    torch.testing.assert_close(layer.running_mean, torch.tensor([0.1 * mu[0]]))
    torch.testing.assert_close(layer.running_var, torch.tensor([0.9 + 0.1 * var[0]]))  # no Bessel factor
    paper = AdaB2N(1, num_tasks=3, kappa=1.0)
    with sample_tasks(paper, task, current_task=2):
        torch.testing.assert_close(paper.sample_weights(4, x.device), torch.full((4,), 0.25))


@pytest.mark.parametrize("kappa,expected", [(1.0, lambda t: 0.1), (0.0, lambda t: 1.0 / t)])
def test_momentum_limits(kappa, expected):
    layer = AdaB2N(1, num_tasks=1, kappa=kappa)
    for t in range(1, 6):
        layer(torch.randn(3, 1, 2, 2))
        assert float(layer.eta) == pytest.approx(expected(t), rel=1e-12)


@pytest.mark.parametrize("with_tasks", [True, False])
def test_equals_batchnorm_when_kappa_is_1_and_tasks_are_balanced(with_tasks):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    ada = AdaB2N.from_batchnorm(copy.deepcopy(bn), num_tasks=4, kappa=1.0)
    task = torch.tensor([0, 0, 1, 1, 2, 2])  # balanced; equal task weights (init 0)
    for _ in range(3):
        x = (torch.randn(6, 3, 4, 5) * 2 + 1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        ref = bn(x)
        with sample_tasks(ada, task if with_tasks else None, current_task=2):
            out = ada(x2)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        upstream = torch.randn_like(ref)
        ref.backward(upstream)
        out.backward(upstream)
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ada.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ada.running_mean, bn.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ada.running_var, bn.running_var, rtol=1e-6, atol=1e-7)
    assert int(ada.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    bn.eval(), ada.eval()
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(ada(x), bn(x))
    # and imbalanced tasks do change the statistics
    ada.train()
    with sample_tasks(ada, torch.tensor([0, 0, 0, 0, 0, 1]), current_task=1):
        out = ada(torch.randn(6, 3, 4, 5))
    assert ada.task_weight.requires_grad and out.requires_grad


def test_swap_replaces_every_batchnorm_and_keeps_parameters():
    torch.manual_seed(0)
    model = build_model(component_config(load_config(None, ["model=resnet18", "model.nf=4"]).model), (3, 8, 8), 10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(), m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(5, 3, 8, 8)
    model.eval()
    ref = model(x)
    assert swap_batchnorm(model, num_tasks=5, kappa=0.4) == n_bn == 20
    assert not [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    assert len(adab2n_layers(model)) == n_bn
    after = model.state_dict()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, msg=k)
    assert {k for k in after if k not in before} == {k for k in after if k.endswith(("task_weight", "eta"))}
    assert sum(k.endswith("task_weight") for k in after) == n_bn  # trained by the optimiser: parameters
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.endswith("task_weight") for n in names) == n_bn
    torch.testing.assert_close(model(x), ref)  # evaluation: the same running statistics
    assert swap_batchnorm(model, num_tasks=5) == 0  # idempotent


# --------------------------------------------------------------------------- strategies


def _ctx(n_tasks: int = 2) -> Context:
    stream = build_stream(component_config(load_config(None, [f"scenario.n_tasks={n_tasks}"]).scenario), seed=0)
    ctx = Context(stream=stream, device=torch.device("cpu"), seed=0, preprocess=Preprocess(stream.mean, stream.std))
    ctx.class_mask = stream.class_mask(0)
    return ctx


def _batch(ctx: Context, classes: list[int], n: int, experience: int) -> Batch:
    data = ctx.stream.train
    idx = torch.cat([(data.y == c).nonzero().flatten()[:n] for c in classes])
    return Batch(data.x[idx], data.y[idx], torch.full((idx.numel(),), ctx.stream[experience].task_id))


def _strategy(name: str, ctx: Context, *overrides: str):
    from clbench.registry import STRATEGIES

    cfg = component_config(load_config(None, [f"strategy={name}", *overrides]).strategy)
    strategy = STRATEGIES.get(name).obj(cfg)
    torch.manual_seed(0)
    model = build_model(component_config(load_config(None, ["model=resnet18", "model.nf=4"]).model),
                        ctx.stream.image_shape, ctx.stream.num_classes)
    strategy.setup(model, ctx)
    return strategy


def _step(strategy, batch: Batch, ctx: Context):
    full = strategy.prepare_batch(batch, ctx)
    out = strategy.forward(ctx.inputs(full.x), full, ctx)
    out.retain_grad()
    loss = strategy.loss(out, full, ctx)
    strategy.model.zero_grad()
    loss.backward()
    return full, out, loss


@pytest.mark.parametrize("norm", ["bn", "adab2n"])
def test_er_ace_incoming_gradient_never_reaches_absent_classes(norm):
    ctx = _ctx()  # 2 experiences x 5 classes
    strategy = _strategy("er_ace", ctx, f"strategy.norm={norm}")
    incoming = _batch(ctx, [0, 1], 4, experience=0)  # classes 2..4 seen (allowed) but absent
    full, out, _ = _step(strategy, incoming, ctx)
    assert len(full) == len(incoming)  # empty buffer: no replay yet
    grad = strategy.model.head.weight.grad.abs().sum(1)
    assert (grad[[0, 1]] > 0).all() and (grad[2:] == 0).all()
    strategy.after_step(incoming, ctx)

    ctx.experience, ctx.class_mask = 1, ctx.stream.class_mask(1)
    incoming = _batch(ctx, [5, 6], 3, experience=1)
    full, out, _ = _step(strategy, incoming, ctx)
    n = len(incoming)
    assert len(full) == 2 * n and set(full.y[n:].tolist()) <= {0, 1}
    g = out.grad
    assert (g[:n][:, [5, 6]].abs().sum(0) > 0).all()
    assert (g[:n][:, [0, 1, 2, 3, 4, 7, 8, 9]] == 0).all()  # incoming rows: only present classes
    assert (g[n:][:, [2, 7]].abs().sum(0) > 0).all()  # buffer rows: every seen class
    terms = strategy.last_terms
    assert set(terms) == ({"ce_incoming", "ce_buffer", "norm"} if norm == "adab2n" else {"ce_incoming", "ce_buffer"})


def test_er_ace_released_masks_unmask_unseen_classes():
    ctx = _ctx()
    strategy = _strategy("er_ace", ctx, "strategy.unseen_logits=true")
    _, out, _ = _step(strategy, _batch(ctx, [0, 1], 4, experience=0), ctx)
    g = out.grad.abs().sum(0)
    assert (g[[0, 1]] > 0).all() and (g[2:] > 0).all()  # mask[:, seen.max():] = 1 opens 1..9


@pytest.mark.parametrize("norm", ["bn", "adab2n"])
def test_derpp_stores_insertion_logits_and_alpha_term_is_zero_right_after(norm):
    ctx = _ctx()
    strategy = _strategy("derpp", ctx, f"strategy.norm={norm}", "strategy.buffer_size=100",
                         "strategy.replay_batch_size=6")
    strategy.model.eval()  # batch-independent forward, so "same model" means "same logits"
    first = _batch(ctx, [0, 1, 2], 2, experience=0)
    full, out, _ = _step(strategy, first, ctx)
    assert len(full) == len(first)
    strategy.after_step(first, ctx)
    stored = strategy.buffer.data["logits"][: len(first)]
    torch.testing.assert_close(stored, out.detach())  # the logits of the inserting step
    second = _batch(ctx, [3, 4], 3, experience=0)
    full, out, _ = _step(strategy, second, ctx)  # no optimiser step in between
    n, n1, n2 = strategy._sizes
    assert (n, n1, n2) == (6, 6, 6) and len(full) == 18  # incoming ; draw 1 ; draw 2 (independent)
    assert float(strategy.last_terms["alpha_mse"]) == 0.0
    assert float(strategy.last_terms["beta_ce"]) > 0.0
    with torch.no_grad():  # after a parameter change the alpha term is no longer zero
        strategy.model.head.bias.add_(1.0 * torch.arange(10.0))
    _step(strategy, second, ctx)
    assert float(strategy.last_terms["alpha_mse"]) > 0.0


@pytest.mark.parametrize("unseen", [None, "true", "false"])
def test_derpp_ce_over_all_logits_by_default_masked_as_option(unseen):
    """Default (paper / mammoth derpp.py): plain CE over all 10 logits, so classes 5..9 of the
    unseen experience get gradient; ``unseen_logits=false``: CE restricted to the seen 0..4."""
    ctx = _ctx()  # 2 experiences x 5 classes, experience 0 seen
    extra = [] if unseen is None else [f"strategy.unseen_logits={unseen}"]
    strategy = _strategy("derpp", ctx, *extra)
    strategy.model.eval()
    batch = _batch(ctx, [0, 1], 3, experience=0)
    _, out, loss = _step(strategy, batch, ctx)
    g = out.grad.abs().sum(0)
    if unseen == "false":
        assert (g[5:] == 0).all() and (g[:5] > 0).all()
        logits = out.detach()[:, :5]
    else:
        assert (g > 0).all()
        logits = out.detach()
    expected = torch.nn.functional.cross_entropy(logits, batch.y)  # empty buffer: the CE term only
    torch.testing.assert_close(loss.detach(), expected)


def test_derpp_beta_zero_is_der_with_one_draw():
    ctx = _ctx()
    strategy = _strategy("derpp", ctx, "strategy.beta=0", "strategy.replay_batch_size=4")
    batch = _batch(ctx, [0, 1], 2, experience=0)
    _step(strategy, batch, ctx)
    strategy.after_step(batch, ctx)
    full, _, _ = _step(strategy, batch, ctx)
    assert len(full) == 8 and "beta_ce" not in strategy.last_terms


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", ["er_ace", "derpp"])
def test_tiny_online_run_both_norms(tmp_path, name):
    """Digits 0-3 as 2x2 under the online protocol (``train.online``: one pass, batch 10, one
    step per incoming batch, buffer minibatch 10), ResNet-18 with nf=4, with BN and with AdaB2N:
    one step per incoming batch, every sample reaches the reservoir, AdaB2N's layers see every
    step, and the norm changes the results."""
    matrices = {}
    for norm in ("bn", "adab2n"):
        cfg = load_config(None, [
            f"output_dir={tmp_path}", f"name={name}-{norm}", "logging.console=false", "logging.tensorboard=false",
            "logging.progress=false", "eval.every_samples=0", "eval.baseline=false", "model=resnet18", "model.nf=4",
            "scenario.classes=[0,1,2,3]", "scenario.n_tasks=2", "train.online=true", "train.online_iter=1",
            f"strategy={name}", f"strategy.norm={norm}", "strategy.buffer_size=50", "strategy.replay_batch_size=10",
            "train.batch_size=10", "train.lr=0.03"])
        engine = Engine(cfg)
        sizes = [e.train_idx.numel() for e in engine.stream.experiences]
        summary = engine.run()
        steps = sum(-(-n // 10) for n in sizes)  # one step per incoming batch of 10
        assert summary["status"] == "finished" and summary["iterations"] == steps
        matrices[norm] = summary["matrix"]
        state = torch.load(tmp_path / f"{name}-{norm}" / "checkpoint.pt", weights_only=False)
        assert state["strategy"]["buffer"]["n_seen"] == sum(sizes)  # each sample seen once
        layers = adab2n_layers(engine.model)
        if norm == "adab2n":
            assert len(layers) == 20
            assert any(k.endswith("bn1.eta") for k in state["model"])
            assert any(float(layer.task_weight.detach().abs().max()) > 0 for layer in layers)  # trained
            assert 0 < float(layers[0].eta) < 0.1 ** 0.4 and int(layers[0].num_batches_tracked) == steps
        else:
            assert not layers
    assert matrices["adab2n"] != matrices["bn"]


# --------------------------------------------------------------------------- parity switches (issue 13)


def test_er_ace_replay_start_second_task_is_plain_ce_without_replay_in_the_first_experience():
    """mammoth er_ace.py / er_ace_ada.py: ``if self.task > 0`` gates both the replay and the mask."""
    ctx = _ctx()
    strategy = _strategy("er_ace", ctx, "strategy.replay_start=second_task", "strategy.unseen_logits=true")
    first = _batch(ctx, [1], 4, experience=0)  # only class 1: the ACE mask would hide class 0
    _, out, loss = _step(strategy, first, ctx)
    strategy.after_step(first, ctx)
    full, out, loss = _step(strategy, first, ctx)  # buffer non-empty, still experience 0
    assert len(full) == len(first) and set(strategy.last_terms) == {"ce_incoming"}
    assert (out.grad.abs().sum(0) > 0).all()  # plain CE over all 10 logits, class 0 included
    torch.testing.assert_close(loss.detach(), torch.nn.functional.cross_entropy(out.detach(), first.y))
    ctx.experience, ctx.class_mask = 1, ctx.stream.class_mask(1)
    second = _batch(ctx, [5, 6], 2, experience=1)
    full, out, _ = _step(strategy, second, ctx)
    assert len(full) == 2 * len(second) and "ce_buffer" in strategy.last_terms  # replay from the second task
    default = _strategy("er_ace", _ctx(), "strategy.unseen_logits=true")
    _, out, _ = _step(default, first, _ctx())
    assert (out.grad[:, 0] == 0).all()  # default: the ACE mask from the first step (class 0 absent, below seen max)


def test_er_ace_unseen_logits_stop_at_the_last_class():
    """``if seen_so_far.max() < num_classes - 1: mask[:, seen_so_far.max():] = 1``: once the last
    class id is seen, only the present classes remain."""
    ctx = _ctx()
    strategy = _strategy("er_ace", ctx, "strategy.unseen_logits=true")
    strategy.seen[9] = True
    ctx.experience, ctx.class_mask = 1, ctx.stream.class_mask(1)
    _, out, _ = _step(strategy, _batch(ctx, [5, 6], 2, experience=1), ctx)
    g = out.grad.abs().sum(0)
    assert (g[[5, 6]] > 0).all() and (g[[0, 1, 2, 3, 4, 7, 8, 9]] == 0).all()


@pytest.mark.parametrize("name", ["er_ace", "derpp"])
def test_separate_forwards_run_each_part_alone_and_need_bn(name):
    ctx = _ctx()
    strategy = _strategy(name, ctx, "strategy.replay_forward=separate", "strategy.replay_batch_size=3")
    batch = _batch(ctx, [0, 1], 2, experience=0)
    _step(strategy, batch, ctx)
    strategy.after_step(batch, ctx)
    calls = []
    hook = strategy.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    full, out, _ = _step(strategy, batch, ctx)
    hook.remove()
    assert calls == ([4, 3] if name == "er_ace" else [4, 3, 3]) and out.shape[0] == len(full)
    strategy.model.eval()  # with batch-independent BN the separate and the joint forward agree
    x = ctx.inputs(full.x)
    torch.testing.assert_close(strategy.forward(x, full, ctx), strategy.model(x))
    with pytest.raises(ClbenchError, match="separate"):
        _strategy(name, _ctx(), "strategy.replay_forward=separate", "strategy.norm=adab2n")


def test_cosine_classifier_option():
    from clbench.models import CosineLinear

    cfg = component_config(load_config(None, ["model=resnet18", "model.nf=4", "model.classifier=cosine",
                                              "model.cosine_scale=10"]).model)
    torch.manual_seed(0)
    model = build_model(cfg, (3, 8, 8), 10)
    assert isinstance(model.head, CosineLinear) and model.head.bias is None and model.head.weight.shape == (10, 32)
    x = torch.randn(5, 3, 8, 8)
    scores = model(x)
    f = torch.nn.functional.normalize(model.features(x), dim=1)
    w = torch.nn.functional.normalize(model.head.weight, dim=1)
    torch.testing.assert_close(scores, 10 * f @ w.t(), rtol=1e-3, atol=1e-3)  # eps 1e-5 on the norms aside
    assert float(scores.detach().abs().max()) <= 10.0
    linear = build_model(component_config(load_config(None, ["model=resnet18", "model.nf=4"]).model), (3, 8, 8), 10)
    assert type(linear.head) is torch.nn.Linear
    with pytest.raises(Exception):
        load_config(None, ["model=resnet18", "model.classifier=arc"])


def test_separate_forward_parts_of_one_sample_join_the_next():
    from clbench.strategies._joint_replay import merge_single_samples

    assert merge_single_samples([10, 10, 10]) == [10, 10, 10]
    assert merge_single_samples([1, 10, 10]) == [11, 10]
    assert merge_single_samples([10, 1]) == [11]
    assert merge_single_samples([3, 1, 4]) == [3, 5]
    assert merge_single_samples([1]) == [1]


def _benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "adab2n_online_cifar10.py"
    spec = importlib.util.spec_from_file_location("adab2n_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_grid_and_parity_recipe():
    """--grid: the released run.py grid (kappa x lambda x ada_t0, CIFAR); --parity: the released
    switches, and every run's overrides make a valid config."""
    from types import SimpleNamespace

    bench = _benchmark()
    points = bench.grid_points("adab2n", True)
    assert len(points) == 32 and len(set(points)) == 32
    assert {p[0] for p in points} == {0.1, 0.4, 0.7, 1.0} and {p[1] for p in points} == {0.01, 0.1, 1.0, 10.0}
    assert {p[2] for p in points} == {0, 1}
    assert bench.grid_points("bn", True) == [None] and bench.grid_points("adab2n", False) == [None]
    args = SimpleNamespace(parity=True, quick=False, set=[])
    for base in ("er_ace", "derpp"):
        for norm in ("bn", "adab2n"):
            point = (0.7, 10.0, 1) if norm == "adab2n" else None
            over = bench.overrides_for(base, norm, 2000, 1, args, point)
            s = component_config(load_config(bench.CONFIG, over).strategy)
            assert s.name == base and s.norm == norm
            assert s.replay_forward == ("separate" if norm == "bn" else "joint")
            if norm == "adab2n":
                assert (s.adab2n_variant, s.kappa, s.lambda_, s.ada_t0) == ("released", 0.7, 10.0, 1)
            if base == "er_ace":
                assert s.unseen_logits and s.replay_start == "second_task"
            else:
                assert (s.alpha, s.beta) == (0.1, 1.0) and s.unseen_logits
    assert bench.run_name("er_ace", "adab2n", 500, 0, (0.1, 0.01, 0)) == "er_ace-adab2n-k0.1-l0.01-t0-m500-s0"
    assert bench.run_name("er_ace", "bn", 500, 0) == "er_ace-bn-m500-s0"


def test_repro_configs_follow_the_released_recipe():
    from pathlib import Path

    repro = Path(__file__).resolve().parents[1] / "configs" / "repro"
    for base in ("er_ace", "derpp"):
        for suffix, norm in (("", "adab2n"), ("_bn", "bn")):
            cfg = load_config(repro / f"adab2n_online_cifar10_{base}{suffix}.yaml", [])
            s = component_config(cfg.strategy)
            assert (s.name, s.norm, s.buffer_size, s.replay_batch_size) == (base, norm, 500, 10)
            assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.momentum) == (0.03, 10, 1, 0.0)
            assert cfg.scenario.n_tasks == 5 and not cfg.scenario.shuffle_classes and cfg.model.nf == 64
            assert s.replay_forward == ("joint" if norm == "adab2n" else "separate")
            if norm == "adab2n":
                assert s.adab2n_variant == "released"
            assert s.unseen_logits
            if base == "er_ace":
                assert s.replay_start == "second_task"
            else:
                assert (s.alpha, s.beta) == (0.2, 0.5)


def test_benchmark_resumes_an_interrupted_run(tmp_path):
    """A run stopped after a checkpoint (summary not yet written) is resumed by the next invocation,
    not refused because its directory exists; a finished run without a record is run again."""
    from types import SimpleNamespace

    bench = _benchmark()
    args = SimpleNamespace(quick=True, parity=False, set=["logging.progress=false"], threads=None,
                           output_dir=str(tmp_path), config=str(bench.CONFIG))
    first = bench.run_one("er_ace", "bn", 50, 0, args)
    run_dir = tmp_path / "runs" / first["run"]
    (run_dir / "summary.json").unlink()  # as if killed after the last checkpoint
    again = bench.run_one("er_ace", "bn", 50, 0, args)
    assert again["iterations"] == first["iterations"]
    assert again["class_il"] == pytest.approx(first["class_il"])
    third = bench.run_one("er_ace", "bn", 50, 0, args)  # finished: runs it again from scratch, same numbers
    assert third["class_il"] == pytest.approx(first["class_il"])
