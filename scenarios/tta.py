"""Continual test-time adaptation streams (protocol ``tta``; Wang et al., CVPR 2022, "Continual
Test-Time Domain Adaptation"): a source model adapts online, without labels, to a sequence
of shifted domains, each domain's test set streamed once.

``corruption_stream`` is CIFAR-10-C as CoTTA's CIFAR experiments use it: the CIFAR-10 test set
under each corruption of ``corruptions`` (default: the 15 standard ones, in the standard order
gaussian_noise ... jpeg_compression) at one ``severity`` (default 5), ``n_examples`` images per
domain (default all 10,000), one experience per corruption.  CIFAR-10-C itself is not here, so
the corrupted images are generated from the clean test set with :mod:`clbench.scenarios.corruptions`
(the 32x32 constants of the original ``make_cifar_c.py``; see that module for what is exact
and what approximated) and cached as uint8 in the dataset cache (``cache_dir``), one file per
corruption, so a rerun starts in seconds.

* The clean images are those of the loaded dataset; with the JPEG copy of CIFAR-10 they are
  already lossy (a CIFAR-10 ResNet-56 scores ~83% on it vs ~93% on the originals), so errors
  are higher than on the released CIFAR-10-C, which was made from the original PNG-exact data.
* The corrupted images depend only on ``corruption_seed`` (not the run seed): every run and
  seed sees the same CIFAR-10-C, as with the released dataset.
* With ``n_examples < 10000`` a fixed subset (from ``corruption_seed``) is used, the same
  clean images in every domain, as the first-n of each CIFAR-10-C file are.
* ``shuffle``: each domain is streamed in a seeded random order (run seed).  The official
  code streams CIFAR-10-C in file order, which is the original test-batch order and so
  class-mixed; our JPEG copy of CIFAR-10 is sorted by class, so streaming it unshuffled would
  give single-class batches (and break batch-statistics methods).
* There is no training data (the train split is empty); ``mean``/``std`` normalise the model
  inputs and default to the statistics the provided CIFAR-10 ResNet weights were trained with
  (ImageNet's: see :mod:`clbench.models.cifar_resnet`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from clbench.data import load_dataset
from clbench.data.cache import cached_dataset
from clbench.data.types import ImageDataset, ImageSplit
from clbench.models.cifar_resnet import IMAGENET_MEAN, IMAGENET_STD
from clbench.registry import ClbenchError, register_scenario
from clbench.scenarios.base import Experience, Stream, seeded_generator
from clbench.scenarios.corruptions import CORRUPTIONS, IMAGE_SIZE, corrupt
from clbench.validation import bounded, path

#: Bump when the corrupted images of any corruption change (invalidates cached streams).
CORRUPTION_VERSION = 1


@dataclass
class CorruptionStreamConfig:
    name: str = "corruption_stream"
    dataset: str = "cifar10"  # a dataset of 32x32 RGB images (the corruption constants are CIFAR's)
    data_root: Optional[str] = path(None)
    corruptions: List[str] = field(default_factory=lambda: list(CORRUPTIONS))  # one domain each, in this order
    severity: int = bounded(5, ge=1, le=5)  # 1..5; CoTTA reports severity 5
    n_examples: int = bounded(10000, ge=1)  # test images per domain (RobustBench's NUM_EX)
    corruption_seed: int = bounded(0, ge=0)  # fixes the corrupted images (and the subset); independent of the run seed
    shuffle: bool = True  # seeded random order within each domain (the JPEG copy is class-sorted)
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # input normalisation of the source model
    std: List[float] = bounded(default_factory=lambda: list(IMAGENET_STD), gt=0)


@register_scenario("corruption_stream", config=CorruptionStreamConfig,
                   description="Continual test-time adaptation: CIFAR-10-C corruptions as a stream of test domains")
def corruption_stream(cfg: CorruptionStreamConfig, seed: int, cache_dir: str | None = None) -> Stream:
    names = list(cfg.corruptions)
    if not names:
        raise ClbenchError("scenario corruption_stream: scenario.corruptions is empty")
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ClbenchError(f"scenario corruption_stream: unknown corruption(s) {unknown}; valid: {', '.join(CORRUPTIONS)}")
    if not 1 <= cfg.severity <= 5:
        raise ClbenchError(f"scenario corruption_stream: severity must be 1..5, got {cfg.severity}")
    if len(cfg.mean) != 3 or len(cfg.std) != 3:
        raise ClbenchError(f"scenario corruption_stream: mean and std need 3 values, got {cfg.mean} / {cfg.std}")
    dataset = load_dataset(cfg.dataset, cfg.data_root, cache_dir)
    if dataset.image_shape != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ClbenchError(f"scenario corruption_stream: needs 32x32 RGB images (the CIFAR-10-C constants), "
                           f"'{cfg.dataset}' has {dataset.image_shape}")
    n_total = len(dataset.test)
    if not 1 <= cfg.n_examples <= n_total:
        raise ClbenchError(f"scenario corruption_stream: n_examples must be in 1..{n_total}, got {cfg.n_examples}")
    if cfg.n_examples == n_total:
        subset = torch.arange(n_total)
    else:  # a fixed subset, the same clean images in every domain
        perm = torch.randperm(n_total, generator=seeded_generator(cfg.corruption_seed, 17))
        subset = perm[:cfg.n_examples].sort().values
    clean_x, clean_y = dataset.test.x[subset], dataset.test.y[subset]
    digest = hashlib.sha256(clean_x.numpy().tobytes()).hexdigest()[:12]

    blocks = []
    for name in names:
        key = f"{dataset.name}-c-{name}-s{cfg.severity}-n{subset.numel()}-seed{cfg.corruption_seed}-{digest}-v{CORRUPTION_VERSION}"

        def build(name: str = name) -> ImageDataset:
            x = corrupt(clean_x, name, cfg.severity, seed=cfg.corruption_seed)
            empty = ImageSplit(torch.empty((0, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
            return ImageDataset(key, empty, ImageSplit(x, clean_y.clone()), dataset.class_names, dataset.mean, dataset.std)

        blocks.append(cached_dataset(key, [], cache_dir, build).test)

    n = subset.numel()
    test = ImageSplit(torch.cat([b.x for b in blocks]), torch.cat([b.y for b in blocks]))
    train = ImageSplit(torch.empty((0, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    all_classes = torch.arange(dataset.num_classes)
    experiences = []
    for k in range(len(names)):
        order = torch.randperm(n, generator=seeded_generator(seed, 23, k)) if cfg.shuffle else torch.arange(n)
        experiences.append(Experience(index=k, task_id=k, classes=all_classes, train_idx=torch.empty(0, dtype=torch.int64),
                                      test_idx=k * n + order))
    return Stream(
        name=f"{dataset.name}c_s{cfg.severity}", protocol="tta", train=train, test=test,
        experiences=tuple(experiences), num_classes=dataset.num_classes, class_order=tuple(range(dataset.num_classes)),
        class_names=dataset.class_names, mean=tuple(float(v) for v in cfg.mean), std=tuple(float(v) for v in cfg.std),
        info={"dataset": dataset.name, "domains": dict(enumerate(names)), "severity": cfg.severity,
              "n_examples": n, "corruption_seed": cfg.corruption_seed},
    )
