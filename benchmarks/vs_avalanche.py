"""clbench against avalanche-lib 0.6 on the identical continual-evaluation run (issue 5, benchmark 2).

Both frameworks run back to back in this process on the same:

* scenario: the clbench stream (Split CIFAR-10, 5 experiences x 2 classes, seeded class
  order); Avalanche gets one dataset per experience built from the same tensors
  (``benchmark_from_datasets``), already normalised exactly as clbench's preprocessing does,
  as float32 host tensors without per-sample transforms (Avalanche's fastest form);
* training samples in the same order: each Avalanche experience holds its samples in the
  order of clbench's seeded epoch permutation (``clbench.engine.batch_schedule``) and is
  loaded with ``shuffle=False``, so both see identical mini-batches (1 epoch per experience);
* model and initial weights: clbench builds the model, Avalanche trains a deep copy of it;
* objective: clbench's class-incremental cross-entropy over the classes seen so far; for
  Avalanche the copy is wrapped in a module that sets the logits of unseen classes to -inf
  (the same masking, also applied at evaluation, as clbench's evaluator does);
* optimiser: SGD (lr 0.1, no momentum, no weight decay), batch 128, fp32, no augmentation;
* evaluation schedule and images: after every training iteration, on the same fixed
  1000-image subsets (``Experience.eval_subset(size, seed)``) of the tasks seen so far --
  clbench ``eval.every=1``; Avalanche ``eval_every=1, peval_mode="iteration"``,
  ``num_workers=0``, eval stream = the seen experiences' subsets (``train(exp,
  eval_streams=[seen])``), eval batch = clbench's ``eval.batch_size``.  Avalanche also
  evaluates once before and once after each experience (its schedule); clbench also
  evaluates every full test set before training and after each experience (its schedule).
  The JSON counts each framework's evaluated images.

A third column runs Avalanche's own training loop again, with ``eval_every=-1`` and
clbench's evaluator as an Avalanche plugin (``clbench.avalanche.ContinualEvaluationPlugin``,
every iteration, on the same subsets): what an Avalanche user gains without leaving Avalanche.

Prints ONE JSON line: the three wall times (``clbench_s``, ``avalanche_s``,
``avalanche_plugin_s``), the speed-ups and the three accuracy matrices (row k: the subset
accuracies of tasks 0..k after experience k; they should agree within seed noise -- on CPU they
usually agree exactly).

    python benchmarks/vs_avalanche.py --device cuda
    python benchmarks/vs_avalanche.py --device cpu --images-per-class 64 --test-images-per-class 20 --subset-size 40
    python benchmarks/vs_avalanche.py --quick
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Any

from _common import (
    clbench_settings,
    common_args,
    device_info,
    emit,
    load_clbench_config,
    log,
    register_bench_dataset,
    resolve,
    sync,
    timed_evaluator,
    warm_up,
)


def avalanche_run(args, cfg, stream, model, timing: bool, plugin_dir: str | None = None) -> dict[str, Any]:
    """Avalanche's Naive (fine-tuning) strategy over the same stream; timed from building the
    benchmark out of prepared tensors to the end of training.  With ``plugin_dir`` Avalanche does
    not evaluate (``eval_every=-1``): clbench's :class:`clbench.avalanche.ContinualEvaluationPlugin`
    does, every iteration, on the same subsets (the benchmark's test stream holds exactly
    them), writing its clbench run directory under ``plugin_dir``."""
    import torch
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset
    from avalanche.core import SupervisedPlugin
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import Naive
    from torch import nn

    from clbench.engine import batch_schedule
    from clbench.transforms import Preprocess

    class SeenClasses(nn.Module):
        """The model with the logits of classes not seen yet set to -inf (clbench's class-IL mask)."""

        def __init__(self, model: nn.Module, num_classes: int):
            super().__init__()
            self.model = model
            self.register_buffer("allowed", torch.zeros(num_classes, dtype=torch.bool))

        def forward(self, x):
            return self.model(x).float().masked_fill(~self.allowed, float("-inf"))

    class OrderCheck(SupervisedPlugin):
        """Checks that Avalanche's training batches carry clbench's labels, batch by batch."""

        def __init__(self, expected):
            super().__init__()
            self.expected, self.k, self.i, self.ok = expected, 0, 0, True

        def before_training_exp(self, strategy, **kw):
            self.i = 0

        def before_forward(self, strategy, **kw):
            exp = self.expected[self.k]
            self.ok &= self.i < len(exp) and torch.equal(strategy.mb_y.cpu(), exp[self.i])
            self.i += 1

        def after_training_exp(self, strategy, **kw):
            self.ok &= self.i == len(self.expected[self.k])
            self.k += 1

    # ---- data preparation (untimed; reported): the same tensors, order and subsets as clbench
    t0 = time.perf_counter()
    prep = Preprocess(stream.mean, stream.std)  # clbench's own normalisation, no augmentation
    train_x, test_x = prep(stream.train.x), prep(stream.test.x)
    train_sets, test_sets, expected = [], [], []
    for k, exp in enumerate(stream):
        batches = list(batch_schedule(exp.train_idx, torch.zeros_like(exp.train_idx), cfg, k))
        order = torch.cat([idx for idx, _ in batches])
        expected.append([stream.train.y[idx] for idx, _ in batches])
        train_sets.append((train_x[order], stream.train.y[order]))
        sub = exp.eval_subset(cfg.eval.subset_size, cfg.seed)
        test_sets.append((test_x[sub], stream.test.y[sub]))
    prep_s = time.perf_counter() - t0

    evaluated = {"calls": 0, "seconds": 0.0, "images": 0}
    wrapped = SeenClasses(model, stream.num_classes)
    sync(args.device)
    t0 = time.perf_counter()
    make = lambda x, y: _make_taskaware_tensor_classification_dataset(x, y, targets=y, task_labels=0)
    bm = benchmark_from_datasets(train=[make(*d) for d in train_sets], test=[make(*d) for d in test_sets])
    checker = OrderCheck(expected) if args.check_order else None
    plugins = [checker] if checker is not None else []
    clbench_plugin = None
    if plugin_dir is not None:
        from clbench.avalanche import ContinualEvaluationPlugin

        clbench_plugin = ContinualEvaluationPlugin(
            bm.test_stream, every=1, subset_size=0, precision=str(cfg.eval.precision),
            eval_batch_size=int(cfg.eval.batch_size), seed=cfg.seed, run_dir=f"{plugin_dir}/avalanche_plugin")
        plugins.append(clbench_plugin)
    strategy = Naive(
        model=wrapped, optimizer=torch.optim.SGD(wrapped.parameters(), lr=args.lr, momentum=0.0, weight_decay=0.0),
        criterion=nn.CrossEntropyLoss(), train_mb_size=args.batch_size, train_epochs=1,
        eval_mb_size=int(cfg.eval.batch_size), device=args.device, plugins=plugins,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
        eval_every=-1 if clbench_plugin is not None else 1, peval_mode="iteration",
    )
    original_eval = strategy.eval

    def timed_eval(exps, **kw):  # PeriodicEval calls strategy.eval(stream) for each eval stream
        if timing:
            sync(args.device)
        t = time.perf_counter()
        out = original_eval(exps, **kw)
        if timing:
            sync(args.device)
        evaluated["seconds"] += time.perf_counter() - t
        evaluated["calls"] += 1
        evaluated["images"] += sum(len(e.dataset) for e in exps)
        return out

    strategy.eval = timed_eval
    matrix = []
    for k, exp in enumerate(bm.train_stream):
        wrapped.allowed.copy_(stream.class_mask(k)[0].to(wrapped.allowed.device))
        strategy.train(exp, eval_streams=[bm.test_stream[: k + 1]], shuffle=False, num_workers=0)
        if clbench_plugin is not None:  # its evaluation after the last iteration of experience k: tasks 0..k
            matrix.append([clbench_plugin.last_periodic[j] for j in range(k + 1)])
            continue
        last = strategy.evaluator.get_last_metrics()  # its final evaluation of experience k: tasks 0..k
        matrix.append([experience_accuracy(last, j) for j in range(k + 1)])
    sync(args.device)
    wall = time.perf_counter() - t0
    if clbench_plugin is not None:
        summary = clbench_plugin.summary()
        if summary["status"] != "finished":
            raise SystemExit(f"the plugin's run did not finish: {summary['status']}")
        evaluated = {"seconds": clbench_plugin.eval_seconds, "periodic_evaluations": summary["iterations"],
                     "periodic_images": sum(sum(clbench_plugin.evaluator.subset_sizes[: k + 1]) * n
                                            for k, n in enumerate(iterations_per(bm, args.batch_size))),
                     "min_acc": summary["min_acc"], "wc_acc": summary["wc_acc"], "n_gaps": summary["n_gaps"]}
    return {"wall_s": wall, "prep_s": prep_s, "eval": evaluated, "matrix": matrix,
            "order_check": ("passed" if checker.ok else "FAILED") if checker is not None else "not run"}


def iterations_per(bm, batch_size: int) -> list[int]:
    """Training iterations of each experience of the Avalanche benchmark (1 epoch)."""
    return [-(-len(e.dataset) // batch_size) for e in bm.train_stream]


def experience_accuracy(metrics: dict[str, Any], j: int) -> float:
    """Avalanche's ``Top1_Acc_Exp/eval_phase/test_stream[/TaskXXX]/Exp{j:03d}`` (the task part
    appears only when experiences carry task labels)."""
    keys = [k for k in metrics if k.startswith("Top1_Acc_Exp/eval_phase/test_stream/") and k.endswith(f"/Exp{j:03d}")]
    if len(keys) != 1:
        raise KeyError(f"no unique Avalanche accuracy for experience {j}: {sorted(metrics)}")
    return float(metrics[keys[0]])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--check-order", action="store_true",
                        help="verify, batch by batch, that Avalanche trains on clbench's batches (adds a plugin)")
    parser.add_argument("--no-eval-timing", action="store_true", help="no device syncs around evaluation calls")
    args = parser.parse_args(argv)
    resolve(args)

    import avalanche
    import torch

    from clbench.config import component_config
    from clbench.engine import Engine
    from clbench.scenarios import build_stream

    data = register_bench_dataset(args)
    log(f"vs_avalanche: {data} on {device_info(args.device)}; avalanche {avalanche.__version__}")
    with tempfile.TemporaryDirectory(prefix="clbench-bench-") as out:
        cfg = load_clbench_config(args, every=1, out_dir=out, name="clbench")
        stream = build_stream(component_config(cfg.scenario), seed=cfg.seed, cache_dir=cfg.cache_dir)  # host copy
        from clbench.models import build_model

        scratch = build_model(component_config(cfg.model), stream.image_shape, stream.num_classes)
        warm_up(scratch, stream.image_shape, stream.num_classes, args.batch_size, args.device)
        del scratch

        # ---- clbench: Engine(cfg).run() is what clbench.engine.run(cfg) does; the model is copied in between
        with timed_evaluator(args.device, enabled=not args.no_eval_timing) as times:
            sync(args.device)
            t0 = time.perf_counter()
            engine = Engine(cfg)
            setup_s = time.perf_counter() - t0
            initial = copy.deepcopy(engine.model)  # untimed
            sync(args.device)
            t1 = time.perf_counter()
            summary = engine.run()
            sync(args.device)
            clbench_s = setup_s + time.perf_counter() - t1
        if summary.get("status") != "finished":
            raise SystemExit(f"clbench run did not finish: {summary.get('error')}")
        log(f"clbench: {clbench_s:.2f} s (periodic eval {times.periodic.seconds:.2f} s)")
        cl_matrix = [times.last_periodic[k] for k in range(len(stream))]

        av = avalanche_run(args, cfg, stream, copy.deepcopy(initial), timing=not args.no_eval_timing)
        log(f"avalanche: {av['wall_s']:.2f} s (eval {av['eval']['seconds']:.2f} s), order check {av['order_check']}")
        pl = avalanche_run(args, cfg, stream, initial, timing=False, plugin_dir=out)
        log(f"avalanche + clbench plugin: {pl['wall_s']:.2f} s (eval {pl['eval']['seconds']:.2f} s), "
            f"order check {pl['order_check']}")

    diffs = [abs(a - b) for ra, rb in zip(cl_matrix, av["matrix"]) for a, b in zip(ra, rb)]
    n_iter = summary["iterations"]
    cl_eval = {"periodic": times.periodic.as_dict(), "full_test": times.full.as_dict()}
    emit({
        "benchmark": "vs_avalanche",
        "device": device_info(args.device),
        "threads": torch.get_num_threads(),
        "avalanche_version": avalanche.__version__,
        "workload": {
            "dataset": data["dataset"], "model": args.workload["model_name"], "quick": args.quick,
            "train_images": data["train_images"], "test_images": data["test_images"], "experiences": len(stream),
            "class_order": list(stream.class_order), "batch_size": args.batch_size, "epochs": 1,
            "iterations": n_iter, "optimizer": f"sgd(lr={args.lr})", "avalanche_precision": "fp32",
            "clbench_settings": clbench_settings(args), "augment": "none",
            "eval_every": 1, "eval_subset_size": args.subset_size, "eval_tasks": "seen",
            "eval_batch_size": int(cfg.eval.batch_size), "seed": args.seed,
            "same_sample_order": True, "same_initial_weights": True,
        },
        "clbench_s": round(clbench_s, 3),
        "avalanche_s": round(av["wall_s"], 3),
        "speedup": round(av["wall_s"] / clbench_s, 2),
        "avalanche_plugin_s": round(pl["wall_s"], 3),
        "plugin_speedup": round(av["wall_s"] / pl["wall_s"], 2),
        "clbench_matrix": [[round(a, 4) for a in row] for row in cl_matrix],
        "avalanche_matrix": [[round(a, 4) for a in row] for row in av["matrix"]],
        "avalanche_plugin_matrix": [[round(a, 4) for a in row] for row in pl["matrix"]],
        "max_abs_diff": round(max(diffs), 4),
        "plugin_max_abs_diff": round(max(abs(a - b) for ra, rb in zip(pl["matrix"], av["matrix"]) for a, b in zip(ra, rb)), 4),
        "clbench_eval": cl_eval,
        "avalanche_eval": {k: round(v, 4) if isinstance(v, float) else v for k, v in av["eval"].items()},
        "avalanche_plugin_eval": {k: round(v, 4) if isinstance(v, float) else v for k, v in pl["eval"].items()},
        "clbench_setup_s": round(setup_s, 3),
        "avalanche_data_prep_s": round(av["prep_s"], 3),
        "clbench_full_test_matrix": [[round(a, 4) if a is not None else None for a in row] for row in summary["matrix"]],
        "order_check": av["order_check"],
        "plugin_order_check": pl["order_check"],
        "notes": "matrices: row k = accuracy on the eval subsets of tasks 0..k after experience k. clbench_s includes "
                 "Engine construction (stream on device, eval subsets) and its full-test passes (clbench_eval.full_test); "
                 "avalanche_s starts from prepared normalised tensors (avalanche_data_prep_s excluded) and includes its "
                 "extra eval passes before and after each experience. avalanche_plugin_s: the same Avalanche training loop "
                 "with eval_every=-1 plus clbench.avalanche.ContinualEvaluationPlugin (every=1, the same subsets, "
                 "eval.precision, JSONL + TensorBoard run directory, full-test passes and the untrained baseline); "
                 "plugin_speedup = avalanche_s / avalanche_plugin_s",
    })


if __name__ == "__main__":
    main()
