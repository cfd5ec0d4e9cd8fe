"""Domain-incremental streams: one label space, a new input distribution per experience
(van de Ven, Tuytelaars & Tolias 2022).

``domain`` picks how the domains differ:

* ``permuted``: the whole dataset under a seeded pixel permutation per experience (Permuted MNIST);
* ``rotated``: the whole dataset rotated by a fixed angle per experience (Rotated MNIST);
* ``split``: disjoint class groups whose labels are mapped to their position in the group
  (e.g. Split MNIST as five 2-way problems, "first digit vs second digit");
* ``datasets``: each dataset in ``datasets`` is one domain over the shared labels 0..C-1
  (e.g. MNIST then Fashion-MNIST); images must have the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from clbench.data import load_dataset
from clbench.data.types import ImageSplit
from clbench.registry import ClbenchError, register_scenario
from clbench.scenarios.base import Experience, PixelPermutation, Rotation, Stream, seeded_generator, split_sizes
from clbench.scenarios.class_incremental import ClassSplitConfig, resolve_class_order
from clbench.validation import bounded, choice, path

DOMAINS = ("permuted", "rotated", "split", "datasets")


@dataclass
class DomainConfig:
    name: str = "domain_incremental"
    domain: str = choice("permuted", "permuted", "rotated", "split", "datasets")  # permuted | rotated | split | datasets
    dataset: str = "digits"
    data_root: Optional[str] = path(None)
    n_tasks: int = bounded(5, ge=1)  # not used by domain=datasets (one experience per dataset)
    rotations: Optional[List[float]] = None  # degrees per experience (rotated); default i*180/n_tasks
    first_identity: bool = False  # permuted: leave the first experience unpermuted
    datasets: Optional[List[str]] = None  # domain=datasets: dataset names, in order
    data_roots: Optional[List[str]] = path(None)  # domain=datasets: one root per dataset (optional)
    shuffle_classes: bool = True  # domain=split: seeded class grouping


@register_scenario("domain_incremental", config=DomainConfig,
                   description="Domain-IL: permuted/rotated images, class groups as 2-way tasks, or datasets as domains")
def domain_incremental(cfg: DomainConfig, seed: int, cache_dir: str | None = None) -> Stream:
    if cfg.domain not in DOMAINS:
        raise ClbenchError(f"unknown scenario.domain '{cfg.domain}'; valid: {', '.join(DOMAINS)}")
    if cfg.domain == "datasets":
        return _datasets_as_domains(cfg, cache_dir)
    dataset = load_dataset(cfg.dataset, cfg.data_root, cache_dir)
    if cfg.domain == "split":
        return _split_as_domains(cfg, dataset, seed)
    if cfg.n_tasks < 1:
        raise ClbenchError(f"scenario.n_tasks must be >= 1, got {cfg.n_tasks}")
    c, h, w = dataset.image_shape
    if cfg.domain == "permuted":
        transforms = [
            None if (t == 0 and cfg.first_identity) else PixelPermutation(torch.randperm(h * w, generator=seeded_generator(seed, 2, t)))
            for t in range(cfg.n_tasks)
        ]
    else:
        angles = list(cfg.rotations) if cfg.rotations is not None else [t * 180.0 / cfg.n_tasks for t in range(cfg.n_tasks)]
        if len(angles) != cfg.n_tasks:
            raise ClbenchError(f"scenario.rotations has {len(angles)} angles for n_tasks={cfg.n_tasks}")
        transforms = [Rotation(float(a)) for a in angles]
    all_classes = torch.arange(dataset.num_classes)
    experiences = tuple(
        Experience(index=t, task_id=t, classes=all_classes, train_idx=torch.arange(len(dataset.train)),
                   test_idx=torch.arange(len(dataset.test)), transform=transforms[t])
        for t in range(cfg.n_tasks)
    )
    return Stream(
        name=f"{cfg.domain}_{dataset.name}", protocol="domain", train=dataset.train, test=dataset.test,
        experiences=experiences, num_classes=dataset.num_classes, class_order=tuple(range(dataset.num_classes)),
        class_names=dataset.class_names, mean=dataset.mean, std=dataset.std,
        info={"dataset": dataset.name, "domain": cfg.domain},
    )


def _split_as_domains(cfg: DomainConfig, dataset, seed: int) -> Stream:
    split_cfg = ClassSplitConfig(dataset=cfg.dataset, n_tasks=cfg.n_tasks, shuffle_classes=cfg.shuffle_classes)
    order = resolve_class_order(dataset.num_classes, split_cfg, seed)
    try:
        per_task = split_sizes(order.numel(), cfg.n_tasks)[0]
    except ValueError as err:
        raise ClbenchError(f"scenario domain_incremental (split) on {cfg.dataset}: {err}") from None
    task_of = torch.empty(dataset.num_classes, dtype=torch.int64)
    label_of = torch.empty(dataset.num_classes, dtype=torch.int64)
    task_of[order] = torch.arange(order.numel()) // per_task
    label_of[order] = torch.arange(order.numel()) % per_task
    train = ImageSplit(dataset.train.x, label_of[dataset.train.y])
    test = ImageSplit(dataset.test.x, label_of[dataset.test.y])
    experiences = tuple(
        Experience(index=t, task_id=t, classes=torch.arange(per_task),
                   train_idx=(task_of[dataset.train.y] == t).nonzero().flatten(),
                   test_idx=(task_of[dataset.test.y] == t).nonzero().flatten())
        for t in range(cfg.n_tasks)
    )
    groups = order.view(cfg.n_tasks, per_task).tolist()
    return Stream(
        name=f"split_{dataset.name}_domain", protocol="domain", train=train, test=test, experiences=experiences,
        num_classes=per_task, class_order=tuple(order.tolist()),
        class_names=tuple(f"position {j}" for j in range(per_task)), mean=dataset.mean, std=dataset.std,
        info={"dataset": dataset.name, "domain": "split", "groups": groups},
    )


def _datasets_as_domains(cfg: DomainConfig, cache_dir: str | None) -> Stream:
    names = list(cfg.datasets or [])
    if len(names) < 2:
        raise ClbenchError("scenario.domain=datasets needs scenario.datasets: a list of at least two dataset names")
    roots = list(cfg.data_roots) if cfg.data_roots is not None else [None] * len(names)
    if len(roots) != len(names):
        raise ClbenchError(f"scenario.data_roots has {len(roots)} entries for {len(names)} datasets")
    parts = [load_dataset(n, r, cache_dir) for n, r in zip(names, roots)]
    shapes = {p.name: p.image_shape for p in parts}
    if len(set(shapes.values())) != 1:
        raise ClbenchError(f"datasets as domains need images of one shape, got {shapes}")
    num_classes = max(p.num_classes for p in parts)
    experiences, offsets = [], [0, 0]
    for t, p in enumerate(parts):
        experiences.append(Experience(
            index=t, task_id=t, classes=torch.arange(p.num_classes),
            train_idx=torch.arange(offsets[0], offsets[0] + len(p.train)),
            test_idx=torch.arange(offsets[1], offsets[1] + len(p.test)),
        ))
        offsets = [offsets[0] + len(p.train), offsets[1] + len(p.test)]
    cat = lambda splits: ImageSplit(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))  # noqa: E731
    n = len(parts)
    return Stream(
        name="+".join(names), protocol="domain", train=cat([p.train for p in parts]), test=cat([p.test for p in parts]),
        experiences=tuple(experiences), num_classes=num_classes, class_order=tuple(range(num_classes)),
        class_names=tuple(f"class {j}" for j in range(num_classes)),
        mean=tuple(sum(p.mean[i] for p in parts) / n for i in range(len(parts[0].mean))),
        std=tuple(sum(p.std[i] for p in parts) / n for i in range(len(parts[0].std))),
        info={"datasets": names, "domain": "datasets"},
    )
