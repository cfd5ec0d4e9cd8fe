"""Shared pieces of the benchmark scripts: the workload, data, clbench configs, timers, output.

Every script prints exactly ONE JSON line on stdout (everything else goes to stderr), so
``python benchmarks/<script>.py ... | tail -n 1`` is the result.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `scenarios`/`strategies` live next to `clbench` (editable install or not)
    sys.path.insert(0, str(REPO))

import torch

BENCH_DATASET = "bench_data"  # the (optionally subsampled) dataset the scripts register

# The issue-5 workload (Split CIFAR-10, reduced ResNet-18) and the CPU smoke-test one.
FULL = {"dataset": "cifar10", "data_subdir": "cifar10-jpeg", "model": ["model=resnet18", "model.nf=20"],
        "model_name": "resnet18(nf=20)", "batch_size": 128}
QUICK = {"dataset": "digits", "data_subdir": None, "model": ["model=mlp", "model.hidden=[400,400]"],
         "model_name": "mlp(400,400)", "batch_size": 32}


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """The script's one line of output."""
    print(json.dumps(result, sort_keys=False), flush=True)


def mean_std(values: list[float | None]) -> dict[str, float | None]:
    """Mean and sample std (0 for one value) of the non-None values, rounded to 4 digits."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None}
    return {"mean": round(statistics.fmean(vals), 4), "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0}


def seed_row(key: str, seeds, run_seed: Callable[[int], dict[str, Any]],
             metrics: tuple[str, ...]) -> tuple[dict[str, Any] | None, str | None]:
    """One table row: ``run_seed(seed)`` for every seed, then mean/std per metric plus the
    per-seed results; or ``(None, reason)`` when a run fails (one failing row does not stop a table)."""
    runs = []
    try:
        for seed in seeds:
            log(f"[{key}] seed {seed} ...")
            runs.append(run_seed(seed))
            log(f"[{key}] seed {seed}: {runs[-1]}")
    except Exception as err:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        return None, f"failed: {type(err).__name__}: {str(err)[:300]}"
    row: dict[str, Any] = {m: mean_std([r[m] for r in runs]) for m in metrics}
    row["per_seed"] = runs
    return row, None


def common_args(parser, default_subset: int = 1000) -> None:
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--subset-size", type=int, default=None,
                        help=f"eval images per seen task in periodic evaluation (default {default_subset})")
    parser.add_argument("--images-per-class", type=int, default=None,
                        help="subsample the training set to the first N images of each class (default: all)")
    parser.add_argument("--test-images-per-class", type=int, default=None,
                        help="subsample the test set to the first N images of each class (default: all); "
                             "bounds the experience-end full-test evaluation, which is slow on a CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size (default 128; --quick: 32)")
    parser.add_argument("--eval-batch-size", type=int, default=None,
                        help="evaluation batch size (default: clbench's automatic choice, 256 on CPU, 2048 on CUDA)")
    parser.add_argument("--eval-precision", default="fp32", choices=["fp32", "bf16", "auto"],
                        help="clbench's eval.precision (default fp32: the same arithmetic as the plain evaluator "
                             "and Avalanche; bf16 is clbench's GPU default)")
    parser.add_argument("--eval-compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune"],
                        help="clbench's eval.compile (torch.compile of predict; reduce-overhead = CUDA graphs)")
    parser.add_argument("--eval-overlap", action="store_true",
                        help="clbench's eval.overlap: periodic evaluation on a weight snapshot on a side CUDA stream")
    parser.add_argument("--train-amp", default="none", choices=["none", "bf16"], help="clbench's train.amp")
    parser.add_argument("--channels-last", action="store_true", help="clbench's train.channels_last (GPU)")
    parser.add_argument("--train-compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune"],
                        help="clbench's train.compile (torch.compile of the model's forward)")
    parser.add_argument("--fast", action="store_true",
                        help="clbench's fast GPU settings at once: bf16 training and evaluation, channels-last, "
                             "eval.overlap, train.compile=default (numbers then differ from fp32 by bf16 rounding)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (no momentum, no weight decay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default on CPU: 1, because on a shared CPU two OpenMP threads "
                             "can be ~50x slower than one; on CUDA: torch's choice)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny CPU smoke run: built-in digits + MLP(400,400) instead of CIFAR-10 + ResNet-18")


def resolve(args, default_subset: int = 1000) -> None:
    """Fill in defaults that depend on --quick."""
    wl = QUICK if args.quick else FULL
    args.workload = wl
    if args.batch_size is None:
        args.batch_size = wl["batch_size"]
    if args.subset_size is None:
        args.subset_size = default_subset
    resolve_device_and_threads(args)
    if args.eval_batch_size is None:  # what clbench's eval.batch_size=0 (auto) picks, passed explicitly to both
        args.eval_batch_size = 256 if torch.device(args.device).type == "cpu" else 2048
    if args.fast:
        args.eval_precision, args.train_amp, args.channels_last = "bf16", "bf16", True
        args.eval_overlap, args.train_compile = True, args.train_compile if args.train_compile != "none" else "default"


def resolve_device_and_threads(args) -> None:
    """``--device auto``: CUDA when available, else the CPU; ``--threads`` (default 1 on a CPU:
    on a shared CPU two OpenMP threads can be far slower than one) goes to ``torch.set_num_threads``."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is None and torch.device(args.device).type == "cpu":
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)


def data_root(subdir: str | None) -> str | None:
    """``$CLBENCH_DATA_ROOT/<subdir>``, else ``<repo>/../shared/data/<subdir>`` (as the shipped configs)."""
    if subdir is None:
        return None
    base = os.environ.get("CLBENCH_DATA_ROOT") or str(REPO.parent / "shared" / "data")
    return str(Path(base) / subdir)


def register_bench_dataset(args) -> dict[str, Any]:
    """Load the workload's dataset once, subsample it per class if asked, and register the
    result as ``bench_data`` (in memory: the timed runs never touch the disk)."""
    from clbench.data import ImageDataset, ImageSplit, load_dataset
    from clbench.registry import register_dataset

    wl = args.workload
    full = load_dataset(wl["dataset"], data_root(wl["data_subdir"]))

    def take(split: ImageSplit, n: int | None) -> ImageSplit:
        if n is None:
            return split
        idx = torch.cat([(split.y == c).nonzero().flatten()[:n] for c in range(full.num_classes)]).sort().values
        return ImageSplit(split.x[idx], split.y[idx])

    data = ImageDataset(BENCH_DATASET, take(full.train, args.images_per_class),
                        take(full.test, args.test_images_per_class), full.class_names, full.mean, full.std)
    # (registering again in the same process replaces it: same qualified name)
    register_dataset(BENCH_DATASET, description="benchmark: the workload's dataset, subsampled per class")(
        lambda root=None, cache_dir=None: data)
    return {"dataset": wl["dataset"], "train_images": len(data.train), "test_images": len(data.test),
            "image_shape": list(data.image_shape)}


def clbench_overrides(args, *, every: int, out_dir: str, name: str) -> list[str]:
    """The clbench config of the workload (fine-tuning, SGD, no augmentation, loggers off; fp32
    unless --train-amp/--eval-precision/--fast say otherwise)."""
    return [
        "scenario=class_incremental", f"scenario.dataset={BENCH_DATASET}", "scenario.data_root=null", "scenario.n_tasks=5",
        *args.workload["model"], "strategy=finetune",
        "train.optimizer=sgd", f"train.lr={args.lr}", "train.momentum=0.0", "train.weight_decay=0.0",
        f"train.batch_size={args.batch_size}", "train.epochs=1", "train.iterations=null", "train.augment=none",
        f"train.amp={args.train_amp}", f"train.channels_last={str(args.channels_last).lower()}",
        f"train.compile={args.train_compile}", f"eval.overlap={str(args.eval_overlap).lower()}", "train.scheduler=none", "train.warmup_iters=0", "train.grad_clip=null",
        f"eval.every={every}", f"eval.subset_size={args.subset_size}",
        *([f"eval.batch_size={args.eval_batch_size}"] if args.eval_batch_size else []),
        f"eval.precision={args.eval_precision}", f"eval.compile={args.eval_compile}",
        "logging.console=false", "logging.progress=false", "logging.tensorboard=false", "logging.jsonl=false",
        "logging.wandb.enabled=false", "checkpoint.enabled=false", "checkpoint.every=0",
        f"device={args.device}", f"seed={args.seed}", f"output_dir={out_dir}", f"name={name}",
    ]


def clbench_settings(args) -> dict[str, Any]:
    """clbench's speed settings of this run, for the printed workload."""
    return {"train_amp": args.train_amp, "channels_last": args.channels_last, "train_compile": args.train_compile,
            "eval_precision": args.eval_precision, "eval_compile": args.eval_compile, "eval_overlap": args.eval_overlap}


def load_clbench_config(args, **kw):
    from clbench.config import load_config

    config = REPO / "configs" / "split_cifar10.yaml" if not args.quick else None
    return load_config(config, clbench_overrides(args, **kw))


def sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timer:
    calls: int = 0
    seconds: float = 0.0
    images: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "seconds": round(self.seconds, 4), "images": self.images}


@dataclass
class EvalTimes:
    """Time and images of the clbench evaluator's calls: ``periodic`` (fixed subsets of the
    seen tasks) and ``full`` (baseline and experience-end passes over every full test set)."""

    periodic: Timer = field(default_factory=Timer)
    full: Timer = field(default_factory=Timer)
    # subset accuracies at the last periodic call of each experience: {n_seen-1: [acc_0, ..]}
    last_periodic: dict[int, list[float]] = field(default_factory=dict)
    overlapped: bool = False  # eval.overlap: periodic calls counted but not timed


@contextmanager
def timed_evaluator(device: str, enabled: bool = True) -> Iterator[EvalTimes]:
    """Wraps ``Evaluator.periodic``, ``baseline`` and ``experience_end`` (class-level, restored
    on exit) to time them, with a device synchronisation on both sides of each call."""
    from clbench.evaluation import Evaluator

    times = EvalTimes()
    originals = {name: getattr(Evaluator, name)
                 for name in ("periodic", "submit", "_periodic_metrics", "baseline", "experience_end")}

    def periodic(self, iteration, n_seen):
        if enabled:
            sync(device)
        t = time.perf_counter()
        out = originals["periodic"](self, iteration, n_seen)
        if enabled:
            sync(device)
        times.periodic.seconds += time.perf_counter() - t
        times.periodic.calls += 1
        times.periodic.images += int(self.ends[n_seen])
        return out

    def submit(self, iteration, n_seen):  # eval.overlap: counted, not timed (a sync would serialise it)
        times.overlapped = True
        times.periodic.calls += 1
        times.periodic.images += int(self.ends[n_seen])
        return originals["submit"](self, iteration, n_seen)

    def periodic_metrics(self, iteration, accs):  # both paths: the accuracies of the last evaluation
        times.last_periodic[len(accs) - 1] = [accs[k] for k in range(len(accs))]
        return originals["_periodic_metrics"](self, iteration, accs)

    def full(name):
        def wrapper(self, *a, **kw):
            if enabled:
                sync(device)
            t = time.perf_counter()
            out = originals[name](self, *a, **kw)
            if enabled:
                sync(device)
            times.full.seconds += time.perf_counter() - t
            times.full.calls += 1
            times.full.images += int(self.ctx.stream.test.y.numel())
            return out
        return wrapper

    Evaluator.periodic = periodic
    Evaluator.submit = submit
    Evaluator._periodic_metrics = periodic_metrics
    Evaluator.baseline = full("baseline")
    Evaluator.experience_end = full("experience_end")
    try:
        yield times
    finally:
        for name, fn in originals.items():
            setattr(Evaluator, name, fn)


def inference_ceiling(model: torch.nn.Module, image_shape: tuple[int, ...], device: str,
                      batch_sizes: tuple[int, ...], min_seconds: float, precision: str = "fp32",
                      channels_last: bool = False) -> dict[str, Any]:
    """The model's standalone inference throughput (eval mode, inference_mode, random normalised
    inputs already on the device; ``precision`` fp32 or bf16 autocast, optionally channels-last:
    the evaluator's own arithmetic) at each batch size; the best is the ceiling."""
    model = model.eval()
    per_bs: dict[str, float] = {}
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), autocast:
        for bs in batch_sizes:
            x = torch.randn(bs, *image_shape, device=device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x)  # warm-up (allocator, cuDNN algorithm choice)
            model(x)
            sync(device)
            n, t0 = 0, time.perf_counter()
            while True:
                for _ in range(3 if torch.device(device).type == "cuda" else 1):
                    model(x)
                    n += bs
                sync(device)
                dt = time.perf_counter() - t0
                if dt >= min_seconds:
                    break
            per_bs[str(bs)] = round(n / dt, 1)
    best = max(per_bs, key=per_bs.get)
    return {"images_per_s": per_bs[best], "batch_size": int(best), "per_batch_size": per_bs}


def warm_up(model: torch.nn.Module, image_shape: tuple[int, ...], num_classes: int, batch_size: int, device: str) -> None:
    """Pay the process's one-off costs before anything is timed: the first optimiser
    construction imports ``torch._dynamo`` (seconds on a small CPU), and on CUDA the context,
    cuBLAS/cuDNN handles and kernel choices for the training shapes."""
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(batch_size, *image_shape, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    sync(device)


def device_info(device: str) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores visible)"
