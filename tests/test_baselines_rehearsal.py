"""Paper-level effects of the rehearsal baselines on tiny real data (the built-in digits):
A-GEM (Chaudhry et al. 2019), GDumb (Prabhu et al. 2020), iCaRL (Rebuffi et al. 2017)."""

from __future__ import annotations

import pytest
import torch

from clbench.config import load_config
from clbench.engine import Engine

pytestmark = pytest.mark.usefixtures("one_thread")


def make_engine(tmp_path, *overrides: str) -> Engine:
    return Engine(load_config(None, [
        f"output_dir={tmp_path}", "name=run", "scenario=class_incremental", "scenario.dataset=digits",
        "scenario.n_tasks=5", "model=mlp", "model.hidden=[32]", "train.epochs=1", "train.batch_size=32",
        "train.augment=none", "eval.every=0", "logging.console=false", "logging.progress=false",
        "logging.tensorboard=false", "checkpoint.enabled=false", "device=cpu", "seed=0", *overrides]))


def flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def test_agem_projected_step_never_increases_the_memory_loss_to_first_order(tmp_path):
    """Eq. 11: the gradient the optimiser applies has g~ . g_ref >= 0 at every step, and equals g
    (untouched) whenever g . g_ref >= 0; conflicts do occur on this stream."""
    engine = make_engine(tmp_path, "strategy=agem", "strategy.patterns_per_experience=50", "strategy.sample_size=64")
    strategy = engine.strategy
    original = strategy.before_optimizer_step
    seen: list[tuple[float, float, bool]] = []

    def probe(ctx):
        params = strategy._params()
        before = flat_grad(params).clone()
        original(ctx)
        if strategy.memory:
            after = flat_grad(params)
            g_ref = strategy.last_g_ref
            scale = float(before.norm() * g_ref.norm())
            seen.append((strategy.last_dot / scale, float(after @ g_ref) / scale, bool(torch.equal(before, after))))

    strategy.before_optimizer_step = probe
    assert engine.run()["status"] == "finished"
    assert len(seen) >= 30  # every step of experiences 1-4
    conflicts = [s for s in seen if s[0] < 0]
    assert len(conflicts) >= 5  # the old tasks' gradient does conflict with the new task's
    for dot_before, dot_after, unchanged in seen:
        assert dot_after >= -1e-5  # first order: the memory loss does not increase
        if dot_before >= 0:
            assert unchanged
        else:
            assert abs(dot_after) < 1e-5  # projected exactly onto the boundary g~ . g_ref = 0


def test_gdumb_memory_is_class_balanced_and_holds_real_samples(tmp_path):
    """Alg. 1 with k = 50 on 5 x 2 digit classes: after experience t every seen class holds exactly
    k / |Y| samples (25, 12-13, ...: |Y| = 2, 4, 6, 8, 10), each one a training image of its class."""
    engine = make_engine(tmp_path, "strategy=gdumb", "strategy.mem_size=50", "strategy.epochs=2", "strategy.batch_size=16")
    strategy, stream = engine.strategy, engine.stream
    original = strategy.after_experience
    counts = []

    def probe(exp, ctx):
        original(exp, ctx)
        counts.append(torch.bincount(strategy.memory["y"][strategy.memory["y"] >= 0], minlength=stream.num_classes))

    strategy.after_experience = probe
    assert engine.run()["status"] == "finished"
    for t, c in enumerate(counts):
        seen = torch.cat([stream[j].classes for j in range(t + 1)])
        assert len(seen) == 2 * (t + 1) and int(c.sum()) == 50 and int(c.sum()) == int(c[seen].sum())
        assert int(c[seen].min()) >= 50 // len(seen) and int(c[seen].max()) <= -(-50 // len(seen))
    train = stream.train
    for x, y in zip(strategy.memory["x"], strategy.memory["y"]):
        match = (train.x == x).flatten(1).all(1)
        assert bool(match.any()) and bool((train.y[match] == y).all())


def test_icarl_nearest_mean_of_exemplars_beats_its_own_linear_head(tmp_path):
    """iCaRL's finding (Rebuffi et al. 2017, Sec. 4.1 / Fig. 4): in class-IL the NME classifier on
    the exemplar means is more accurate over all classes than the network's own biased linear head."""
    engine = make_engine(tmp_path, "strategy=icarl", "strategy.memory_size=100", "train.epochs=3", "train.lr=0.5")
    assert engine.run()["status"] == "finished"
    strategy, stream = engine.strategy, engine.stream
    assert sorted(strategy.exemplars) == list(range(10)) and all(len(v) == 10 for v in strategy.exemplars.values())
    x = engine.ctx.inputs(stream.test.x)
    nme = (strategy.predict(x).argmax(1) == stream.test.y).float().mean()
    head = (strategy.head_predict(x).argmax(1) == stream.test.y).float().mean()
    assert nme > head + 0.05, (float(nme), float(head))
