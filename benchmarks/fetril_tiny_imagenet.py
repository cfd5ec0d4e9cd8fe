"""FeTrIL on Tiny-ImageNet-200: B100 + 5/10/20 steps, average incremental top-1 against the paper.

Paper (Petit et al., WACV 2023; official README, FeTrIL with LinearSVC): 54.8 (T=5, 5 x 20
classes), 53.1 (T=10, 10 x 10), 52.2 (T=20, 20 x 5), all after an initial state of 100 classes.

What runs: ``configs/fetril_tiny_imagenet.yaml`` through ``clbench.engine``, once per setting
(``scenario.n_tasks = T + 1``).  The initial model is trained in the first setting only; the
others reuse it (``strategy.initial_model``), which is exact because FeTrIL never changes the
model after experience 0 and the seeded class order does not depend on ``n_tasks`` (checked).

Initial-training recipe (sized for one GPU; the released one trains a LUCIR ResNet-18 for 90
epochs at 224 px, then fine-tunes it 290 epochs with AugMix + Lookahead: (90 + 290) x (224/64)^2
= about 39x the pixels processed here): ResNet-18 (standard widths nf=64, ImageNet stem: 7x7/2
conv + 3x3/2 max-pool) trained from scratch on the 100 base classes at the native 64 px; SGD
momentum 0.9, lr 0.1, weight decay 5e-4, batch 128, 120 epochs (46,920 iterations) with a
one-epoch linear warm-up then cosine decay to 0, ``crop_flip`` augmentation (4-px zero-padded
random crop + horizontal flip, on the GPU), bf16 autocast.  Expected cost (an estimate, not
measured yet): ~0.15 GMAC per 64-px forward pass, ~0.45 GMAC per training image, ~2.7 PMAC in
all -- roughly 5-10 minutes on one H100 (64-px batches of 128 are launch-bound rather than
FLOP-bound), trained once and shared by the three settings.  Classifiers:
``--svm-solver liblinear`` is scikit-learn's ``LinearSVC`` as in the official code, on the CPU
(threads over classes): up to 200 one-vs-rest fits on ~100k x 512 features per state, about a
minute per state on 16 cores by a CPU extrapolation, i.e. tens of minutes for T=20;
``--svm-solver torch`` solves the same objective on the GPU (tested to reach liblinear's
optimum), seconds per state.

Metric: the paper's average incremental accuracy -- top-1 over *all* test images of the
classes seen so far, averaged over the T+1 states including the initial one (official
``eval.py``).  Tiny-ImageNet has 50 test images per class, so this weights each task by its
number of classes; ``avg_inc_acc_task_mean`` is clbench's ``summary["avg_inc_acc"]``, the mean
over seen tasks of their accuracies (task-balanced), which differs when tasks differ in size
(the 100-class initial task counts as much as a 5-class step there).

Prints one JSON line per setting on stdout (progress goes to stderr).

    python benchmarks/fetril_tiny_imagenet.py --svm-solver torch                 # T = 5, 10, 20
    python benchmarks/fetril_tiny_imagenet.py --steps 5                          # one setting (trains the initial model)
    python benchmarks/fetril_tiny_imagenet.py --steps 10 20 --initial-model runs/fetril_tiny_imagenet/initial_model_seed0.pt
    python benchmarks/fetril_tiny_imagenet.py --quick                            # tiny CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `scenarios` / `strategies` live next to `clbench`
    sys.path.insert(0, str(REPO))

import torch

CONFIG = REPO / "configs" / "fetril_tiny_imagenet.yaml"
PAPER = {5: 54.8, 10: 53.1, 20: 52.2}  # FeTrIL (LinearSVC), Tiny-ImageNet B100, official README
PAPER_FC = {5: 52.9, 10: 51.7, 20: 49.7}  # FeTrIL^fc
QUICK_STEPS = {5: 2, 10: 3, 20: 6}  # --quick: 6 classes after the initial ones, split like T = 5 / 10 / 20
QUICK_DATASET = "fetril_quick_data"


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def pooled_accuracies(matrix: list[list[float | None]], n_test: list[int]) -> list[float]:
    """Top-1 over all test images of the seen tasks after each state (the paper's per-state
    accuracy), from the task accuracy matrix and the tasks' test-set sizes."""
    out = []
    for j, row in enumerate(matrix):
        if row[j] is None:
            break
        out.append(sum(row[i] * n_test[i] for i in range(j + 1)) / sum(n_test[: j + 1]))
    return out


def register_quick_dataset(kind: str) -> tuple[str, int]:
    """A tiny in-memory dataset for --quick: 12 Tiny-ImageNet classes (60 train / 20 test
    images each) when the data is found, else the built-in digits.  Returns (source, classes)."""
    from clbench.data import ImageDataset, ImageSplit, load_dataset
    from clbench.registry import ClbenchError, register_dataset

    data = None
    if kind in ("auto", "tiny_imagenet"):
        try:
            base = Path(os.environ.get("CLBENCH_DATA_ROOT") or REPO.parent / "shared" / "data")
            full = load_dataset("tiny_imagenet", str(base / "tiny-imagenet-200"))

            def take(split: ImageSplit, n: int) -> ImageSplit:
                idx = torch.cat([(split.y == c).nonzero().flatten()[:n] for c in range(12)])
                return ImageSplit(split.x[idx], split.y[idx])

            data = ImageDataset(QUICK_DATASET, take(full.train, 60), take(full.test, 20), full.class_names[:12],
                                full.mean, full.std)
            source = "tiny_imagenet (12 classes, 60 train / 20 test images each)"
        except ClbenchError as err:
            if kind == "tiny_imagenet":
                raise
            log(f"[quick] Tiny-ImageNet not found ({str(err).splitlines()[0]}); using the built-in digits")
    if data is None:
        data = load_dataset("digits")
        source = "digits (built in)"
    register_dataset(QUICK_DATASET, description="fetril benchmark --quick data")(lambda root=None, cache_dir=None: data)
    return source, data.num_classes


def overrides_for(args, steps: int, initial_model: str | None, n_classes: int | None) -> list[str]:
    name = f"fetril-{'quick-' if args.quick else 'b100-'}t{steps}-{args.classifier}-s{args.seed}"
    out = [f"seed={args.seed}", f"device={args.device}", f"output_dir={args.output_dir}",
           f"name={name}-{time.strftime('%Y%m%d-%H%M%S')}", "logging.console=false", "logging.progress=false",
           f"strategy.classifier={args.classifier}", f"strategy.svm_solver={args.svm_solver}"]
    if args.quick:
        base = n_classes - 6
        out += [f"scenario.dataset={QUICK_DATASET}", "scenario.data_root=null", f"scenario.initial_classes={base}",
                f"scenario.n_tasks={QUICK_STEPS[steps] + 1}", "model.nf=8", "train.epochs=2", "train.batch_size=32",
                "train.lr=0.05", "train.warmup_iters=0", "train.amp=none", "strategy.fc_epochs=5", "strategy.n_jobs=2"]
    else:
        out.append(f"scenario.n_tasks={steps + 1}")
        if args.epochs is not None:
            out.append(f"train.epochs={args.epochs}")
    if initial_model is not None:
        out.append(f"strategy.initial_model={initial_model}")
    return out


def run_setting(args, steps: int, initial_model: str | None, n_classes: int | None) -> tuple[dict, Path]:
    from clbench.config import load_config
    from clbench.engine import Engine

    cfg = load_config(CONFIG, overrides_for(args, steps, initial_model, n_classes))
    log(f"[fetril] T={steps}: {cfg.scenario.n_tasks} experiences, initial model "
        f"{'from ' + initial_model if initial_model else 'trained here'}, classifier {args.classifier}/{args.svm_solver}")
    t0 = time.perf_counter()
    engine = Engine(cfg)
    summary = engine.run()
    wall = time.perf_counter() - t0
    if summary.get("status") != "finished":
        raise SystemExit(f"run {engine.run_dir} did not finish: {summary.get('error')}")
    info = json.loads((engine.run_dir / "run_info.json").read_text())
    n_test = [e["n_test"] for e in info["experiences"]]
    per_state = pooled_accuracies(summary["matrix"], n_test)
    stats = engine.strategy.stats
    paper = (PAPER if args.classifier == "svm" else PAPER_FC)[steps]
    avg = 100 * sum(per_state) / len(per_state)
    result = {
        "benchmark": "fetril_tiny_imagenet", "quick": args.quick, "dataset": args.data_source,
        "setting": f"B{len(info['experiences'][0]['classes'])} + {len(n_test) - 1}x{len(info['experiences'][-1]['classes'])}",
        "steps": steps if not args.quick else QUICK_STEPS[steps],
        "method": "FeTrIL" if args.classifier == "svm" else "FeTrIL^fc", "svm_solver": args.svm_solver,
        "seed": args.seed,
        "avg_inc_acc": round(avg, 2),
        "paper": paper, "diff": round(avg - paper, 2) if not args.quick else None,
        "avg_inc_acc_task_mean": round(100 * summary["avg_inc_acc"], 2),
        "acc_per_state": [round(100 * a, 2) for a in per_state],
        "initial_model": initial_model or "trained in this run",
        "classifier_fit_s": round(sum(s["fit_s"] for s in stats), 1),
        "after_experience_s": round(sum(s["total_s"] for s in stats), 1),
        "wall_s": round(wall, 1), "device": device_name(args.device), "run_dir": str(engine.run_dir),
        "class_order_head": info["class_order"][:5],
    }
    return result, engine.run_dir


def model_from_checkpoint(path: Path, args) -> str:
    """Save the model of a FeTrIL run's checkpoint (any checkpoint written after experience 0:
    the model never changes afterwards) as a plain state_dict; returns its path."""
    from clbench.safe_load import torch_load

    ckpt = torch_load(path, "FeTrIL run checkpoint")  # weights_only=True: nothing in the file runs
    if ckpt["position"]["experience"] < 1:
        raise SystemExit(f"{path} was written before the initial training finished (experience 0)")
    out = Path(args.output_dir) / f"initial_model{'_quick' if args.quick else ''}_seed{args.seed}.pt"
    torch.save(ckpt["model"], out)
    log(f"[fetril] initial model ({path}) saved to {out}")
    return str(out)


def device_name(device: str) -> str:
    d = torch.device(device)
    return torch.cuda.get_device_name(d) if d.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", choices=sorted(PAPER), default=sorted(PAPER),
                        help="incremental steps T after the 100-class initial state (default: 5 10 20)")
    parser.add_argument("--seed", type=int, default=0, help="run seed (also fixes the class order)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--epochs", type=int, default=None, help="initial-training epochs (default: the config's 120)")
    parser.add_argument("--classifier", choices=("svm", "fc"), default="svm", help="svm: FeTrIL | fc: FeTrIL^fc")
    parser.add_argument("--svm-solver", choices=("liblinear", "torch"), default="liblinear",
                        help="liblinear: sklearn LinearSVC on the CPU, as released | torch: same objective on the device")
    parser.add_argument("--initial-model", default=None,
                        help="a model state_dict saved by an earlier run of this script, or the checkpoint.pt of any "
                             "FeTrIL run past experience 0 (same seed): skips the initial training in every setting")
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "fetril_tiny_imagenet"))
    parser.add_argument("--quick", action="store_true",
                        help="tiny CPU smoke run: 12 Tiny-ImageNet classes (or digits), ResNet-18 nf=8, 2 epochs")
    parser.add_argument("--quick-dataset", choices=("auto", "tiny_imagenet", "digits"), default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice; --quick: 1, tiny ops on a shared CPU)")
    args = parser.parse_args(argv)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    if args.device == "auto":
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    n_classes = None
    args.data_source = "tiny_imagenet (200 classes)"
    if args.quick:
        args.data_source, n_classes = register_quick_dataset(args.quick_dataset)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    initial_model, first_order, results = args.initial_model, None, []
    if initial_model is not None and Path(initial_model).name == "checkpoint.pt":
        initial_model = model_from_checkpoint(Path(initial_model), args)
    for steps in args.steps:
        result, run_dir = run_setting(args, steps, initial_model, n_classes)
        order = json.loads((run_dir / "run_info.json").read_text())["class_order"]
        if first_order is not None and order != first_order:
            raise SystemExit("class order differs between settings; the shared initial model would be wrong")
        first_order = order
        if initial_model is None:  # FeTrIL never changes the model after experience 0: the final one is the initial one
            initial_model = model_from_checkpoint(run_dir / "checkpoint.pt", args)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
