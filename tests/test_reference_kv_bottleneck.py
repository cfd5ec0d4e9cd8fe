"""Reference equivalence of clbench's discrete key-value bottleneck with the released code
(``ftraeuble/discrete_key_value_bottleneck`` @ 1987958 ``core.py``/``splitters.py``/``utils.py`` and
``ftraeuble/experiments_discrete_key_value_bottleneck`` @ abd0c7a ``utils/model.py``, ``scripts/train.py``).

The golden ``kv_bottleneck`` was written by ``tools/reference/kv_bottleneck.py`` (see its docstring): key
fitting by EMA k-means with dead-key expiry on seeded features, value training with SGD, label smoothing
and gradient clipping over two tasks, and evaluation with never-selected keys masked.  Here the same
case runs through clbench's ``KeyValueBottleneck.fit_keys`` (with the strategy's generator set to the
official run's RNG state, so the epoch permutations and the dead-key samples are the same draws) and
through the strategy's ``forward``/``loss``/``predict`` with the engine's SGD + ``clip_grad_norm_`` step.

Modes: ``dead_key_reset=released`` (default, the code) is compared with the golden at every step;
``persistent`` (restart the dead key's EMA statistics at the sample, as later vector-quantisation
code does) must agree up to the first expiry and differ afterwards.  ``mask_unseen=false`` (code) is
compared; ``mask_unseen=true`` must change the value updates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clbench.strategy import Batch, Context
from clbench.strategies.kv_bottleneck import KeyValueBottleneck, KVBottleneck, KVBottleneckConfig
from reference_golden import load_golden

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = dict(atol=1e-5, rtol=1e-5)  # keys after EMA steps (index_add vs einsum sums; 1/cluster-size amplifies)
VALUES = dict(atol=1e-6, rtol=1e-5)  # values, logits and losses of the value training


def _fitted(g, dead_reset="released"):
    e = g.extra
    kv = KeyValueBottleneck(e["D"], e["C"], e["J"], e["dk"], e["dv"], torch.Generator().manual_seed(0))
    kv.proj.copy_(g["proj"])
    kv.keys.copy_(g["keys0"])
    generator = torch.Generator()
    generator.set_state(g["rng_before_fit"])
    snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []

    def progress(items, total=None, description=""):
        for sel in items:
            before = kv.keys.clone()
            yield sel
            snapshots.append((sel, before, kv.keys.clone()))

    kv.fit_keys(g["pre_x"], e["init_epochs"], e["init_batch_size"], e["decay"], e["eps"], e["threshold_factor"],
                generator, progress, dead_reset=dead_reset)
    return kv, snapshots


def test_key_fitting_matches_released_ema_kmeans_with_dead_key_expiry():
    g = load_golden("kv_bottleneck")
    assert g.repository == "ftraeuble/discrete_key_value_bottleneck" and g.commit == "1987958"
    e = g.extra
    kv, steps = _fitted(g)
    assert len(steps) == e["fit_steps"] == 6
    assert e["threshold"] == pytest.approx(e["threshold_factor"] * e["init_batch_size"] / e["J"])
    for s, (sel, before, after) in enumerate(steps):
        assert torch.equal(sel, g[f"fit_batch.{s}"]), s  # same permutation draws
        probe = KeyValueBottleneck(e["D"], e["C"], e["J"], e["dk"], e["dv"], torch.Generator())
        probe.proj.copy_(kv.proj)
        probe.keys.copy_(before)
        assert torch.equal(probe.select(probe.heads(g["pre_x"][sel])), g[f"fit_ind.{s}"]), s  # key selection: exact
        assert bool((g[f"fit_cluster.{s}"] < e["threshold"]).any())  # every step expires some keys
        torch.testing.assert_close(after, g[f"fit_keys.{s}"], **KEYS, msg=lambda m: f"keys after step {s}: {m}")
    torch.testing.assert_close(kv.keys, g["keys"], **KEYS)


def test_persistent_dead_key_reset_differs_from_the_released_code():
    g = load_golden("kv_bottleneck")
    _, steps = _fitted(g, dead_reset="persistent")
    torch.testing.assert_close(steps[0][2], g["fit_keys.0"], **KEYS)  # first step: same expiry draws
    assert not torch.allclose(steps[1][2], g["fit_keys.1"], atol=1e-3)  # then the restarted statistics move the keys


class _Features(nn.Module):
    """A frozen "encoder" that passes the golden's features through."""

    feature_dim = 12

    def __init__(self):
        super().__init__()
        self.backbone = nn.Identity()

    def features(self, x):
        return x


def _strategy(g, **overrides):
    e = g.extra
    cfg = KVBottleneckConfig(codebooks=e["C"], keys_per_codebook=e["J"], key_dim=e["dk"],
                             label_smoothing=e["label_smoothing"], **overrides)
    strategy = KVBottleneck(cfg)
    model = _Features()
    model.kv = KeyValueBottleneck(e["D"], e["C"], e["J"], e["dk"], e["dv"], torch.Generator())
    model.kv.proj.copy_(g["proj"])
    model.kv.keys.copy_(g["keys"])  # the golden's fitted keys (compared above)
    model.requires_grad_(False)
    model.kv.values.requires_grad_(True)
    strategy.model = model
    mask = torch.zeros(len(e["tasks"]), e["dv"], dtype=torch.bool)
    for t, classes in enumerate(e["tasks"]):
        mask[t, sum(e["tasks"][:t + 1], [])] = True  # seen classes up to task t
    ctx = Context(stream=None, device=torch.device("cpu"), seed=0, preprocess=None)  # type: ignore[arg-type]
    ctx.class_mask = mask
    optimizer = torch.optim.SGD(strategy.param_groups()[0]["params"], lr=e["lr"], momentum=0.0, weight_decay=0.0)
    return strategy, model, ctx, optimizer


def _train(g, strategy, model, ctx, optimizer, check: bool):
    e = g.extra
    per_task = e["train_steps"] // len(e["tasks"])
    clipped = 0
    for s in range(e["train_steps"]):
        idx = g[f"train_batch.{s}"]
        x, y = g["cl_x"][idx], g["cl_y"][idx]
        batch = Batch(x, y, torch.full_like(y, s // per_task))
        with torch.no_grad():
            selected = model.kv.select(model.kv.heads(x))
        out = strategy.forward(x, batch, ctx)  # the engine's _step: forward, loss, backward, clip, step
        loss = strategy.loss(out, batch, ctx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([model.kv.values], e["grad_clip"])
        optimizer.step()
        if check:
            assert torch.equal(selected, g[f"train_ind.{s}"]), s
            torch.testing.assert_close(out.detach(), g[f"train_logits.{s}"], **VALUES)
            torch.testing.assert_close(loss.detach().reshape(1), g[f"train_loss.{s}"], **VALUES)
            torch.testing.assert_close(norm.reshape(1), g[f"train_grad_norm.{s}"], **VALUES)
            torch.testing.assert_close(model.kv.values.detach(), g[f"values.{s}"], **VALUES,
                                       msg=lambda m: f"values after step {s}: {m}")
        clipped += int(norm > e["grad_clip"])
    return clipped


def test_value_training_and_masked_evaluation_match_released_code():
    g = load_golden("kv_bottleneck")
    strategy, model, ctx, optimizer = _strategy(g)
    assert _train(g, strategy, model, ctx, optimizer, check=True) > 0  # the case exercises clipping
    assert torch.equal(model.kv.counts.float(), g["cluster_size_counter"])  # selection counters
    strategy.cfg.mask_unused = True  # code: deactivate_counts() at evaluation
    logits = strategy.predict(g["test_x"])
    with torch.no_grad():
        masked = model.kv.select(model.kv.heads(g["test_x"]), model.kv.used_mask())
    assert torch.equal(masked, g["test_ind"])
    torch.testing.assert_close(logits, g["test_logits"], **VALUES)
    assert torch.equal(logits.argmax(1), g["test_logits"].argmax(1))
    free = model.kv.select(model.kv.heads(g["test_x"]))
    assert not torch.equal(free, g["test_ind"])  # the masking matters in this case


def test_masking_unseen_classes_is_not_the_code():
    g = load_golden("kv_bottleneck")
    strategy, model, ctx, optimizer = _strategy(g, mask_unseen=True)
    _train(g, strategy, model, ctx, optimizer, check=False)
    assert not torch.allclose(model.kv.values.detach(), g[f"values.{g.extra['train_steps'] - 1}"], atol=1e-3)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_repro_configs_follow_the_released_sweeps(name):
    """configs/repro/kv_bottleneck_<name>.yaml against the arguments scripts/train.py gets from the sweep
    (recorded in the golden by the script, parsed by the official ArgumentParserWrapper): cl_epochs -> train.epochs
    (full shuffled passes over each task's data, batch 256), and the rest of the recipe."""
    from pathlib import Path

    from clbench.config import load_config

    recipe = load_golden("kv_bottleneck").extra["recipes"][name]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "repro" / f"kv_bottleneck_{name}.yaml", [])
    t, s = cfg.train, cfg.strategy
    assert t.epochs == recipe["cl_epochs"] == {"cifar10": 2000, "cifar100": 500}[name] and t.iterations is None
    assert (t.batch_size, t.optimizer, t.lr, t.momentum, t.weight_decay, t.grad_clip, t.scheduler) == (
        recipe["batch_size"], recipe["optimizer"].lower(), recipe["learning_rate"], 0.0, recipe["weight_decay"],
        recipe["gradient_clip"], "none")
    assert t.augment == "none" and not t.online
    assert (s.codebooks, s.keys_per_codebook, s.key_dim, s.ema_decay, s.init_epochs, s.init_batch_size) == (
        recipe["num_books"], recipe["num_pairs"], recipe["dim_key"], recipe["decay"], recipe["init_epochs"],
        recipe["batch_size"])
    assert s.dead_key_fraction * s.init_batch_size / s.keys_per_codebook == pytest.approx(recipe["threshold_ema_dead_code"])
    assert s.dead_key_reset == "released" and s.label_smoothing == recipe["label_smoothing"]
    assert not s.mask_unseen and s.mask_unused  # CE over all logits; deactivate_counts at evaluation
    assert recipe["values_init"] == "zeros" and recipe["init_mode"] == "random" and recipe["topk"] == 1
    assert recipe["splitting_mode"] == "random_projection" and recipe["decoder_model"] == "codebook-voting-logits"
    n_classes = {"cifar10": 10, "cifar100": 100}[name]
    assert recipe["dim_value"] == n_classes and cfg.scenario.n_tasks == n_classes // recipe["split_size"]
    pretrain = {"CIFAR100": "image_folder", "CIFAR10": "cifar10"}[recipe["pretrain_data"]]
    assert s.pretrain_dataset == pretrain  # key-init data: the other CIFAR
    assert ("cifar100" if pretrain == "image_folder" else "cifar10-jpeg") in s.pretrain_data_root
    assert cfg.model.arch == "resnet50.tv2_in1k" and recipe["backbone"] == "resnet50_imagenet_v2"
    assert list(cfg.model.input_size) == [224, 224] and cfg.model.normalize == "imagenet"
