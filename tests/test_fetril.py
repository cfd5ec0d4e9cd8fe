"""FeTrIL (strategies/fetril.py): the translation against a hand computation, the SVMs covering
every seen class, and end-to-end runs on the built-in digits (frozen backbone, little
forgetting, resume).  CPU, deterministic, a few seconds."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from clbench.config import load_config
from clbench.engine import Engine, run
from clbench.logging import read_metrics
from clbench.registry import ClbenchError, register_strategy
from clbench.strategies import fetril as F
from clbench.strategies.fetril import FeTrIL, FeTrILConfig

FAST = ["strategy=fetril", "logging.console=false", "logging.tensorboard=false", "logging.progress=false", "eval.every=0",
        "scenario.initial_classes=4", "scenario.n_tasks=4", "train.epochs=3", "train.lr=0.1", "train.batch_size=32",
        "device=cpu"]
MLP = ("model=mlp", "model.hidden=[64]")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


def make_cfg(tmp_path, *overrides, name="run", model=MLP):
    return load_config(None, [f"output_dir={tmp_path}", f"name={name}", *FAST, *model, *overrides])


# ---------------------------------------------------------------------- the translation
def test_translation_matches_a_hand_computation():
    # new classes 5 and 7 (2-d features), past classes 0 and 2 with stored centroids
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [10.0, 10.0], [2.0, 0.0], [12.0, 10.0]])
    labels = torch.tensor([5, 5, 7, 5, 7])
    new = torch.tensor([5, 7])
    new_means = F.class_means(feats, labels, new)
    assert new_means.tolist() == [[2.0, 0.0], [11.0, 10.0]]
    past = torch.tensor([0, 2])
    past_means = torch.tensor([[9.0, 9.0], [0.0, 1.0]], dtype=torch.float64)  # nearest: 7, then 5
    pseudo, pseudo_y, nearest = F.translate(feats, labels, new, new_means, past, past_means)
    assert new[nearest].tolist() == [7, 5]
    # class 0 <- features of 7 shifted by (9,9)-(11,10) = (-2,-1); class 2 <- features of 5 shifted by (-2,1)
    expected = {0: [[8.0, 9.0], [10.0, 9.0]], 2: [[-1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]}
    for c, rows in expected.items():
        assert pseudo[pseudo_y == c].tolist() == rows
    assert pseudo.dtype == torch.float64 and pseudo_y.dtype == labels.dtype


def test_pseudo_feature_means_equal_the_past_means_and_n_star_is_the_nearest():
    g = torch.Generator().manual_seed(0)
    new = torch.arange(10, 16)
    labels = new[torch.randint(0, 6, (300,), generator=g)]
    feats = torch.randn(300, 8, generator=g).abs() + labels.unsqueeze(1).float() * 0.1
    new_means = F.class_means(feats, labels, new)
    past = torch.arange(10)
    past_means = torch.randn(10, 8, generator=g, dtype=torch.float64).abs()
    pseudo, pseudo_y, nearest = F.translate(feats, labels, new, new_means, past, past_means)
    brute = torch.tensor([min(range(6), key=lambda j: float(((past_means[i] - new_means[j]) ** 2).sum()))
                          for i in range(10)])
    assert torch.equal(nearest, brute)
    for i, c in enumerate(past.tolist()):
        rows = pseudo[pseudo_y == c]
        assert rows.shape[0] == int((labels == new[nearest[i]]).sum())  # as many as n* has
        torch.testing.assert_close(rows.mean(0), past_means[i], rtol=0, atol=1e-12)


def test_no_past_classes_gives_no_pseudo_features():
    feats, labels = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    pseudo, y, nearest = F.translate(feats, labels, torch.tensor([0, 1]), F.class_means(feats, labels, torch.tensor([0, 1])),
                                     torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.float64))
    assert pseudo.shape == (0, 3) and y.numel() == 0 and nearest.numel() == 0


# ---------------------------------------------------------------------- the SVMs
def _blobs(n_classes=4, per_class=40, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 2
    x = np.concatenate([centres[c] + rng.normal(size=(per_class, dim)) for c in range(n_classes)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.repeat(np.arange(n_classes), per_class)


def test_one_vs_rest_svms_are_liblinears_and_the_torch_solver_agrees():
    from sklearn.svm import LinearSVC

    x, y = _blobs()
    w, b = F.fit_linear_svms(x, y, np.arange(4), n_jobs=2)
    ref = LinearSVC(penalty="l2", loss="squared_hinge", dual=False, C=1.0, tol=1e-4).fit(x, y)  # liblinear's own OvR
    np.testing.assert_allclose(w, ref.coef_, atol=1e-6)
    np.testing.assert_allclose(b, ref.intercept_, atol=1e-6)
    scores = x @ w.T + b
    assert scores.shape == (len(y), 4)  # one column per class
    wt, bt = F.fit_linear_svms_torch(torch.from_numpy(x), torch.from_numpy(y), torch.arange(4), tol=1e-10)
    w8, b8 = F.fit_linear_svms(x, y, np.arange(4), tol=1e-10, max_iter=10000, n_jobs=1)
    np.testing.assert_allclose(wt.numpy(), w8, atol=1e-6)  # the same optimum
    np.testing.assert_allclose(bt.numpy(), b8, atol=1e-6)


def test_svms_see_every_seen_class_and_pseudo_classes_are_in_their_targets(tmp_path, monkeypatch):
    seen_fits = []
    original = F.fit_linear_svms

    def recording(x, y, classes, **kw):
        seen_fits.append((np.asarray(y).copy(), np.asarray(classes).copy(), np.linalg.norm(x, axis=1)))
        return original(x, y, classes, **kw)

    monkeypatch.setattr(F, "fit_linear_svms", recording)
    engine = Engine(make_cfg(tmp_path))
    engine.run()
    strategy: FeTrIL = engine.strategy
    assert len(seen_fits) == 4
    for k, (y, classes, norms) in enumerate(seen_fits):
        n_seen = 4 + 2 * k
        assert classes.tolist() == list(range(n_seen))  # one classifier per seen class
        assert sorted(set(y.tolist())) == list(range(n_seen))  # past classes present through pseudo-features
        np.testing.assert_allclose(norms, 1.0, rtol=1e-9)  # every row L2-normalised
        stats = strategy.stats[k]
        assert stats["n_pseudo"] == (len(y) - stats["n_real"]) and (stats["n_pseudo"] > 0) == (k > 0)
        assert set(stats["nearest"]) == set(range(4 + 2 * (k - 1))) if k else not stats["nearest"]
    assert bool(strategy.trained.all())
    x = torch.randn(5, 1, 8, 8)
    assert strategy.predict(x).shape == (5, 10)


def test_parity_flag_leaves_the_first_512_rows_unnormalised(tmp_path, monkeypatch):
    norms = []
    monkeypatch.setattr(F, "fit_linear_svms",
                        lambda x, y, classes, **kw: (norms.append(np.linalg.norm(x, axis=1)),
                                                     (np.zeros((len(classes), x.shape[1])), np.zeros(len(classes))))[1])
    run(make_cfg(tmp_path, "strategy=fetril", "strategy.parity_unnormalized_first_512=true", "scenario.n_tasks=2",
                 "scenario.initial_classes=8", "train.epochs=1"))
    first = norms[0]  # ~570 base-class rows, sorted by class
    assert len(first) > 512 and not np.allclose(first[:512], 1.0)
    np.testing.assert_allclose(first[512:], 1.0, rtol=1e-9)


# ---------------------------------------------------------------------- end to end on digits
@dataclass
class ProbeConfig(FeTrILConfig):
    name: str = "fetril_probe"


PROBE: dict = {}  # what the probe recorded; PROBE["crash_before"] = k: a KeyboardInterrupt when experience k starts


@register_strategy("fetril_probe", config=ProbeConfig, description="test: FeTrIL recording the model after each state")
class FeTrILProbe(FeTrIL):
    def before_experience(self, exp, ctx):
        if exp.index == PROBE.get("crash_before"):
            del PROBE["crash_before"]
            raise KeyboardInterrupt
        super().before_experience(exp, ctx)

    def after_experience(self, exp, ctx):
        super().after_experience(exp, ctx)
        PROBE.setdefault("models", []).append(copy.deepcopy(self.model.state_dict()))
        PROBE.setdefault("grad", []).append([p.requires_grad for p in self.model.parameters()])


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fetril")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module scope: set up before the per-test _one_thread)
    try:
        PROBE.clear()
        fetril = run(make_cfg(tmp, "strategy=fetril_probe", name="fetril"))
        probe = dict(PROBE)
        finetune = run(make_cfg(tmp, "strategy=finetune", name="finetune"))
    finally:
        torch.set_num_threads(threads)
    return tmp, fetril, probe, finetune


def test_backbone_is_bit_identical_after_the_initial_state(digits_runs):
    _, _, probe, _ = digits_runs
    models = probe["models"]
    assert len(models) == 4
    for state in models[1:]:
        for key, value in models[0].items():
            assert torch.equal(state[key], value), key
    assert not any(any(flags) for flags in probe["grad"])  # frozen from the end of the initial state on
    info = json.loads((digits_runs[0] / "fetril" / "run_info.json").read_text())
    assert [e["classes"] for e in info["experiences"]] == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]


def test_little_forgetting_of_the_base_classes_unlike_finetuning(digits_runs):
    _, fetril, _, finetune = digits_runs
    base_fetril = [row[0] for row in fetril["matrix"]]
    base_ft = [row[0] for row in finetune["matrix"]]
    assert base_fetril[0] > 0.9 and base_fetril[-1] > 0.8
    assert base_fetril[0] - base_fetril[-1] < 0.15  # forgetting is small
    assert base_ft[-1] < 0.3  # fine-tuning forgets the base classes
    assert fetril["avg_inc_acc"] > finetune["avg_inc_acc"] + 0.2
    assert min(fetril["matrix"][-1]) > 0.6  # the new classes are learned too (no gradient steps after state 0)


def test_resumed_run_equals_the_uninterrupted_one(digits_runs, tmp_path):
    _, full, _, _ = digits_runs
    PROBE["crash_before"] = 2  # after the checkpoint written at the end of experience 1
    with pytest.raises(KeyboardInterrupt):
        run(make_cfg(tmp_path, "strategy=fetril_probe", name="killed"))
    resumed = run(resume=tmp_path / "killed")
    assert resumed["status"] == "finished"
    assert resumed["matrix"] == full["matrix"] and resumed["avg_inc_acc"] == full["avg_inc_acc"]


def test_state_dict_round_trip_gives_identical_predictions(tmp_path):
    engine = Engine(make_cfg(tmp_path, "strategy=fetril", "scenario.n_tasks=2", "scenario.initial_classes=6"))
    engine.run()
    old: FeTrIL = engine.strategy
    fresh = FeTrIL(copy.deepcopy(old.cfg))
    model = copy.deepcopy(engine.model)
    fresh.setup(model, engine.ctx)
    state = old.state_dict()
    fresh.load_state_dict(state)
    assert all(isinstance(v, torch.Tensor) for k, v in state.items() if k in ("means", "weight", "bias"))
    x = engine.ctx.inputs(engine.stream.test.x[:64])
    model.eval()
    engine.model.eval()
    assert torch.equal(fresh.predict(x), old.predict(x))
    assert not any(p.requires_grad for p in model.parameters())


def test_fc_variant_learns_and_keeps_its_layer_in_the_state(tmp_path):
    engine = Engine(make_cfg(tmp_path, "strategy=fetril", "strategy.classifier=fc", "strategy.fc_epochs=4"))
    summary = engine.run()
    strategy: FeTrIL = engine.strategy
    assert summary["matrix"][-1][0] > 0.6 and summary["avg_inc_acc"] > 0.6
    state = strategy.state_dict()
    assert state["fc"]["weight"].shape == (10, 64)
    assert not torch.equal(strategy.fc.weight, engine.model.head.weight)  # trained after state 0; the head is not
    fresh = FeTrIL(copy.deepcopy(strategy.cfg))
    fresh.setup(copy.deepcopy(engine.model), engine.ctx)
    fresh.load_state_dict(state)
    x = engine.ctx.inputs(engine.stream.test.x[:32])
    assert torch.equal(fresh.predict(x), strategy.predict(x))


def test_resnet_backbone_with_batchnorm_stays_frozen(tmp_path):
    PROBE.clear()
    run(make_cfg(tmp_path, "strategy=fetril_probe", "scenario.n_tasks=2", "scenario.initial_classes=6", "train.epochs=1",
                 "strategy.svm_solver=torch", model=("model=resnet18", "model.nf=4", "model.stem=imagenet")))
    first, last = PROBE["models"][0], PROBE["models"][-1]
    assert any("running_mean" in k for k in first)
    assert all(torch.equal(first[k], last[k]) for k in first)


def test_fixed_iterations_run_only_in_the_initial_state(tmp_path):
    summary = run(make_cfg(tmp_path, "strategy=fetril", "train.iterations=3"))
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "experience"]
    assert steps == [3] * len(steps) and summary["status"] == "finished"

def test_resnet_stems():
    from clbench.models.resnet import ResNet18Config, resnet18

    imagenet = resnet18(ResNet18Config(nf=8, stem="imagenet"), (3, 64, 64), 7)
    assert imagenet(torch.zeros(2, 3, 64, 64)).shape == (2, 7)
    assert imagenet.backbone.stem[0].kernel_size == (7, 7) and isinstance(imagenet.backbone.stem[3], torch.nn.MaxPool2d)
    default = resnet18(ResNet18Config(), (3, 32, 32), 10)  # unchanged: 3x3 stem, no pooling, nf=20
    assert default.backbone.stem[0].kernel_size == (3, 3) and len(default.backbone.stem) == 3
    with pytest.raises(ClbenchError, match="stem"):
        resnet18(ResNet18Config(stem="vit"), (3, 32, 32), 10)


def test_benchmark_pooled_accuracy_weights_tasks_by_their_test_images():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fetril_tiny_imagenet.py"
    spec = importlib.util.spec_from_file_location("fetril_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    matrix = [[0.6, None, None], [0.5, 0.9, None], [0.4, 0.8, 1.0]]
    pooled = bench.pooled_accuracies(matrix, [100, 20, 20])  # a 5x larger initial task
    assert pooled == pytest.approx([0.6, (50 + 18) / 120, (40 + 16 + 20) / 140])
    assert bench.pooled_accuracies([[0.5, None], [None, None]], [10, 10]) == [0.5]  # stops at unfilled rows
