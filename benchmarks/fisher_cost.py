"""What EWC's per-sample Fisher costs against one training epoch over the same data (issue 11).

Workload: the README's EWC run, ``configs/split_mnist.yaml strategy=ewc`` (Split MNIST,
class-incremental, MLP 2x400), experience 0 (11,809 training images).  Measured side by side in
this process, on the same model and data, after an untimed warm-up of each:

1. ``epoch_s``: one epoch of training, as the engine does it (Adam lr 1e-3, batch 128, the
   experience's samples in order, preprocessing included, masked cross-entropy).
2. ``fisher_s``: ``clbench.regularizers.per_sample_fisher`` over the same samples, exactly as
   ``EWC.after_experience`` calls it (``strategy.fisher_batch_size`` 64, ``params`` backbone
   or all), i.e. 1/N sum_n (grad log p(y_n | x_n))^2 with one gradient per sample.

``ratio`` = fisher_s / epoch_s (issue 11's target: <= 2).  Also printed:
``peak_rss_growth_mb``, how far the process's RSS high-water mark (``ru_maxrss``) rose during
the timed repeats, after the warm-up (0 when the Fisher pass keeps nothing from batch to batch).

Prints ONE JSON line.  ``--quick`` is a CPU smoke run on the built-in digits (same MLP).

    python benchmarks/fisher_cost.py                     # Split MNIST, CPU, 1 thread
    python benchmarks/fisher_cost.py --params all --repeats 3
    python benchmarks/fisher_cost.py --quick
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time

from _common import REPO, data_root, device_info, emit, log, resolve_device_and_threads, sync

import torch


def build(args, out_dir: str):
    """Engine (stream, model, context, EWC strategy) of the workload; nothing is trained or written."""
    from clbench.config import load_config
    from clbench.engine import Engine

    overrides = ["strategy=ewc", f"strategy.params={args.params}", f"strategy.fisher_batch_size={args.fisher_batch_size}",
                 f"train.batch_size={args.batch_size}", "logging.console=false", "logging.tensorboard=false",
                 "logging.jsonl=false", "logging.wandb.enabled=false", "checkpoint.enabled=false",
                 f"device={args.device}", f"seed={args.seed}", f"output_dir={out_dir}"]
    if args.quick:
        config = None  # the built-in digits
    else:
        config = REPO / "configs" / "split_mnist.yaml"
        overrides.append(f"scenario.data_root={data_root('mnist')}")
    return Engine(load_config(config, overrides))


def one_epoch(engine, exp, batch_size: int) -> float:
    """Seconds for one training epoch over ``exp`` (forward, masked CE, backward, Adam step)."""
    from clbench.strategy import masked_cross_entropy

    model, ctx = engine.model, engine.ctx
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    sync(engine.device)
    t0 = time.perf_counter()
    for b in ctx.batches([exp], batch_size):
        loss = masked_cross_entropy(model(ctx.inputs(b.x)), b.y, ctx.class_mask[b.task])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(engine.device)
    return time.perf_counter() - t0


def fisher_pass(engine, exp, batch_size: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds for the per-sample Fisher over ``exp``, fed as ``EWC.after_experience`` feeds it."""
    from clbench import regularizers

    ctx = engine.ctx
    batches = ((ctx.inputs(b.x), b.y, ctx.class_mask[b.task]) for b in ctx.batches([exp], batch_size))
    sync(engine.device)
    t0 = time.perf_counter()
    fisher = regularizers.per_sample_fisher(engine.model, engine.strategy.reg.params, batches)
    sync(engine.device)
    return time.perf_counter() - t0, fisher


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default on CPU: 1)")
    parser.add_argument("--params", default="backbone", choices=["backbone", "all"], help="EWC's strategy.params")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size (split_mnist.yaml: 128)")
    parser.add_argument("--fisher-batch-size", type=int, default=64, help="EWC's strategy.fisher_batch_size")
    parser.add_argument("--repeats", type=int, default=1, help="timed repetitions of each (the minimum is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run on the built-in digits")
    args = parser.parse_args(argv)
    resolve_device_and_threads(args)
    with tempfile.TemporaryDirectory() as out_dir:
        engine = build(args, out_dir)
        exp = engine.stream[0]
        n = int(exp.train_idx.numel())
        log(f"[fisher_cost] {n} samples, {device_info(args.device)}; warm-up ...")
        fisher_pass(engine, exp, args.fisher_batch_size)  # warm-up: imports, allocator, first vmap trace
        one_epoch(engine, exp, args.batch_size)
        epochs, fishers = [], []
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for r in range(args.repeats):
            fisher_s, fisher = fisher_pass(engine, exp, args.fisher_batch_size)
            fishers.append(fisher_s)
            epochs.append(one_epoch(engine, exp, args.batch_size))
            log(f"[fisher_cost] repeat {r}: fisher {fishers[-1]:.2f}s, epoch {epochs[-1]:.2f}s")
        rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024  # Linux: KiB
    fisher_s, epoch_s = min(fishers), min(epochs)
    n_params = sum(p.numel() for p in engine.strategy.reg.params.values())
    emit({
        "benchmark": "fisher_cost",
        "workload": {"dataset": "digits" if args.quick else "mnist", "scenario": "class_incremental, experience 0",
                     "model": "mlp(400,400)", "samples": n, "params": args.params, "regularised_params": n_params,
                     "train_batch_size": args.batch_size, "fisher_batch_size": args.fisher_batch_size,
                     "quick": args.quick},
        "device": device_info(args.device),
        "epoch_s": round(epoch_s, 4),
        "fisher_s": round(fisher_s, 4),
        "ratio": round(fisher_s / epoch_s, 3),
        "fisher_ms_per_batch": round(1000 * fisher_s / -(-n // args.fisher_batch_size), 3),
        "fisher_has_grad_fn": any(f.grad_fn is not None for f in fisher.values()),
        "peak_rss_growth_mb": round(rss_growth_mb, 1),
        "repeats": args.repeats,
    })


if __name__ == "__main__":
    sys.exit(main())
