"""clbench's rehearsal baselines against avalanche-lib 0.6's (issue 15, section 3): A-GEM, GDumb, iCaRL.

Both frameworks train on the same tiny stream (the built-in digits, class-IL, 5 x 2 classes), from
the same initial weights (Avalanche trains a deep copy of clbench's freshly built model), on the
same mini-batches in the same order (each Avalanche experience holds its samples in the order of
clbench's seeded epoch permutation, ``clbench.engine.batch_schedule``, and is loaded with
``shuffle=False``), with plain SGD, fp32, no augmentation, on the CPU -- as
``benchmarks/vs_avalanche.py`` arranges it.  Avalanche's model is wrapped so that the logits of
classes not seen yet are -inf, clbench's class-IL mask.  The final weights must agree to
``atol=1e-5`` (float32 sums in a different order are the only difference).

Where the methods draw random memory samples, the randomness is factored out:

* A-GEM: each experience's memory holds the whole experience (``patterns_per_experience`` >= its
  size, so neither framework subsamples), and the reference gradient is taken on the whole memory:
  clbench's ``sample_size`` covers it; Avalanche's ``AGEMPlugin`` draws ``sample_size //
  n_experiences`` samples from *each* experience's memory through an infinite group-balanced
  loader (a deviation from the paper's uniform draw), so its ``sample_from_memory`` is replaced by
  "all of the memory".
* GDumb: the memory holds all samples seen (``mem_size`` >= the stream); the model trained from
  scratch on it takes full-batch steps (``batch_size`` >= memory), so the order of the memory's
  samples does not matter.  Both restart from the *initial* weights of the run (Avalanche's
  ``GDumbPlugin`` keeps a deep copy of the initial model; clbench restores its setup-time state).
  Avalanche trains the re-initialised model inside the experience's own loop with the strategy's
  optimiser; clbench at the experience's end with its own (``strategy.lr``, ``strategy.epochs``);
  set equal here, with momentum, weight decay, clipping and the SGDR schedule off.
* iCaRL: Avalanche's ``ICaRL`` gets clbench's model split in two -- ``feature_extractor`` = a copy
  of the initial ``backbone``, ``classifier`` = its ``head`` (wrapped to mask unseen classes) -- and
  flat inputs (the MLP's ``Flatten`` is then the identity).  Herding is deterministic given the
  features, so nothing is drawn; what is factored out or aligned:

  - herding: the original iCaRL code (Avalanche) lets a sample already picked win the argmin again
    (it is not stored twice, but enters the running sum, until m distinct ones); clbench by
    default picks without repetition (the exemplar sets then differ once m is a sizeable part of
    the class: here from the first experience, m = 60), so
    clbench runs with its parity option ``strategy.herding_repeats=true``;
  - memory per class: Avalanche ``ceil(K / seen)``, clbench ``K // seen`` (and both keep the first
    m in herding order when reducing, Alg. 5): K = 120 is divisible by 2, 4, ..., 10 seen classes;
  - BCE: Avalanche averages over *all* the head's classes and pushes the logits of classes not
    seen yet towards 0; clbench over the seen classes only (unseen logits untouched).  With the
    unseen logits at -inf their terms and gradients vanish, and Avalanche's ``ICaRLLossPlugin``
    ``criterion`` is set to the sum over batch and classes divided by ``batch x seen``.  Targets
    (one-hot; the previous model's sigmoids on the old classes) are built the same way;
  - training order: Avalanche appends its memory after the experience; its training set is
    replaced by the experience plus *its own* exemplars (looked up by content; each must be there)
    in the order of clbench's batch schedule over experience + exemplars;
  - class means: Avalanche averages with the flipped images' features for 4-d inputs (flat inputs
    here, so it does not); both normalise features, average, normalise the mean.  Avalanche's NCM
    gives classes without a mean a zero vector (distance 1, so it can predict a class never
    seen), clbench -inf: scores are compared on classes with a mean (all, at the end).

  Asserted: equal exemplar sets and herding orders per class, then equal weights (``atol=1e-5``),
  class means and NME scores on the test set (``atol=1e-5``; argmax differing on <= 1 sample).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from clbench.config import load_config
from clbench.engine import Engine, batch_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

LR, BATCH = 0.1, 64


def clbench_run(tmp_path, *overrides: str):
    """A finished clbench run; returns ``(engine, initial model)``."""
    cfg = load_config(None, [
        f"output_dir={tmp_path}", "name=clbench", "scenario=class_incremental", "scenario.dataset=digits",
        "scenario.n_tasks=5", "model=mlp", "model.hidden=[32]", "train.optimizer=sgd", f"train.lr={LR}",
        "train.momentum=0.0", "train.weight_decay=0.0", f"train.batch_size={BATCH}", "train.epochs=1",
        "train.augment=none", "train.scheduler=none", "train.warmup_iters=0", "train.grad_clip=null", "train.amp=none",
        "eval.every=0", "logging.console=false", "logging.progress=false", "logging.tensorboard=false",
        "checkpoint.enabled=false", "device=cpu", "seed=3", *overrides])
    engine = Engine(cfg)
    initial = copy.deepcopy(engine.model)
    summary = engine.run()
    assert summary["status"] == "finished", summary.get("error")
    return engine, initial


class SeenClasses(nn.Module):
    """The model with the logits of classes not seen yet at -inf.  The mask is a class attribute so
    that GDumb's deep copies of the model share it."""

    allowed = torch.zeros(0, dtype=torch.bool)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).float().masked_fill(~SeenClasses.allowed, float("-inf"))


def avalanche_stream(engine: Engine):
    """Avalanche's benchmark of clbench's stream: normalised tensors in clbench's batch order."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset

    stream, cfg = engine.stream, engine.cfg
    train_x = engine.ctx.inputs(stream.train.x)  # clbench's own normalisation, no augmentation
    sets = []
    for k, exp in enumerate(stream):
        order = torch.cat([idx for idx, _ in batch_schedule(exp.train_idx, torch.zeros_like(exp.train_idx), cfg, k)])
        x, y = train_x[order], stream.train.y[order]
        sets.append(_make_taskaware_tensor_classification_dataset(x, y, targets=y, task_labels=0))
    return benchmark_from_datasets(train=sets, test=sets[:1])


def avalanche_train(engine: Engine, make_strategy) -> nn.Module:
    """Trains ``make_strategy(wrapped_model, optimizer, evaluator)`` on the stream; returns its model."""
    from avalanche.training.plugins import EvaluationPlugin

    bm = avalanche_stream(engine)
    wrapped = SeenClasses(engine_initial_copy(engine))
    strategy = make_strategy(wrapped, torch.optim.SGD(wrapped.parameters(), lr=LR), EvaluationPlugin(loggers=[]))
    for k, exp in enumerate(bm.train_stream):
        SeenClasses.allowed = engine.stream.class_mask(k)[0].clone()
        strategy.train(exp, shuffle=False, num_workers=0)
    return strategy.model.model


_INITIAL: dict[int, nn.Module] = {}


def engine_initial_copy(engine: Engine) -> nn.Module:
    return copy.deepcopy(_INITIAL[id(engine)])


def run_both(tmp_path, clbench_overrides: list[str], make_strategy) -> tuple[Engine, nn.Module]:
    engine, initial = clbench_run(tmp_path, *clbench_overrides)
    _INITIAL[id(engine)] = initial
    try:
        theirs = avalanche_train(engine, make_strategy)
    finally:
        _INITIAL.pop(id(engine))
    return engine, theirs


def assert_same_weights(ours: nn.Module, theirs: nn.Module) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")


def test_agem_equals_avalanche_agem(tmp_path):
    from avalanche.training import AGEM
    from avalanche.training.plugins import AGEMPlugin

    def whole_memory(self):  # the reference batch = every stored sample (the draw factored out)
        xs, ys = zip(*[(torch.stack([s[0] for s in buf]), torch.tensor([int(s[1]) for s in buf])) for buf in self.buffers])
        return torch.cat(xs), torch.cat(ys), torch.zeros(sum(len(y) for y in ys), dtype=torch.long)

    def make(model, optimizer, evaluator):
        strategy = AGEM(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), patterns_per_exp=10_000,
                        sample_size=10_000, train_mb_size=BATCH, train_epochs=1, device="cpu", evaluator=evaluator)
        plugin = next(p for p in strategy.plugins if isinstance(p, AGEMPlugin))
        plugin.sample_from_memory = whole_memory.__get__(plugin)
        return strategy

    engine, theirs = run_both(tmp_path, ["strategy=agem", "strategy.patterns_per_experience=10000",
                                         "strategy.sample_size=100000"], make)
    assert engine.strategy.projections > 10  # the projection did act (else this compares fine-tuning)
    assert_same_weights(engine.model, theirs)


def test_gdumb_equals_avalanche_gdumb(tmp_path):
    from avalanche.training import GDumb

    epochs = 5

    def make(model, optimizer, evaluator):
        return GDumb(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), mem_size=100_000,
                     train_mb_size=100_000, train_epochs=epochs, device="cpu", evaluator=evaluator)

    engine, theirs = run_both(tmp_path, ["strategy=gdumb", "strategy.mem_size=100000", "strategy.batch_size=100000",
                                         f"strategy.epochs={epochs}", f"strategy.lr={LR}", "strategy.momentum=0.0",
                                         "strategy.weight_decay=0.0", "strategy.grad_clip=null", "strategy.scheduler=none"], make)
    assert int(engine.strategy.counts.sum()) == engine.stream.train.y.numel()  # the whole stream is in memory
    assert_same_weights(engine.model, theirs)


ICARL_K = 120  # exemplars: 60, 30, 20, 15, 12 per class after 2, 4, ..., 10 classes (K divisible: floor = ceil)


def _icarl_avalanche(engine: Engine, initial: nn.Module):
    """Avalanche's ICaRL set up as the module docstring describes; returns ``(strategy, its _ICaRLPlugin, flat
    normalised training inputs)``."""
    from avalanche.training import ICaRL
    from avalanche.training.losses import ICaRLLossPlugin
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised.icarl import _ICaRLPlugin
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset

    stream, cfg, ours = engine.stream, engine.cfg, engine.strategy
    # flat inputs: the MLP's Flatten is then the identity, and Avalanche's class means do not add
    # the horizontally flipped images (they do for 4-d inputs; clbench's NME does not)
    train_x = engine.ctx.inputs(stream.train.x).flatten(1)
    feature_extractor = copy.deepcopy(initial.backbone)
    classifier = SeenClasses(copy.deepcopy(initial.head))
    params = list(feature_extractor.parameters()) + list(classifier.parameters())
    strategy = ICaRL(feature_extractor=feature_extractor, classifier=classifier, optimizer=torch.optim.SGD(params, lr=LR),
                     memory_size=ICARL_K, buffer_transform=None, fixed_memory=True, train_mb_size=BATCH, train_epochs=1,
                     eval_mb_size=1000, device="cpu", evaluator=EvaluationPlugin(loggers=[]))
    plugin = next(p for p in strategy.plugins if isinstance(p, _ICaRLPlugin))
    loss_plugin = next(p for p in strategy.plugins if isinstance(p, ICaRLLossPlugin))

    def seen_mean_bce(pred, target):  # clbench's average over the seen classes (see the docstring)
        return nn.functional.binary_cross_entropy(pred, target, reduction="sum") / (pred.shape[0] * int(SeenClasses.allowed.sum()))

    loss_plugin.criterion = seen_mean_bce

    def replay_in_clbench_order(self, strategy, **kwargs):
        """The training set = the experience plus Avalanche's own exemplars, in clbench's batch order."""
        k = strategy.clock.train_exp_counter
        exp = stream[k]
        order = torch.cat([idx for idx, _ in batch_schedule(*_icarl_samples(ours, k, exp), cfg, k)])
        memory = torch.cat(self.x_memory) if self.x_memory else train_x[:0]
        rows = []
        new = set(exp.train_idx.tolist())
        for i in order.tolist():
            if i in new:
                rows.append(train_x[i])
            else:  # this exemplar must be in Avalanche's memory
                hit = (memory == train_x[i]).all(1).nonzero()
                assert hit.numel(), f"experience {k}: clbench's exemplar {i} is not in Avalanche's memory"
                rows.append(memory[int(hit[0])])
        y = stream.train.y[order]
        strategy.adapted_dataset = _make_taskaware_tensor_classification_dataset(torch.stack(rows), y, targets=y, task_labels=0)

    plugin.after_train_dataset_adaptation = replay_in_clbench_order.__get__(plugin)
    return strategy, plugin, train_x


def _icarl_samples(ours, k, exp):
    """The (indices, experience-of-each) clbench trained on in experience ``k`` (its exemplars then)."""
    from clbench.engine import training_samples

    exemplars = _ICARL_MEMORY[k]
    exps = [exp] if not exemplars else [exp, type(exp)(exp.index, exp.task_id, exp.classes,
                                                        torch.cat([exemplars[c] for c in sorted(exemplars)]), exp.train_idx[:0])]
    idx, which, _ = training_samples(exps)
    return idx, which


_ICARL_MEMORY: dict[int, dict[int, torch.Tensor]] = {}  # clbench's exemplars before experience k


def test_icarl_equals_avalanche_icarl(tmp_path):
    """iCaRL (see the module docstring): equal exemplar sets, weights and NME scores."""
    from clbench.strategies import icarl as icarl_module

    _ICARL_MEMORY.clear()
    orig_before = icarl_module.ICaRL.training_experiences

    def record(self, exp, ctx):  # clbench's memory when each experience starts
        _ICARL_MEMORY[exp.index] = {c: v.clone() for c, v in self.exemplars.items()}
        return orig_before(self, exp, ctx)

    icarl_module.ICaRL.training_experiences = record
    try:
        engine, initial = clbench_run(tmp_path, "strategy=icarl", f"strategy.memory_size={ICARL_K}",
                                      "strategy.herding_repeats=true")
    finally:
        icarl_module.ICaRL.training_experiences = orig_before
    ours = engine.strategy
    strategy, plugin, train_x = _icarl_avalanche(engine, initial)
    av_stream = avalanche_stream_for_icarl(engine, train_x)
    for k, exp in enumerate(av_stream):
        SeenClasses.allowed = engine.stream.class_mask(k)[0].clone()
        strategy.train(exp, shuffle=False, num_workers=0)
    # 1. the same exemplars (by content: Avalanche keeps tensors, clbench indices)
    y_mem = [ys[0] for ys in plugin.y_memory]
    assert sorted(y_mem) == sorted(ours.exemplars)
    for xs, rank, c in zip(plugin.x_memory, plugin.order, y_mem):
        theirs = {tuple(r.tolist()) for r in xs}
        mine = {tuple(r.tolist()) for r in train_x[ours.exemplars[c]]}
        assert theirs == mine, f"class {c}: exemplar sets differ"
        assert torch.equal(xs[rank.argsort()], train_x[ours.exemplars[c]]), f"class {c}: herding orders differ"
    # 2. the same weights
    model = strategy.model
    assert_same_weights(engine.model.backbone, model.feature_extractor)
    assert_same_weights(engine.model.head, model.train_classifier.model)
    # 3. the same class means and NME scores on the test set (over the classes seen)
    x_test = engine.ctx.inputs(engine.stream.test.x)
    model.eval()
    with torch.no_grad():
        theirs = model(x_test.flatten(1))
    mine = ours.predict(x_test)
    valid = ours.class_means.valid
    assert bool(valid.all())
    torch.testing.assert_close(model.eval_classifier.class_means, ours.class_means.mu, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs[:, valid], mine[:, valid], atol=1e-5, rtol=1e-4)
    assert (theirs.argmax(1) != mine.argmax(1)).sum() <= 1  # (a near-tie may flip)


def avalanche_stream_for_icarl(engine: Engine, train_x: torch.Tensor):
    """Each experience's new samples (flat inputs), in index order (herding only looks at them)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset

    stream = engine.stream
    sets = []
    for exp in stream:
        idx = exp.train_idx.cpu()
        sets.append(_make_taskaware_tensor_classification_dataset(train_x[idx], stream.train.y[idx], targets=stream.train.y[idx], task_labels=0))
    bm = benchmark_from_datasets(train=sets, test=sets[:1])
    classes = [exp.classes.tolist() for exp in stream]
    bm.n_classes_per_exp = [len(c) for c in classes]
    bm.classes_order = [c for cs in classes for c in cs]
    exps = list(bm.train_stream)
    for exp in exps:  # what Avalanche's iCaRL reads (class-incremental benchmarks have it)
        exp.benchmark = bm
    return exps


def test_icarl_resumed_mid_experience_equals_uninterrupted(tmp_path):
    """An iCaRL run stopped in its third experience (after a checkpoint mid-experience, so exemplars,
    class means and the previous model come from the checkpoint) and resumed ends as the
    uninterrupted run: ``summary.json`` and every ``metrics.jsonl`` row (see tests/test_resume.py)."""
    from dataclasses import dataclass

    from test_resume import QUIET, assert_same_run

    from clbench.engine import run
    from clbench.registry import register_strategy
    from clbench.strategies.icarl import ICaRL, ICaRLConfig

    @dataclass
    class StoppingICaRLConfig(ICaRLConfig):
        name: str = "stopping_icarl"

    @register_strategy("stopping_icarl", config=StoppingICaRLConfig, description="test: iCaRL that stops its run")
    class StoppingICaRL(ICaRL):
        stop_at = -1

        def after_step(self, batch, ctx):
            super().after_step(batch, ctx)
            if ctx.iteration == StoppingICaRL.stop_at:
                raise KeyboardInterrupt

    def cfg(name):
        return load_config(None, [*QUIET, f"output_dir={tmp_path}", f"name={name}", "scenario=class_incremental",
                                  "scenario.dataset=digits", "scenario.n_tasks=5", "model=mlp", "model.hidden=[32]",
                                  "strategy=stopping_icarl", "strategy.memory_size=40", "strategy.herding_repeats=true",
                                  "train.iterations=6", "train.batch_size=32", "train.momentum=0.9",
                                  "train.reset_optimizer=false", "eval.every=4", "checkpoint.enabled=true",
                                  "checkpoint.every=5", "device=cpu", "seed=5"])

    run(cfg("full"))
    StoppingICaRL.stop_at = 17  # experience 3 (iterations 13-18), after the checkpoint at 15
    try:
        with pytest.raises(KeyboardInterrupt):
            run(cfg("cut"))
    finally:
        StoppingICaRL.stop_at = -1
    run(resume=tmp_path / "cut")
    assert_same_run(tmp_path / "cut", tmp_path / "full")
