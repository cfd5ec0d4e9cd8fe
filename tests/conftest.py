"""Shared fixtures: the real-data root and a small, fast MNIST.

The data root is ``$CLBENCH_DATA_ROOT`` when it is set, else ``<repo>/../shared/data``; it is
resolved once, here, and every test reads it from :data:`DATA_ROOT` (module-level skip marks)
or the ``data_root`` fixture, never re-deriving it.  The autouse fixture exports that same
root to the code under test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ["CLBENCH_DATA_ROOT"]) if os.environ.get("CLBENCH_DATA_ROOT") else REPO_ROOT.parent / "shared" / "data"
SHARED_DATA = DATA_ROOT  # older name
MNIST_DIR = DATA_ROOT / "mnist"


def pytest_configure(config) -> None:
    """Refuse to test another checkout's code: with an editable install of a different clone (or a
    scratch copy of this one), ``clbench.strategies``/``clbench.scenarios`` would silently come from
    there (the editable finder maps them to that clone's top-level folders)."""
    import importlib

    for name in ("clbench", "clbench.strategies", "clbench.scenarios"):
        origin = Path(importlib.import_module(name).__file__).resolve()
        if REPO_ROOT.resolve() not in origin.parents:
            raise pytest.UsageError(f"{name} is imported from {origin.parent}, not from this checkout {REPO_ROOT}: "
                                    f"run `pip install -e .` here (or symlink clbench/strategies -> ../strategies "
                                    f"and clbench/scenarios -> ../scenarios in a scratch copy)")


@pytest.fixture
def data_root() -> Path:
    """The real-data root (``$CLBENCH_DATA_ROOT`` if set, else ``<repo>/../shared/data``)."""
    return DATA_ROOT


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Keep runs, caches and wandb files out of the repo and off the network."""
    cache = tmp_path_factory.getbasetemp() / "clbench-cache"
    monkeypatch.setenv("CLBENCH_CACHE", str(cache))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("CLBENCH_DATA_ROOT", str(DATA_ROOT))  # the same root the tests read
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """For tiny models, which are overhead-bound: one intra-op thread is as fast, and far faster
    than two on a busy 2-core machine (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_mnist(per_class_train: int, per_class_test: int):
    """The first ``per_class_*`` images of each digit of the real MNIST (deterministic)."""
    from clbench.data import ImageDataset, ImageSplit, load_dataset

    full = load_dataset("mnist", str(MNIST_DIR))

    def take(split: ImageSplit, n: int) -> ImageSplit:
        idx = torch.cat([(split.y == c).nonzero().flatten()[:n] for c in range(10)]).sort().values
        return ImageSplit(split.x[idx], split.y[idx])

    return ImageDataset("mnist_small", take(full.train, per_class_train), take(full.test, per_class_test),
                        full.class_names, full.mean, full.std)


needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                                 reason=f"real MNIST not found in {MNIST_DIR}")


def lr_per_iteration(scheduler: str | object, n_iter: int, per_epoch: int | None, lr: float = 0.1,
                     **train) -> list[float]:
    """The learning rate of each of ``n_iter`` iterations under the engine's schedule (stepped after every
    optimizer step): ``scheduler`` is a ``train.scheduler`` name (``train``: other TrainConfig fields) or a
    whole train config (e.g. ``load_config(...).train``)."""
    from types import SimpleNamespace

    from clbench.engine import make_scheduler

    cfg = scheduler if not isinstance(scheduler, str) else SimpleNamespace(
        **{"warmup_iters": 0, "milestones": [], "gamma": 0.1, **train}, scheduler=scheduler, lr=lr)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(opt, cfg, n_iter, per_epoch)
    out = []
    for _ in range(n_iter):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out
