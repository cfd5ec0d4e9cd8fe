"""clbench's rehearsal baselines against avalanche-lib 0.6's (issue 15, section 3): A-GEM, GDumb (iCaRL: not yet).

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
