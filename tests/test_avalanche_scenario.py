"""``scenario=avalanche``: Avalanche benchmarks mapped onto clbench streams, offline.

The same Split MNIST (a few dozen images per class) through Avalanche's ``nc_benchmark``
and through clbench's ``class_incremental`` with the same class order gives the same samples
per experience, listed in the same (source-dataset) order, hence the same seeded batches and
identical final metrics.  Avalanche's real ``SplitMNIST`` factory is built once over a
torchvision-layout copy of the shared idx files.
"""

from __future__ import annotations

import gzip
import hashlib
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

from clbench.config import load_config
from clbench.data import load_dataset
from clbench.data.datasets import _make_dataset
from clbench.engine import run
from clbench.registry import ClbenchError, register_dataset
from clbench.scenarios import build_stream
from clbench.scenarios.avalanche import register_benchmark, stream_from_avalanche
from conftest import DATA_ROOT

pytest.importorskip("avalanche")
MNIST = DATA_ROOT / "mnist"
needs_mnist = pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="no shared MNIST")
ORDER = [4, 1, 7, 5, 3, 9, 0, 8, 6, 2]
FAST = ["logging.console=false", "logging.tensorboard=false", "train.iterations=10", "train.batch_size=32",
        "eval.every=5", "eval.subset_size=0", "model.hidden=[64]", "checkpoint.enabled=false"]


class _Tensors(torch.utils.data.Dataset):
    """(x, y) pairs with a ``targets`` list, the form Avalanche's generators accept."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.targets = x, y, y.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def _small(split, per_class: int):
    keep = torch.cat([(split.y == c).nonzero().flatten()[:per_class] for c in range(10)])  # grouped by label
    return split.x[keep], split.y[keep]


@pytest.fixture(scope="module")
def small_mnist():
    full = load_dataset("mnist", str(MNIST))
    ds = _make_dataset("mnist_small_av", *_small(full.train, 60), *_small(full.test, 20), full.class_names)
    register_dataset("mnist_small_av", description="tests: 60+20 MNIST images per class")(lambda root=None, cache_dir=None: ds)
    return ds


def _hashes(x: torch.Tensor) -> list[str]:
    return [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in x]


@needs_mnist
def test_nc_benchmark_matches_class_incremental(small_mnist, tmp_path):
    from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark

    bm = nc_benchmark(_Tensors(small_mnist.train.x, small_mnist.train.y), _Tensors(small_mnist.test.x, small_mnist.test.y),
                      n_experiences=5, task_labels=False, fixed_class_order=ORDER)
    register_benchmark("mnist_small_nc", bm)
    common = [f"output_dir={tmp_path}", *FAST, "seed=3"]
    av_cfg = load_config(None, [*common, "name=av", "scenario=avalanche", "scenario.benchmark=mnist_small_nc"])
    cl_cfg = load_config(None, [*common, "name=cl", "scenario=class_incremental", "scenario.dataset=mnist_small_av",
                                f"scenario.class_order={ORDER}"])
    av, cl = build_stream(av_cfg.scenario, 3), build_stream(cl_cfg.scenario, 3)
    assert av.protocol == cl.protocol == "class" and av.class_order == cl.class_order == tuple(ORDER)
    assert (av.mean, av.std) == (cl.mean, cl.std)
    for a, c in zip(av, cl, strict=True):
        assert a.task_id == 0 and torch.equal(a.classes, c.classes)
        for split, ia, ic in (("train", a.train_idx, c.train_idx), ("test", a.test_idx, c.test_idx)):
            # the same samples in the same order (clbench's dataset order), so seeded batches coincide
            assert torch.equal(getattr(av, split).x[ia], getattr(cl, split).x[ic])
            assert torch.equal(getattr(av, split).y[ia], getattr(cl, split).y[ic])
    sa, sc = run(av_cfg), run(cl_cfg)
    assert sa["status"] == sc["status"] == "finished" and len(sa["matrix"]) == 5
    assert _metrics(sa) == _metrics(sc)


def _metrics(summary: dict) -> dict:
    """Everything in a run's summary but its directory: matrix, ACC, BWT, min-ACC, WC-ACC, windowed
    forgetting, the per-boundary stability gaps, ..."""
    assert {"matrix", "acc", "stability_gaps", "mean_gap", "wc_acc", "min_acc"} <= set(summary)
    return {k: v for k, v in summary.items() if k != "run_dir"}


def _torchvision_layout(idx_dir: Path, root: Path, folder: str) -> Path:
    """``root/<folder>/raw/<idx files>`` decompressed (torchvision's layout): no download is attempted."""
    (root / folder / "raw").mkdir(parents=True, exist_ok=True)
    for f in idx_dir.glob("*.gz"):
        with gzip.open(f) as src, open(root / folder / "raw" / f.name[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


def _strided(stream, n: int) -> list:
    """About ``n`` samples of every experience, spread over all its classes (Avalanche groups them by class)."""
    return [e.dataset.subset(range(0, len(e.dataset), max(len(e.dataset) // n, 1))) for e in stream]


@needs_mnist
def test_real_split_mnist_factory_offline(tmp_path):
    root = _torchvision_layout(MNIST, tmp_path / "tv", "MNIST")
    cfg = load_config(None, ["scenario=avalanche", "scenario.benchmark=avalanche.benchmarks.classic.SplitMNIST",
                             f"scenario.dataset_root={root}", "scenario.kwargs={n_experiences: 5, seed: 0}"])
    stream = build_stream(cfg.scenario, 0)
    full = load_dataset("mnist", str(MNIST))
    assert stream.protocol == "class" and len(stream) == 5 and len(stream.train) == 60000 and len(stream.test) == 10000
    assert stream.info["input_encoding"] == "uint8 (un-normalised)" and stream.mean == pytest.approx((0.1307,))
    first = torch.tensor(stream.class_order[:2])
    # the same images in the same (dataset) order as clbench's own MNIST: traced through Avalanche's subsets
    assert torch.equal(stream.train.x[stream[0].train_idx], full.train.x[torch.isin(full.train.y, first)])
    assert stream.train.y[stream[0].train_idx].unique().tolist() == [0, 1]


@needs_mnist
def test_permuted_mnist_offline_is_domain_incremental(tmp_path):
    from avalanche.benchmarks.classic import PermutedMNIST
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

    bm = PermutedMNIST(n_experiences=2, seed=0, dataset_root=str(_torchvision_layout(MNIST, tmp_path / "tv", "MNIST")))
    # subsampled (the same source images in both experiences) to keep the test short
    s = stream_from_avalanche(benchmark_from_datasets(train=_strided(bm.train_stream, 200), test=_strided(bm.test_stream, 50)))
    assert s.protocol == "domain" and len(s) == 2 and s.num_classes == 10 and s.class_mask(0).all()
    assert s.info["input_encoding"] == "uint8 (un-normalised)" and s.mean == pytest.approx((0.1307,))
    x0, x1 = s.train.x[s[0].train_idx], s.train.x[s[1].train_idx]
    assert torch.equal(s.train.y[s[0].train_idx], s.train.y[s[1].train_idx]) and s.train.y[s[0].train_idx].unique().numel() == 10
    # the same images under two pixel permutations: equal pixel multisets, different layouts
    assert torch.equal(x0.flatten(1).sort(1).values, x1.flatten(1).sort(1).values) and not torch.equal(x0, x1)


FMNIST = MNIST.parent / "fashion-mnist"


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(), reason="no shared Fashion-MNIST")
def test_split_fmnist_offline(tmp_path):
    from avalanche.benchmarks.classic import SplitFMNIST
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

    bm = SplitFMNIST(n_experiences=5, seed=0, dataset_root=str(_torchvision_layout(FMNIST, tmp_path / "tv", "FashionMNIST")))
    s = stream_from_avalanche(benchmark_from_datasets(train=_strided(bm.train_stream, 100), test=_strided(bm.test_stream, 40)))
    order = [int(c) for c in bm.classes_order]
    assert s.protocol == "class" and [sorted(s.class_order[c] for c in e.classes.tolist()) for e in s] == \
        [sorted(order[2 * k:2 * k + 2]) for k in range(5)]
    full = load_dataset("fashion_mnist", str(FMNIST))
    known = set(zip(_hashes(full.train.x), full.train.y.tolist()))
    original = torch.tensor(s.class_order)[s.train.y]  # back to Fashion-MNIST's labels
    assert set(zip(_hashes(s.train.x), original.tolist())) <= known  # real images, labels kept, pixels exact


def test_benchmark_from_datasets_tasks_domains_and_floats():
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.task_aware import task_incremental_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset

    g = torch.Generator().manual_seed(0)
    make = lambda lo, n: as_classification_dataset(_Tensors(torch.randint(0, 256, (n, 1, 4, 4), generator=g).float() / 255,  # noqa: E731
                                                            torch.arange(n) % 2 + lo))
    bm = benchmark_from_datasets(train=[make(0, 8), make(2, 6)], test=[make(0, 4), make(2, 4)])
    stream = stream_from_avalanche(bm)
    assert stream.protocol == "class" and [e.classes.tolist() for e in stream] == [[0, 1], [2, 3]]
    assert stream.info["input_encoding"] == "uint8 (ToTensor)" and stream.train.x.dtype == torch.uint8
    task = stream_from_avalanche(task_incremental_benchmark(bm))
    assert task.protocol == "task" and [e.task_id for e in task] == [0, 1]
    domain = stream_from_avalanche(benchmark_from_datasets(train=[make(0, 8), make(0, 6)], test=[make(0, 4), make(0, 4)]))
    assert domain.protocol == "domain" and domain.class_mask(0).all()
    # a float eval transform that is not 8-bit pixels is quantised, with mean/std undoing the scaling
    odd = as_classification_dataset(_Tensors(torch.randn(6, 1, 4, 4, generator=g), torch.arange(6) % 2))
    with pytest.warns(UserWarning, match="quantised"):
        q = stream_from_avalanche(benchmark_from_datasets(train=[odd], test=[odd]))
    m, s = torch.tensor(q.mean), torch.tensor(q.std)
    back = (q.train.x.float() / 255 - m) / s
    assert (back - torch.stack([odd[i][0] for i in range(6)])).abs().max() < 0.02


def test_unmappable_benchmarks_are_refused():
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.online import split_online_stream
    from avalanche.benchmarks.utils import as_classification_dataset

    class Strings(_Tensors):
        def __getitem__(self, i):
            return "not a tensor", int(self.y[i])

    bad = as_classification_dataset(Strings(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1])))
    with pytest.raises(ClbenchError, match="train experience 0, sample 0: input is a str"):
        stream_from_avalanche(benchmark_from_datasets(train=[bad], test=[bad]))
    good = as_classification_dataset(_Tensors(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 0, 1])))
    bm = benchmark_from_datasets(train=[good], test=[good])
    online = type("Online", (), {"train_stream": split_online_stream(bm.train_stream, 2), "test_stream": bm.test_stream})()
    with pytest.raises(ClbenchError, match="train experience 0 is an online sub-experience"):
        stream_from_avalanche(online)
    with pytest.raises(ClbenchError, match="nor a name given to register_benchmark in this process"):
        build_stream(load_config(None, ["scenario=avalanche", "scenario.benchmark=registered_elsewhere"]).scenario, 0)
    with pytest.raises(ClbenchError, match="cannot import"):
        build_stream(load_config(None, ["scenario=avalanche", "scenario.benchmark=nowhere.Bench"]).scenario, 0)


def test_example_avalanche_benchmark_runs(tmp_path, monkeypatch, capsys):
    """examples/avalanche_benchmark.py: an Avalanche benchmark from tensors, run by clbench offline."""
    example = Path(__file__).resolve().parents[1] / "examples" / "avalanche_benchmark.py"
    monkeypatch.setattr(sys, "argv", [str(example), "--out", str(tmp_path), "--per-class", "12", "--iterations", "5"])
    runpy.run_path(str(example), run_name="__main__")  # in-process: the imports are already paid for
    printed = capsys.readouterr().out
    assert "Experience(4, task=0, classes=[8, 9], train=24, test=8)" in printed and "ACC " in printed
    assert next(tmp_path.glob("*/summary.json")).is_file()
