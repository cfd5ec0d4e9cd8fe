"""An Avalanche benchmark run by clbench (``scenario=avalanche``), offline.

Builds an Avalanche class-incremental benchmark from tensors (synthetic 28x28 digits-like
images, or a subsample of real MNIST with ``--mnist``), turns it into a clbench stream, and
runs it with clbench's engine: per-iteration evaluation, accuracy matrix, ACC, min-ACC,
WC-ACC and the stability gaps, written to a clbench run directory.

    python examples/avalanche_benchmark.py --out runs
    python examples/avalanche_benchmark.py --mnist ../shared/data/mnist --out runs
    clbench compare runs

Any Avalanche benchmark object works the same way (``SplitMNIST(...)``, ``nc_benchmark(...)``,
``benchmark_from_datasets(...)``); a factory can also be named in a config:
``scenario=avalanche scenario.benchmark=avalanche.benchmarks.classic.SplitMNIST``.
A benchmark registered from Python exists only in this process: its run cannot be resumed
from another process (``clbench resume`` would not find ``scenario.benchmark``).
"""

from __future__ import annotations

import argparse

import torch
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils import as_classification_dataset

from clbench.config import load_config
from clbench.engine import run
from clbench.scenarios.avalanche import register_benchmark, stream_from_avalanche


class Pairs(torch.utils.data.Dataset):
    """(image, label) pairs over two tensors, with the ``targets`` Avalanche reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.targets = x, y, y.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def synthetic(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 1, 28, 28] images: one fixed random prototype per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255
    y = torch.arange(10).repeat_interleave(n_per_class)
    x = protos[y] * 0.25 + torch.rand(len(y), 1, 28, 28, generator=g) * 190  # overlapping classes
    return x.clamp(0, 255).to(torch.uint8), y


def mnist(root: str, n_per_class: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from clbench.data import load_dataset

    ds = load_dataset("mnist", root)
    pick = lambda s, n: torch.cat([(s.y == c).nonzero().flatten()[:n] for c in range(10)]).sort().values  # noqa: E731
    tr, te = pick(ds.train, n_per_class), pick(ds.test, n_per_class // 3)
    return (ds.train.x[tr], ds.train.y[tr]), (ds.test.x[te], ds.test.y[te])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mnist", help="folder with MNIST's idx files (default: synthetic tensors)")
    p.add_argument("--per-class", type=int, default=60, help="training images per class")
    p.add_argument("--iterations", type=int, default=30, help="training iterations per experience")
    p.add_argument("--out", default="runs")
    args = p.parse_args()

    if args.mnist:
        (xtr, ytr), (xte, yte) = mnist(args.mnist, args.per_class)
    else:
        (xtr, ytr), (xte, yte) = synthetic(args.per_class, 1), synthetic(max(args.per_class // 3, 1), 2)

    # 1. an ordinary Avalanche benchmark: 5 experiences of 2 classes, in a fixed class order
    benchmark = class_incremental_benchmark(
        {"train": as_classification_dataset(Pairs(xtr, ytr)), "test": as_classification_dataset(Pairs(xte, yte))},
        class_order=[4, 1, 7, 5, 3, 9, 0, 8, 6, 2], num_experiences=5)

    # 2. as a clbench stream (materialised once; Avalanche's experiences, classes and task labels)
    print(stream_from_avalanche(benchmark).describe())

    # 3. run it with clbench: register it under a name, then scenario.benchmark=<name>
    register_benchmark("my_split", benchmark)
    cfg = load_config(None, [
        "name=avalanche_benchmark", f"output_dir={args.out}", "scenario=avalanche", "scenario.benchmark=my_split",
        "strategy=finetune", f"train.iterations={args.iterations}", "train.batch_size=32", "eval.every=5",
        "eval.subset_size=0", "model.hidden=[64]", "logging.console=false", "logging.tensorboard=false"])
    summary = run(cfg)
    show = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731  (mean_gap is None when no boundary has a gap)
    print(f"ACC {show(summary['acc'])}  min-ACC {show(summary['min_acc'])}  WC-ACC {show(summary['wc_acc'])}  "
          f"stability gaps {summary['n_gaps']} (mean {show(summary['mean_gap'])})  ->  {summary['run_dir']}")


if __name__ == "__main__":
    main()
