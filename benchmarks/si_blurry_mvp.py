"""MVP vs its baselines on the Si-Blurry online stream (issue 4): one table per dataset, N seeds.

Methods (the ones the MVP paper, Moon et al. ICCV 2023, compares with that clbench has): finetune,
replay (ER), ewc, l2p, dualprompt, mvp -- on the ViT-Tiny/8 at 64 px pretrained on Tiny-ImageNet
classes 0..99 (``model=timm arch=vit_tiny_patch8_64``, ImageNet normalisation), two datasets:

* ``cifar10``: CIFAR-10 (the JPEG copy) **upsampled to 64 px** on the fly (the engine resizes the
  inputs of a fixed-size ViT, ``model.input_size``; augmentation happens at 32 px first), so the
  ViT sees objects at the scale it was pretrained at, 8x8 patches of 8 px and its own position
  embeddings (as the paper resizes 32-px CIFAR to the ViT's 224).  ``--cifar-input dynamic``
  instead feeds the 32-px images to timm's ``dynamic_img_size`` ViT (position embeddings
  interpolated to 4x4 patches; works with clbench's prompted forward too);
  ``configs/si_blurry_cifar10_vit.yaml``.
* ``tiny_imagenet100``: Tiny-ImageNet classes 100..199 (never seen by the ViT), 64 px;
  ``configs/si_blurry_tiny_imagenet100_vit.yaml``.

Protocol (``scenarios/si_blurry.py``, ``train.online=true``; KHU-AGI/Si-Blurry ``scripts/*.sh``):
5 tasks, N=50 (% disjoint classes), M=10 (% blurry samples), stochastic variant, one pass in
stream order, batch 64, ``online_iter`` 3 gradient steps per incoming batch, Adam with a constant
learning rate, bf16 AMP, 4-px padded crop + flip, evaluation every 1000 samples on the test images
of the exposed classes (A_auc), unexposed classes' logits masked in loss and evaluation.

Per method:

* l2p, dualprompt, mvp: frozen ViT, prompts + head trained at Adam lr 5e-3 (the paper's scripts),
  no memory (``MEM_SIZE=0`` in ``scripts/{l2p,dualprompt,mvp}.sh``).  L2P and DualPrompt run with
  ``strategy.mask_past_logits=false``: in the online protocol only the not-yet-exposed classes are
  masked (the code's ``self.mask`` of exposed classes, as MVP here), not the task's class set,
  which the learner could not know in advance.  Their other sizes are clbench's defaults
  (L2P++: pool 30, length 20, top-5, prefix in block 0; DualPrompt: G 6 / E 20 prefix), except
  that DualPrompt picks its E-prompt by key match in training too, from a pool of 10
  (``strategy.train_task_id=false``, ``e_pool_size=10``: the Si-Blurry code's DualPrompt,
  ``models/dualprompt.py`` @61bd5eb, never uses the task id).
* finetune, replay, ewc: the whole ViT + head fine-tuned at **Adam lr 1e-4** (our choice: 5e-3 is
  a prompt-tuning rate and wrecks a pretrained ViT under full fine-tuning; 1e-4 is the usual
  full-fine-tuning rate for Adam on ViTs, e.g. SLCA's slow learner).  replay: reservoir memory of
  500 (CIFAR-10; as ``configs/si_blurry_cifar10.yaml``) / 2000 (Tiny-ImageNet-100; the paper's
  ``scripts/er.sh``), memory batch 32 (= 64 - 64 // 2, the code's).  ewc: clbench's defaults
  (lambda 10 on the backbone, per-sample Fisher at each task end).

Output: one JSON line per dataset, each method's A_auc, A_last, A_avg, F_last (``summary.json``
``a_auc``, ``a_last``, ``a_avg``, ``f_last``) as ``{mean, std}`` over the seeds plus ``per_seed``
(with wall seconds), and the check ``mvp_above_l2p_and_dualprompt_on_a_auc`` (mean A_auc of mvp
above both; null when a row is missing).  A method whose strategy is not registered or that fails
is listed under ``skipped`` with the reason; the other rows still run.

    python benchmarks/si_blurry_mvp.py                                   # the full table (GPU), seeds 1 2 3
    python benchmarks/si_blurry_mvp.py --datasets cifar10 --methods l2p mvp --seeds 1
    python benchmarks/si_blurry_mvp.py --quick                           # CPU smoke run, < 1 min

``--quick``: the built-in digits as RGB (32 train / 12 test images per class, the pretrained
benchmark's ``bench_digits_rgb``) on a tiny random ViT (depth 5, 32-d, 2x2 patches), Si-Blurry 5
tasks with N/M as above, batch 16, evaluation every 100 samples, ER memory 50, no AMP or
augmentation; the ``cifar10`` row goes through the same upsampling as the real run (8 -> 16 px, ViT
at 16 px).  About 25 s on the shared 2-core CPU.  It checks that every row runs and that the
JSON is sane, not what it scores.  Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, resolve_device_and_threads, seed_row
from pretrained_tiny_imagenet100 import QUICK_DATASET, register_quick_dataset

CONFIGS = {"cifar10": REPO / "configs" / "si_blurry_cifar10_vit.yaml",
           "tiny_imagenet100": REPO / "configs" / "si_blurry_tiny_imagenet100_vit.yaml"}
BUFFER = {"cifar10": 500, "tiny_imagenet100": 2000}  # ER memory (the paper's 2000 is for 100+ classes)
FULL_FT_LR = 1e-4  # finetune / replay / ewc: the whole ViT at a fine-tuning learning rate
METRICS = ("a_auc", "a_last", "a_avg", "f_last")

# (label, strategy, overrides); "{buffer}" is filled per dataset
METHODS: list[tuple[str, str, list[str]]] = [
    ("finetune", "finetune", [f"train.lr={FULL_FT_LR}"]),
    ("replay", "replay", [f"train.lr={FULL_FT_LR}", "strategy.buffer_size={buffer}", "strategy.replay_batch_size=32"]),
    ("ewc", "ewc", [f"train.lr={FULL_FT_LR}"]),
    ("l2p", "l2p", ["train.lr=0.005", "strategy.mask_past_logits=false"]),
    ("dualprompt", "dualprompt", ["train.lr=0.005", "strategy.mask_past_logits=false",
                                  "strategy.train_task_id=false", "strategy.e_pool_size=10"]),  # Si-Blurry code
    ("mvp", "mvp", ["train.lr=0.005"]),
]
QUICK_SIZES = {"replay": ["strategy.replay_batch_size=8"], "l2p": ["strategy.pool_size=10"]}


# ---------------------------------------------------------------------------- runs
def dataset_overrides(args, dataset: str) -> list[str]:
    if args.quick:
        size = 16 if dataset == "cifar10" else 8  # cifar10 row: 8-px images upsampled to a 16-px ViT, as 32 -> 64
        return ["scenario=si_blurry", f"scenario.dataset={QUICK_DATASET}",
                "scenario.n_tasks=5", "scenario.disjoint_percent=50", "scenario.blurry_percent=10",
                "scenario.variant=stochastic",
                "model=timm", "model.arch=vit_tiny_patch16_224", "model.pretrained=false", "model.normalize=dataset",
                f"model.kwargs={{img_size: {size}, patch_size: {size // 2}, embed_dim: 32, depth: 5, num_heads: 2}}",
                "train.online=true", "train.online_iter=3", "train.batch_size=16", "train.optimizer=adam",
                "train.scheduler=none", "train.reset_optimizer=false", "train.augment=none", "train.amp=none",
                "eval.every_samples=100", "eval.subset_size=0", "eval.batch_size=128"]
    if dataset == "cifar10" and args.cifar_input == "dynamic":
        return ["scenario.dataset=cifar10", "model.kwargs={dynamic_img_size: true}"]
    return []


def run_one(args, dataset: str, label: str, strategy: str, extra: list[str], seed: int, out_dir: str) -> dict[str, Any]:
    from clbench.config import load_config
    from clbench.engine import Engine

    common = ["logging.console=false", "logging.progress=false", "logging.tensorboard=false", "logging.jsonl=false",
              "logging.wandb.enabled=false", "checkpoint.enabled=false", "checkpoint.every=0",
              f"device={args.device}", f"output_dir={out_dir}"]
    extra = [o.replace("{buffer}", str(BUFFER[dataset] if not args.quick else 50)) for o in extra]
    overrides = [*common, *dataset_overrides(args, dataset), f"strategy={strategy}", *extra,
                 *(QUICK_SIZES.get(label, []) if args.quick else []), *args.override,
                 f"seed={seed}", f"name={label}-{dataset}-s{seed}"]
    config = None if args.quick else CONFIGS[dataset]
    t0 = time.perf_counter()
    summary = Engine(load_config(config, overrides)).run()
    return {"seed": seed, **{m: summary.get(m) for m in METRICS}, "seconds": round(time.perf_counter() - t0, 2)}


def table_for(args, dataset: str, methods, known, out_dir: str) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    t0 = time.perf_counter()
    for label, strategy, extra in methods:
        if strategy not in known:
            skipped[label] = f"strategy '{strategy}' is not registered (strategies/{strategy}.py missing)"
            continue
        row, failure = seed_row(f"{dataset}/{label}", args.seeds,
                                partial(run_one, args, dataset, label, strategy, extra, out_dir=out_dir), METRICS)
        if failure:
            skipped[label] = failure
        else:
            table[label] = row
    auc = {k: (table[k]["a_auc"]["mean"] if k in table else None) for k in ("mvp", "l2p", "dualprompt")}
    check = None if None in auc.values() else bool(auc["mvp"] > auc["l2p"] and auc["mvp"] > auc["dualprompt"])
    if args.quick:
        model, data = "tiny random ViT (depth 5, 32-d, 2x2 patches)", ("digits RGB upsampled 8->16 px" if dataset == "cifar10" else "digits RGB 8 px")
    else:
        model = "vit_tiny_patch8_64 (Tiny-ImageNet 0-99 weights)" + (", dynamic_img_size" if dataset == "cifar10" and args.cifar_input == "dynamic" else "")
        data = {"cifar10": "CIFAR-10 " + ("upsampled 32->64 px" if args.cifar_input == "upsample" else "32 px"),
                "tiny_imagenet100": "Tiny-ImageNet classes 100-199, 64 px"}[dataset]
    return {"benchmark": "si_blurry_mvp", "dataset": dataset, "quick": args.quick, "seeds": args.seeds,
            "device": args.device, "config": None if args.quick else str(CONFIGS[dataset].relative_to(REPO)),
            "data": data, "model": model,
            "protocol": {"n_tasks": 5, "disjoint_percent": 50, "blurry_percent": 10, "variant": "stochastic",
                         "online_iter": 3, "batch_size": 16 if args.quick else 64,
                         "eval_every_samples": 100 if args.quick else 1000,
                         "lr": {"prompt methods": 5e-3, "full fine-tuning": FULL_FT_LR}, "optimizer": "adam",
                         "er_memory": 50 if args.quick else BUFFER[dataset]},
            "results": table, "mvp_above_l2p_and_dualprompt_on_a_auc": check, "skipped": skipped,
            "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 1 2 3; --quick: 1)")
    p.add_argument("--datasets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--methods", nargs="+", default=None, help="labels to run (default: all)")
    p.add_argument("--cifar-input", default="upsample", choices=["upsample", "dynamic"],
                   help="CIFAR-10 into the 64-px ViT: upsampled to 64 px (default) or 32 px with dynamic_img_size")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default on CPU: 1)")
    p.add_argument("--override", nargs="*", default=[], help="extra clbench overrides for every run")
    p.add_argument("--quick", action="store_true", help="digits + tiny random ViT, CPU smoke run")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [1] if args.quick else [1, 2, 3]
    if args.quick:
        args.device = "cpu" if args.device == "auto" else args.device
    resolve_device_and_threads(args)

    from clbench.registry import STRATEGIES

    if args.quick:
        register_quick_dataset()
    known = set(STRATEGIES.names())
    methods = [m for m in METHODS if args.methods is None or m[0] in args.methods]
    results = []
    with tempfile.TemporaryDirectory() as out_dir:
        for dataset in args.datasets:
            results.append(table_for(args, dataset, methods, known, out_dir))
            emit(results[-1])
    return results


if __name__ == "__main__":
    main()
