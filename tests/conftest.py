"""Shared fixtures: paths to the real data in ../shared/data and a small, fast MNIST."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Keep runs, caches and wandb files out of the repo and off the network."""
    cache = tmp_path_factory.getbasetemp() / "clbench-cache"
    monkeypatch.setenv("CLBENCH_CACHE", str(cache))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("CLBENCH_DATA_ROOT", str(SHARED_DATA))
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
