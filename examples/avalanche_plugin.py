"""clbench's continual evaluation inside an Avalanche training loop (``clbench.avalanche``).

An Avalanche ``Naive`` strategy on Avalanche's own Split MNIST, with clbench's evaluator as a
plugin: every 5 training iterations it evaluates the seen experiences on fixed 500-image
subsets (on the device, one pass), at each experience end the full test sets, and writes a
clbench run directory (metrics.jsonl, summary.json, TensorBoard) with ACC, forgetting, BWT,
min-ACC, WC-ACC, windowed forgetting and the stability gaps.

    python examples/avalanche_plugin.py --mnist ../shared/data/mnist --out runs
    clbench compare runs          # reads the plugin's run like any clbench run
    clbench report runs           # figures: per-task accuracy curves, stability gaps

``--mnist`` is a folder with MNIST's 4 idx files (``.gz`` or not); they are laid out the way
torchvision expects in a temporary folder, so Avalanche never downloads anything.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
from pathlib import Path

import torch

IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def torchvision_layout(idx_dir: str | Path, root: str | Path) -> Path:
    """``root/MNIST/raw/<idx files>`` (uncompressed), torchvision's MNIST layout; returns ``root``."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX:
        src = Path(idx_dir) / name
        if src.is_file():
            shutil.copyfile(src, raw / name)
        else:
            with gzip.open(src.with_name(name + ".gz"), "rb") as f, open(raw / name, "wb") as out:
                shutil.copyfileobj(f, out)
    return Path(root)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist", required=True, help="folder with MNIST's 4 idx files")
    parser.add_argument("--out", default="runs", help="where the clbench run directory is created")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-per-experience", type=int, default=0,
                        help="train on the first N images of each experience (0: all; for a quick try)")
    args = parser.parse_args(argv)

    from avalanche.benchmarks.classic import SplitMNIST
    from avalanche.models import SimpleMLP
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import Naive

    from clbench.avalanche import ContinualEvaluationPlugin

    with tempfile.TemporaryDirectory() as tmp:
        benchmark = SplitMNIST(n_experiences=5, seed=0, dataset_root=str(torchvision_layout(args.mnist, tmp)))
        torch.manual_seed(0)
        model = SimpleMLP(num_classes=10)
        clbench_eval = ContinualEvaluationPlugin(benchmark.test_stream, every=5, subset_size=500,
                                                 output_dir=args.out, config={"strategy": {"name": "naive"}})
        strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                         criterion=torch.nn.CrossEntropyLoss(), train_mb_size=128, train_epochs=1,
                         eval_mb_size=512, device=args.device, plugins=[clbench_eval],
                         evaluator=EvaluationPlugin(loggers=[]),  # add Avalanche loggers here: they get the values too
                         eval_every=-1)  # Avalanche's own evaluation off: the plugin evaluates
        for experience in benchmark.train_stream:
            if args.train_per_experience > 0:
                experience.dataset = experience.dataset.subset(range(min(args.train_per_experience,
                                                                         len(experience.dataset))))
            strategy.train(experience, num_workers=0)

    summary = clbench_eval.summary()
    print(f"run directory: {summary['run_dir']} ({summary['status']}, {summary['iterations']} iterations)")
    for key in ("acc", "forgetting", "bwt", "min_acc", "wc_acc", "wf10", "n_gaps"):
        print(f"  {key:>10}: {summary[key]}")
    last = strategy.evaluator.get_last_metrics()  # the same values, by Avalanche's names
    print("  Avalanche sees:", ", ".join(sorted(name for name in last if name.startswith("Top1_Acc_Exp"))[:2]), "...")
    return summary


if __name__ == "__main__":
    main()
