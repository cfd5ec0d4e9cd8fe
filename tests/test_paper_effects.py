"""Paper-level effects on Split MNIST (real MNIST, 500 train / 100 test images per digit).

* Fine-tuning forgets in class-IL: old tasks drop to ~0 after the last task.
* EWC helps in task-IL but not in class-IL (van de Ven, Tuytelaars & Tolias 2022, Table 2).
* Replay shows a stability gap: right after each task boundary the accuracy of earlier tasks
  dips far below its pre-boundary value before partly recovering (De Lange et al. 2023, Fig. 1).
"""

from __future__ import annotations

import pytest

from clbench.config import load_config
from clbench.engine import run
from clbench.registry import DATASETS, register_dataset
from conftest import REPO_ROOT, needs_mnist, small_mnist

pytestmark = needs_mnist

COMMON = ["scenario.dataset=mnist_small", "model.hidden=[100,100]", "train.batch_size=64", "train.iterations=300",
          "eval.subset_size=200", "logging.console=false", "logging.tensorboard=false", "checkpoint.enabled=false"]


@pytest.fixture(scope="module")
def split_mnist(tmp_path_factory):
    if "mnist_small" not in DATASETS:
        data = small_mnist(500, 100)
        register_dataset("mnist_small", description="test: 500/100 MNIST images per digit")(
            lambda root=None, cache_dir=None: data)
    out = tmp_path_factory.mktemp("runs")
    results: dict[str, dict] = {}

    def result(name: str, *overrides: str) -> dict:
        if name not in results:
            cfg = load_config(REPO_ROOT / "configs" / "split_mnist.yaml", [*COMMON, f"output_dir={out}", f"name={name}", *overrides])
            results[name] = run(cfg)
        return results[name]

    return result


def test_finetune_forgets_old_tasks_in_class_il(split_mnist):
    last = split_mnist("ft_class", "strategy=finetune", "eval.every=50")["matrix"][-1]
    assert max(last[:-1]) < 0.05 and last[-1] > 0.9


def test_ewc_helps_in_task_il_but_not_in_class_il(split_mnist):
    ewc = ["strategy=ewc", "strategy.lambda_=1e5", "strategy.params=all", "eval.every=50"]
    ft_task = split_mnist("ft_task", "strategy=finetune", "scenario=task_incremental", "eval.every=50")["acc"]
    ewc_task = split_mnist("ewc_task", *ewc, "scenario=task_incremental")["acc"]
    ft_class = split_mnist("ft_class", "strategy=finetune", "eval.every=50")["acc"]
    ewc_class = split_mnist("ewc_class", *ewc)["acc"]
    assert ewc_task > ft_task + 0.05 and ewc_task > 0.93
    assert ewc_class < 0.3 and abs(ewc_class - ft_class) < 0.05


def test_replay_shows_a_stability_gap(split_mnist):
    summary = split_mnist("replay", "strategy=replay", "strategy.buffer_size=500", "eval.every=2")
    gaps = summary["stability_gaps"]
    assert len(gaps) == 4
    for g in gaps:  # earlier tasks dip far below their end-of-task accuracy after each boundary ...
        assert g["pre_acc"] - g["min_acc"] > 0.15, g
        assert g["iters_to_min"] < 100, g  # ... early in the new task
    assert summary["min_acc"] < summary["acc"] - 0.15  # ... and recover well above that minimum
    assert summary["acc"] > 0.7
