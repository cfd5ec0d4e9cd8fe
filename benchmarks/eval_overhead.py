"""What per-iteration continual evaluation costs clbench (issue 5, benchmark 1).

Workload: Split CIFAR-10 (5 experiences x 2 classes, seeded class order), reduced ResNet-18
(nf=20), fine-tuning with SGD (lr 0.1, no momentum), batch 128, 1 epoch per experience, no
augmentation, fp32.  clbench runs it twice in this process, through ``load_config`` +
``clbench.engine.run`` with every logger off:

1. ``eval.every=0`` ("training only"): clbench still evaluates the seen tasks' subsets at each
   experience's last iteration and every full test set before training and after each
   experience; ``train_only_s`` includes that, ``train_only_excluding_eval_s`` subtracts it.
2. ``eval.every=1 eval.subset_size=1000``: evaluation after every iteration on fixed
   1000-image subsets of every seen task, plus the same experience-end passes.

Evaluation time is measured by wrapping ``Evaluator.periodic`` (and ``baseline`` /
``experience_end``) with a device synchronisation on both sides of each call.  The ceiling is
the model's standalone inference throughput (fp32, ``inference_mode``, inputs already on the
device) at its best batch size.

Prints ONE JSON line.  ``--quick`` is a CPU smoke run on the built-in digits with an MLP.

    python benchmarks/eval_overhead.py --device cuda                       # the issue-5 workload
    python benchmarks/eval_overhead.py --device cpu --images-per-class 64 --test-images-per-class 20 --subset-size 40
    python benchmarks/eval_overhead.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import (
    clbench_settings,
    common_args,
    device_info,
    emit,
    inference_ceiling,
    load_clbench_config,
    log,
    register_bench_dataset,
    resolve,
    sync,
    timed_evaluator,
    warm_up,
)


def run_clbench(args, every: int, out_dir: str, name: str):
    from clbench.engine import run

    cfg = load_clbench_config(args, every=every, out_dir=out_dir, name=name)
    with timed_evaluator(args.device, enabled=not args.no_eval_timing) as times:
        sync(args.device)
        t0 = time.perf_counter()
        summary = run(cfg)
        sync(args.device)
        wall = time.perf_counter() - t0
    if summary.get("status") != "finished":
        raise SystemExit(f"clbench run {name} did not finish: {summary.get('error')}")
    return wall, times, summary, cfg


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--ceiling-batch-sizes", default=None,
                        help="comma-separated batch sizes for the inference ceiling "
                             "(default: 128..4096 on CUDA, 128..1024 on CPU, 32..2048 with --quick)")
    parser.add_argument("--no-eval-timing", action="store_true",
                        help="no device syncs around evaluator calls (they would serialise an evaluator that "
                             "overlaps training); eval times are then host-side only")
    args = parser.parse_args(argv)
    resolve(args)

    import torch

    from clbench.config import component_config
    from clbench.models import build_model

    data = register_bench_dataset(args)
    log(f"eval_overhead: {data} on {device_info(args.device)}")

    # Warm-up and the ceiling first, on a throw-away model: one-off costs stay out of the timed runs.
    probe = load_clbench_config(args, every=1, out_dir="unused", name="probe")
    torch.manual_seed(args.seed)
    model = build_model(component_config(probe.model), tuple(data["image_shape"]), 10).to(args.device)
    warm_up(model, tuple(data["image_shape"]), 10, args.batch_size, args.device)
    on_cuda = torch.device(args.device).type == "cuda"
    if args.ceiling_batch_sizes:
        sizes = tuple(int(s) for s in args.ceiling_batch_sizes.split(","))
    else:
        sizes = (32, 128, 512, 2048) if args.quick else (128, 256, 512, 1024, 2048, 4096) if on_cuda else (128, 256, 512, 1024)
    eval_precision = "bf16" if args.eval_precision == "bf16" or (args.eval_precision == "auto" and on_cuda) else "fp32"
    ceiling = inference_ceiling(model, tuple(data["image_shape"]), args.device, sizes,
                                min_seconds=0.5 if on_cuda else 0.2 if args.quick else 1.0,
                                precision=eval_precision, channels_last=on_cuda)
    del model
    log(f"ceiling: {ceiling}")

    with tempfile.TemporaryDirectory(prefix="clbench-bench-") as out:
        train_s, train_t, _, _ = run_clbench(args, 0, out, "train_only")
        log(f"training only: {train_s:.2f} s (evaluator {train_t.periodic.seconds + train_t.full.seconds:.2f} s)")
        eval_s, eval_t, eval_sum, cfg = run_clbench(args, 1, out, "eval_every_1")
        log(f"eval every iteration: {eval_s:.2f} s (periodic {eval_t.periodic.seconds:.2f} s)")

    p = eval_t.periodic
    # with eval.overlap the evaluator's own time is hidden in training's (not timed): null
    eval_ips = p.images / p.seconds if p.seconds > 0 and not eval_t.overlapped else None
    train_eval_s = train_t.periodic.seconds + train_t.full.seconds
    emit({
        "benchmark": "eval_overhead",
        "device": device_info(args.device),
        "threads": torch.get_num_threads(),
        "workload": {
            "dataset": data["dataset"], "model": args.workload["model_name"], "quick": args.quick,
            "train_images": data["train_images"], "test_images": data["test_images"], "experiences": 5,
            "batch_size": args.batch_size, "epochs": 1, "iterations": eval_sum["iterations"],
            "optimizer": f"sgd(lr={args.lr})", **clbench_settings(args), "augment": "none",
            "eval_subset_size": args.subset_size, "eval_tasks": "seen", "eval_batch_size": int(cfg.eval.batch_size),
            "seed": args.seed,
        },
        "train_only_s": round(train_s, 3),
        "with_eval_s": round(eval_s, 3),
        "ratio": round(eval_s / train_s, 3),
        "eval_images_per_s": round(eval_ips, 1) if eval_ips else None,
        "inference_ceiling_images_per_s": ceiling["images_per_s"],
        "ceiling_precision": eval_precision,
        "ceiling_batch_size": ceiling["batch_size"],
        "eval_vs_ceiling": round(eval_ips / ceiling["images_per_s"], 3) if eval_ips else None,
        "periodic_eval": {**p.as_dict(), "ms_per_call": round(1000 * p.seconds / max(p.calls, 1), 2)},
        "train_only_excluding_eval_s": round(train_s - train_eval_s, 3),
        "with_eval_excluding_eval_s": round(eval_s - p.seconds - eval_t.full.seconds, 3),
        "train_only_evaluator": {"periodic": train_t.periodic.as_dict(), "full_test": train_t.full.as_dict()},
        "full_test_eval": eval_t.full.as_dict(),
        "ceiling_per_batch_size": ceiling["per_batch_size"],
        "eval_timing_synced": not args.no_eval_timing,
        "notes": "eval.every=0 still evaluates the seen subsets at each experience's last iteration and every "
                 "full test set before training and after each experience (train_only_evaluator); "
                 "*_excluding_eval_s subtract all evaluator time",
    })


if __name__ == "__main__":
    main()
