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
    python benchmarks/adab2n_online_cifar10.py --parity --grid --jobs 8    # the released code's recipe and sweep

``--parity``: the released code's recipe (``lvyilin/AdaB2N`` @ 9aaba7e; each switch checked against
it by tests/test_reference_adab2n.py): AdaB2N ``adab2n_variant=released``; ER-ACE's masks
(``unseen_logits=true``) and mammoth's first task (``replay_start=second_task``); the BN baseline
with SEPARATE forwards of the incoming batch and each buffer draw (``replay_forward=separate``, as
mammoth's ``er_ace.py``/``derpp.py``, which the paper's BN rows ran), while AdaB2N keeps the joint
forward of ``er_ace_ada.py``/``derpp_ada.py``; each seed's class order as the released code draws it
(seed 0 unshuffled, others ``default_rng(42 + seed)``: :func:`released_class_order`).
The BN-AdaB2N gap then mixes the normalisation with the batching, as the paper's tables do.

``--grid``: the AdaB2N runs sweep the released ``run.py`` grid, kappa in {0.1, 0.4, 0.7, 1.0} x
lambda in {0.01, 0.1, 1, 10} x ada_t0 in {0, 1} (32 points per base/buffer/seed; BN once), one
JSON line per point plus a ``best`` line per (base, buffer) (highest mean class-IL over seeds).
Which grid point each published number used is not in the released code.
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
# the released run.py grid (CIFAR): kappa x lambda x ada_t0
KAPPA_GRID = [0.1, 0.4, 0.7, 1.0]
LAMBDA_GRID = [0.01, 0.1, 1.0, 10.0]
ADA_T0_GRID = [0, 1]


def grid_points(norm: str, grid: bool) -> list[tuple[float, float, int] | None]:
    """AdaB2N's (kappa, lambda, ada_t0) points of the released run.py (None: the config's values)."""
    if norm != "adab2n" or not grid:
        return [None]
    return [(k, lam, t0) for k in KAPPA_GRID for lam in LAMBDA_GRID for t0 in ADA_T0_GRID]


def released_class_order(seed: int, n_classes: int = 10) -> list[int]:
    """The class order of the released code's seed ``seed``: ``ContinualDataset.get_task_order``
    relabels original class ``c`` as ``order[c]`` with ``order = default_rng(42 + seed).permutation(n)``
    (identity for seed 0), so clbench's ``scenario.class_order`` (original labels in the order they
    are learned) is ``argsort(order)``.  Checked against the official function by
    ``tests/test_reference_adab2n.py::test_parity_class_order_is_the_released_task_order``."""
    import numpy as np

    if seed == 0:
        return list(range(n_classes))
    order = np.random.default_rng(42 + seed).permutation(n_classes)
    return [int(c) for c in np.argsort(order)]


def parity_overrides(base: str, norm: str) -> list[str]:
    """The released code's recipe for one run (see --parity)."""
    out = ["scenario.shuffle_classes=false"]
    if norm == "adab2n":
        out += ["strategy.adab2n_variant=released"]
    else:
        out += ["strategy.replay_forward=separate"]
    if base == "er_ace":
        out += ["strategy.unseen_logits=true", "strategy.replay_start=second_task"]
    return out
QUICK = ["scenario.dataset=digits", "scenario.data_root=null", "model.nf=8", "train.augment=none"]
QUICK_BUFFERS = [50, 200]  # digits has ~1,400 training images


def run_name(base: str, norm: str, buffer: int, seed: int, point=None) -> str:
    tag = "" if point is None else f"-k{point[0]:g}-l{point[1]:g}-t{point[2]}"
    return f"{base}-{norm}{tag}-m{buffer}-s{seed}"


def overrides_for(base: str, norm: str, buffer: int, seed: int, args, point=None) -> list[str]:
    out = [f"strategy={base}", f"strategy.norm={norm}", f"strategy.buffer_size={buffer}",
           "strategy.replay_batch_size=10", f"seed={seed}", "eval.every=0", "checkpoint.every=250",
           "logging.console=false", "logging.progress=false", "logging.tensorboard=false"]
    if base == "derpp":
        alpha, beta = DERPP_ALPHA_BETA.get(buffer, DERPP_ALPHA_BETA[500])
        out += [f"strategy.alpha={alpha}", f"strategy.beta={beta}"]
    if getattr(args, "parity", False):
        out += parity_overrides(base, norm)
        out += [f"scenario.class_order=[{','.join(map(str, released_class_order(seed)))}]"]
    if point is not None:
        out += [f"strategy.kappa={point[0]}", f"strategy.lambda_={point[1]}", f"strategy.ada_t0={point[2]}"]
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


def run_one(base: str, norm: str, buffer: int, seed: int, args, point=None) -> dict:
    """Train one run (or resume it) and return its record; also written to results/<run>.json."""
    import torch

    from clbench.config import load_config
    from clbench.engine import open_run

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    name = run_name(base, norm, buffer, seed, point)
    run_dir = out / "runs" / name
    start = time.time()
    engine = open_run(resume=run_dir) if (run_dir / "config.yaml").is_file() else None  # interrupted: resume it
    if isinstance(engine, dict):  # finished, but its record was never written: the task-IL pass needs the model
        print(f"{run_dir}: finished without a result record; running it again", flush=True)
        engine = None
    if engine is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        cfg = load_config(args.config, [f"output_dir={out / 'runs'}", f"name={name}",
                                        *overrides_for(base, norm, buffer, seed, args, point)])
        engine = open_run(cfg)
    summary = engine.run()
    task_il = task_il_accuracies(engine)
    final_row = summary["matrix"][-1]
    record = {"run": name, "base": base, "norm": norm, "buffer": buffer, "seed": seed,
              "point": None if point is None else list(point),
              "class_il": 100 * summary["acc"], "task_il": 100 * sum(task_il) / len(task_il),
              "class_il_per_task": [100 * a for a in final_row], "task_il_per_task": [100 * a for a in task_il],
              "iterations": summary["iterations"], "seconds": round(time.time() - start, 1),
              "device": str(engine.device), "overrides": overrides_for(base, norm, buffer, seed, args, point)}
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{name}.json").write_text(json.dumps(record, indent=1))
    return record


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(records: list[dict], args) -> list[dict]:
    """One line per (base, norm, buffer[, grid point]) over seeds; with a grid, a ``best`` line per
    (base, buffer): the AdaB2N point of highest mean class-IL."""
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        point = tuple(r["point"]) if r.get("point") else None
        groups.setdefault((r["base"], r["norm"], r["buffer"], point), []).append(r)
    for base in args.bases:
        for buffer in args.buffers:
            best = None
            for norm in args.norms:
                for point in grid_points(norm, getattr(args, "grid", False)):
                    runs = sorted(groups.get((base, norm, buffer, point), []), key=lambda r: r["seed"])
                    if not runs:
                        continue
                    c_mean, c_std = mean_std([r["class_il"] for r in runs])
                    t_mean, t_std = mean_std([r["task_il"] for r in runs])
                    line = {"base": base, "norm": norm, "buffer": buffer,
                            "dataset": "digits (quick)" if args.quick else "cifar10",
                            "parity": bool(getattr(args, "parity", False)), "seeds": [r["seed"] for r in runs],
                            "class_il_mean": round(c_mean, 2), "class_il_std": None if c_std is None else round(c_std, 2),
                            "task_il_mean": round(t_mean, 2), "task_il_std": None if t_std is None else round(t_std, 2),
                            "class_il": [round(r["class_il"], 2) for r in runs], "task_il": [round(r["task_il"], 2) for r in runs],
                            "minutes_per_run": round(statistics.fmean(r["seconds"] for r in runs) / 60, 2)}
                    if point is not None:
                        line.update(kappa=point[0], lambda_=point[1], ada_t0=point[2])
                    bn = groups.get((base, "bn", buffer, None))
                    if norm != "bn" and bn:
                        line["class_il_gain_vs_bn"] = round(c_mean - statistics.fmean(r["class_il"] for r in bn), 2)
                        line["task_il_gain_vs_bn"] = round(t_mean - statistics.fmean(r["task_il"] for r in bn), 2)
                    lines.append(line)
                    if point is not None and (best is None or c_mean > best["class_il_mean"]):
                        best = line
            if best is not None:
                lines.append({**best, "best": True})
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
    parser.add_argument("--parity", action="store_true", help="the released code's recipe (see the module docstring)")
    parser.add_argument("--grid", action="store_true", help="AdaB2N over the released run.py kappa x lambda x ada_t0 grid")
    args = parser.parse_args(argv)
    args.buffers = args.buffers or (QUICK_BUFFERS if args.quick else [500, 2000])
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    default_dir = "adab2n_online_cifar10" + ("_parity" if args.parity else "") + ("_quick" if args.quick else "")
    args.output_dir = args.output_dir or str(REPO / "runs" / default_dir)

    grid = [(b, n, m, s, p) for b in args.bases for m in args.buffers for n in args.norms
            for p in grid_points(n, args.grid) for s in args.seeds]
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
                futures = [pool.submit(run_one, *key[:4], args, key[4]) for key in todo]
                for fut in futures:
                    rec = fut.result()
                    records.append(rec)
                    print(f"# done {rec['run']}: class-IL {rec['class_il']:.2f} task-IL {rec['task_il']:.2f} "
                          f"({rec['seconds']:.0f} s)", file=sys.stderr)
        else:
            for key in todo:
                rec = run_one(*key[:4], args, key[4])
                records.append(rec)
                print(f"# done {rec['run']}: class-IL {rec['class_il']:.2f} task-IL {rec['task_il']:.2f} "
                      f"({rec['seconds']:.0f} s)", file=sys.stderr)
    for line in aggregate(records, args):
        print(json.dumps(line))
    return 0 if all(math.isfinite(r["class_il"]) and math.isfinite(r["task_il"]) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
