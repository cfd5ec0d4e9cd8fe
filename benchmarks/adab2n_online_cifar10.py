"""AdaB2N vs BatchNorm on online Split CIFAR-10 (Lyu et al., NeurIPS 2023, "Overcoming Recency
Bias of Normalization Statistics in Continual Learning: Balance and Adaptation").

For base in {er_ace, derpp}, norm in {bn, adab2n}, buffer in {500, 2000} and seeds 0, 1, 2,
runs the online protocol of ``configs/online_split_cifar10.yaml`` (5 x 2 classes from the JPEG
copy, one pass, batch 10, buffer minibatch 10, reservoir buffer, ResNet-18 nf=64, SGD lr 0.03;
DER++'s alpha/beta per buffer size from the released best_args: (0.2, 0.5) @500, (0.1, 1.0)
@2000; DER++'s CE terms over all logits, the released default ``unseen_logits=true``) and prints one JSON line per (base, norm, buffer): final class-IL and task-IL accuracy
(%, mean and sample std over seeds), plus the AdaB2N - BN gain on the adab2n lines.  Both
norms use the same joint forward of incoming + buffer samples (see strategies/er_ace.py and
strategies/der.py), so the gain is the normalisation's alone.

Accuracies: class-IL = the run's ``summary["acc"]`` (mean over the 5 tasks of the full-test
accuracy after the last experience, argmax over all classes).  Task-IL = the SAME final model
evaluated here, at the end of the run, on the same test sets with the logits masked to each
task's own classes (mammoth's ``mask_classes``); no second training run.

Each run writes ``<output-dir>/runs/<run>/`` (checkpoints every 250 iterations) and
``<output-dir>/results/<run>.json``; runs with a result are skipped and an interrupted run
resumes from its checkpoint, so the grid can be run in pieces.  ``--jobs N`` runs N runs at
once in separate processes (the online protocol's batches of 20-30 images leave a GPU mostly
idle, so several runs share one well).

    python benchmarks/adab2n_online_cifar10.py --jobs 6                    # the full grid (GPU)
    python benchmarks/adab2n_online_cifar10.py --bases er_ace --buffers 500 --seeds 0
    python benchmarks/adab2n_online_cifar10.py --set strategy.kappa=0.7 --set strategy.lambda_=1 --output-dir runs/k07
    python benchmarks/adab2n_online_cifar10.py --quick                     # tiny CPU version (digits, 1 seed)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "online_split_cifar10.yaml"
DERPP_ALPHA_BETA = {500: (0.2, 0.5), 2000: (0.1, 1.0)}  # released best_args.py, seq-cifar10
QUICK = ["scenario.dataset=digits", "scenario.data_root=null", "model.nf=8", "train.augment=none"]
QUICK_BUFFERS = [50, 200]  # digits has ~1,400 training images


def run_name(base: str, norm: str, buffer: int, seed: int) -> str:
    return f"{base}-{norm}-m{buffer}-s{seed}"


def overrides_for(base: str, norm: str, buffer: int, seed: int, args) -> list[str]:
    out = [f"strategy={base}", f"strategy.norm={norm}", f"strategy.buffer_size={buffer}",
           "strategy.replay_batch_size=10", f"seed={seed}", "eval.every=0", "checkpoint.every=250",
           "logging.console=false", "logging.progress=false", "logging.tensorboard=false"]
    if base == "derpp":
        alpha, beta = DERPP_ALPHA_BETA.get(buffer, DERPP_ALPHA_BETA[500])
        out += [f"strategy.alpha={alpha}", f"strategy.beta={beta}"]
    if args.quick:
        out += QUICK
    return out + list(args.set)


def task_il_accuracies(engine) -> list[float]:
    """Per-task accuracy of the engine's current model with the logits masked to the task's classes."""
    import torch

    strategy, ctx, stream = engine.strategy, engine.ctx, engine.stream
    model = strategy.model
    was_training = model.training
    model.eval()
    accs = []
    try:
        with torch.inference_mode():
            for exp in stream:
                allowed = torch.zeros(stream.num_classes, dtype=torch.bool, device=ctx.device)
                allowed[exp.classes.to(ctx.device)] = True
                hits, total = torch.zeros((), device=ctx.device), 0
                for batch in ctx.batches([exp], engine.evaluator.batch_size, split="test"):
                    scores = strategy.predict(ctx.inputs(batch.x), batch.task).float()
                    scores = scores.masked_fill(~allowed, float("-inf"))
                    hits += (scores.argmax(1) == batch.y).sum()
                    total += len(batch)
                accs.append(float(hits) / max(total, 1))
    finally:
        model.train(was_training)
    return accs


def run_one(base: str, norm: str, buffer: int, seed: int, args) -> dict:
    """Train one run (or resume it) and return its record; also written to results/<run>.json."""
    import torch

    from clbench.config import load_config
    from clbench.engine import CHECKPOINT, Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    name = run_name(base, norm, buffer, seed)
    run_dir = out / "runs" / name
    start = time.time()
    if (run_dir / CHECKPOINT).is_file():
        engine = Engine(load_config(run_dir / "config.yaml"), resume_dir=run_dir)
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # started but never checkpointed
        cfg = load_config(args.config, [f"output_dir={out / 'runs'}", f"name={name}",
                                        *overrides_for(base, norm, buffer, seed, args)])
        engine = Engine(cfg)
    summary = engine.run()
    task_il = task_il_accuracies(engine)
    final_row = summary["matrix"][-1]
    record = {"run": name, "base": base, "norm": norm, "buffer": buffer, "seed": seed,
              "class_il": 100 * summary["acc"], "task_il": 100 * sum(task_il) / len(task_il),
              "class_il_per_task": [100 * a for a in final_row], "task_il_per_task": [100 * a for a in task_il],
              "iterations": summary["iterations"], "seconds": round(time.time() - start, 1),
              "device": str(engine.device), "overrides": overrides_for(base, norm, buffer, seed, args)}
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{name}.json").write_text(json.dumps(record, indent=1))
    return record


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(records: list[dict], args) -> list[dict]:
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["base"], r["norm"], r["buffer"]), []).append(r)
    for base in args.bases:
        for buffer in args.buffers:
            for norm in args.norms:
                runs = sorted(groups.get((base, norm, buffer), []), key=lambda r: r["seed"])
                if not runs:
                    continue
                c_mean, c_std = mean_std([r["class_il"] for r in runs])
                t_mean, t_std = mean_std([r["task_il"] for r in runs])
                line = {"base": base, "norm": norm, "buffer": buffer, "dataset": "digits (quick)" if args.quick else "cifar10",
                        "seeds": [r["seed"] for r in runs],
                        "class_il_mean": round(c_mean, 2), "class_il_std": None if c_std is None else round(c_std, 2),
                        "task_il_mean": round(t_mean, 2), "task_il_std": None if t_std is None else round(t_std, 2),
                        "class_il": [round(r["class_il"], 2) for r in runs], "task_il": [round(r["task_il"], 2) for r in runs],
                        "minutes_per_run": round(statistics.fmean(r["seconds"] for r in runs) / 60, 2)}
                bn = groups.get((base, "bn", buffer))
                if norm != "bn" and bn:
                    line["class_il_gain_vs_bn"] = round(c_mean - statistics.fmean(r["class_il"] for r in bn), 2)
                    line["task_il_gain_vs_bn"] = round(t_mean - statistics.fmean(r["task_il"] for r in bn), 2)
                lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny CPU version: digits, ResNet-18 nf=8, buffers 50/200, seed 0")
    parser.add_argument("--bases", nargs="+", default=["er_ace", "derpp"], choices=["er_ace", "derpp"])
    parser.add_argument("--norms", nargs="+", default=["bn", "adab2n"], choices=["bn", "adab2n"])
    parser.add_argument("--buffers", nargs="+", type=int, default=None, help="default 500 2000 (quick: 50 200)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (quick: 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override (repeatable)")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--output-dir", default=None, help="default runs/adab2n_online_cifar10[_quick]")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (separate processes)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    args = parser.parse_args(argv)
    args.buffers = args.buffers or (QUICK_BUFFERS if args.quick else [500, 2000])
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    args.output_dir = args.output_dir or str(REPO / "runs" / ("adab2n_online_cifar10_quick" if args.quick else "adab2n_online_cifar10"))

    grid = [(b, n, m, s) for b in args.bases for m in args.buffers for n in args.norms for s in args.seeds]
    results_dir = Path(args.output_dir) / "results"
    records, todo = [], []
    for key in grid:
        path = results_dir / f"{run_name(*key)}.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
        else:
            todo.append(key)
    print(f"# {len(grid)} runs, {len(grid) - len(todo)} already done, results in {results_dir}", file=sys.stderr)
    if todo:
        from clbench.config import load_config
        from clbench.data import load_dataset

        scenario = load_config(args.config, QUICK if args.quick else []).scenario
        load_dataset(scenario.dataset, scenario.data_root, None)  # decode/cache once before the workers start
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(run_one, *key, args) for key in todo]
                for fut in futures:
                    rec = fut.result()
                    records.append(rec)
                    print(f"# done {rec['run']}: class-IL {rec['class_il']:.2f} task-IL {rec['task_il']:.2f} "
                          f"({rec['seconds']:.0f} s)", file=sys.stderr)
        else:
            for key in todo:
                rec = run_one(*key, args)
                records.append(rec)
                print(f"# done {rec['run']}: class-IL {rec['class_il']:.2f} task-IL {rec['task_il']:.2f} "
                      f"({rec['seconds']:.0f} s)", file=sys.stderr)
    for line in aggregate(records, args):
        print(json.dumps(line))
    return 0 if all(math.isfinite(r["class_il"]) and math.isfinite(r["task_il"]) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
