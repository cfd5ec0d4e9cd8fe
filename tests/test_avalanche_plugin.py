"""clbench's evaluator as an Avalanche plugin (issue 14, section 2): the per-iteration accuracies
equal Avalanche's own ``accuracy_metrics(experience=True)`` with ``eval_every=1,
peval_mode="iteration"``; the run directory is read by ``clbench compare``; the values reach
Avalanche's EvaluationPlugin; the example runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("avalanche")

import torch  # noqa: E402
from conftest import DATA_ROOT  # noqa: E402

MNIST = DATA_ROOT / "mnist"
ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not MNIST.is_dir(), reason="MNIST idx files not available")


def split_mnist(tmp_path, n_exp=3, train_per_class=100, test_per_class=50):
    """A small Split MNIST (classes 0..2*n_exp-1, two per experience) as an Avalanche benchmark
    built from float tensors (no download, no transforms)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset

    from clbench.data.datasets import load_mnist

    data = load_mnist(str(MNIST), cache_dir=str(tmp_path / "cache"))

    def pick(split, classes, n):
        idx = torch.cat([(split.y == c).nonzero().flatten()[:n] for c in classes])
        x, y = split.x[idx].float() / 255.0, split.y[idx]
        return _make_taskaware_tensor_classification_dataset(x, y, targets=y, task_labels=0)

    classes = [(2 * k, 2 * k + 1) for k in range(n_exp)]
    return benchmark_from_datasets(train=[pick(data.train, c, train_per_class) for c in classes],
                                   test=[pick(data.test, c, test_per_class) for c in classes])


def avalanche_strategy(kind, plugins, eval_every, evaluator, batch=64):
    from avalanche.models import SimpleMLP
    from avalanche.training.supervised import EWC, Naive

    torch.manual_seed(0)
    model = SimpleMLP(num_classes=10, hidden_size=64, drop_rate=0.0)
    kw = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=torch.nn.CrossEntropyLoss(),
              train_mb_size=batch, train_epochs=1, eval_mb_size=1000, device="cpu", plugins=plugins,
              evaluator=evaluator, eval_every=eval_every, peval_mode="iteration")
    return EWC(ewc_lambda=1.0, **kw) if kind == "ewc" else Naive(**kw)


@pytest.mark.parametrize("kind", ["naive", "ewc"])
def test_plugin_matches_avalanche_accuracy_every_iteration(tmp_path, kind):
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from clbench.avalanche import ContinualEvaluationPlugin
    from clbench.logging import read_metrics

    bm = split_mnist(tmp_path)
    plugin = ContinualEvaluationPlugin(bm.test_stream, every=1, subset_size=0, precision="fp32", eval_batch_size=1000,
                                       run_dir=tmp_path / "run", publish=False)
    strategy = avalanche_strategy(kind, [plugin], 1, EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))
    calls = []
    original_eval = strategy.eval

    def recording_eval(exps, **kw):
        out = original_eval(exps, **kw)
        last = strategy.evaluator.get_last_metrics()
        calls.append([last[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"] for j in range(len(exps))])
        return out

    strategy.eval = recording_eval
    n_iters = []
    for k, exp in enumerate(bm.train_stream):
        strategy.train(exp, eval_streams=[bm.test_stream[: k + 1]], shuffle=False, num_workers=0)
        n_iters.append(-(-len(exp.dataset) // 64))
    # Avalanche per train(): one eval before, one per iteration, one after; keep the per-iteration ones
    ours, start = [], 0
    for n in n_iters:
        ours += calls[start + 1:start + 1 + n]
        start += n + 2
    assert start == len(calls)
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "eval"]
    theirs = [[r[f"eval/acc/task_{j}"] for j in range(len(row))] for r, row in zip(records, ours)]
    assert [r["step"] for r in records] == list(range(1, sum(n_iters) + 1))
    # identical accuracies at every iteration (clbench's are float32 ratios: 1e-6 < one image in 100)
    assert len(theirs) == len(ours) and all(t == pytest.approx(o, abs=1e-6) for t, o in zip(theirs, ours))
    assert len({tuple(row) for row in ours}) > 5  # the curves do move

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["experiences_done"] == 3 and summary["iterations"] == sum(n_iters)
    final = calls[-1]  # Avalanche's eval after the last experience: full test sets 0..2
    assert summary["matrix"][2] == pytest.approx(final)
    assert summary["acc"] == pytest.approx(sum(final) / 3)
    for key in ("forgetting", "bwt", "min_acc", "wc_acc", "wf10"):
        assert isinstance(summary[key], float), key
    assert [g["experience"] for g in summary["stability_gaps"]] == [1, 2]
    assert any((tmp_path / "run").glob("events.out.tfevents*")) or any((tmp_path / "run").rglob("events.out.tfevents*"))


def test_plugin_publishes_to_avalanche_and_compare_reads_the_run(tmp_path):
    from avalanche.training.plugins import EvaluationPlugin

    from clbench import results
    from clbench.avalanche import ContinualEvaluationPlugin

    bm = split_mnist(tmp_path, n_exp=2, train_per_class=96, test_per_class=40)  # 3 iterations per experience
    plugin = ContinualEvaluationPlugin(bm, every=2, subset_size=30, output_dir=tmp_path / "runs")
    strategy = avalanche_strategy("naive", [plugin], -1, EvaluationPlugin(loggers=[], collect_all=True))
    for exp in bm.train_stream:
        strategy.train(exp)
    history = strategy.evaluator.get_all_metrics()
    xs, accs = history["Top1_Acc_Exp/eval_phase/test_stream/Exp000"]
    # every 2 iterations, and the last iteration of each experience (3, 6), then the full-test value
    assert sorted(set(xs)) == [2, 3, 4, 6] and all(0.0 <= a <= 1.0 for a in accs)
    assert "Top1_Acc_Exp/eval_phase/test_stream/Exp001" in history
    for name in ("clbench/min_acc", "clbench/wc_acc", "clbench/acc", "clbench/forgetting"):
        assert name in history, name
    assert plugin.evaluator.subset_sizes == [30, 30]  # fixed seeded subsets
    (run_dir,) = (tmp_path / "runs").iterdir()
    df = results.load(str(tmp_path / "runs"))
    assert df.loc[0, "status"] == "finished" and df.loc[0, "strategy.name"] == "naive"
    assert df.loc[0, "acc"] == pytest.approx(plugin.summary()["acc"])
    table = results.compare([str(tmp_path / "runs")], metrics=["acc", "min_acc"])
    assert "naive" in table or "acc" in table


def test_plugin_rejects_unknown_options():
    from clbench.avalanche import ContinualEvaluationPlugin
    from clbench.registry import ClbenchError

    with pytest.raises(ClbenchError, match="unknown option"):
        ContinualEvaluationPlugin([], windowz=[10])
    with pytest.raises(ClbenchError, match="every"):
        ContinualEvaluationPlugin([], every=-3)


def test_example_avalanche_plugin_runs(tmp_path, capsys):
    """examples/avalanche_plugin.py: Avalanche's SplitMNIST from a temporary torchvision layout
    (no download), Naive + the plugin, a finished clbench run directory (run in-process: the
    imports are shared with the tests above)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("avalanche_plugin_example", ROOT / "examples" / "avalanche_plugin.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    summary = example.main(["--mnist", str(MNIST), "--out", str(tmp_path / "runs"), "--device", "cpu",
                            "--train-per-experience", "256"])
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["status"] == "finished" and summary["experiences_done"] == 5 and summary["iterations"] == 10
    assert len(summary["matrix"]) == 5 and summary["min_acc"] is not None
    assert "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000" in capsys.readouterr().out
