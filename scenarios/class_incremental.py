"""Class- and task-incremental splits of a labelled dataset (van de Ven, Tuytelaars & Tolias 2022).

The classes are put in a seeded random order (or a given one), then cut into ``n_tasks``
groups: equal groups, or an initial group of ``initial_classes`` followed by equal steps
(e.g. B50 + 5x10: ``initial_classes: 50, n_tasks: 6``).  Task-IL uses the same split and
gives the task id to the model; class-IL does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from clbench.data import load_dataset
from clbench.registry import ClbenchError, register_scenario
from clbench.scenarios.base import Experience, Stream, indices_by_class, remap_labels, seeded_generator, split_sizes
from clbench.validation import bounded, path


@dataclass
class ClassSplitConfig:
    """Fields shared by class- and task-incremental scenarios."""

    name: str = "class_incremental"
    dataset: str = "digits"
    data_root: Optional[str] = path(None)  # folder of the dataset's files (see `clbench list`)
    n_tasks: int = bounded(5, ge=1)  # experiences, including the initial one when initial_classes > 0
    initial_classes: int = bounded(0, ge=0)  # B: classes of the first experience (0 = equal split)
    classes: Optional[List[int]] = bounded(None, ge=0)  # restrict to these original labels (e.g. 100..199)
    class_order: Optional[List[int]] = bounded(None, ge=0)  # explicit order of original labels (overrides shuffling)
    shuffle_classes: bool = True  # seeded random class order; false = sorted labels
    allow_uneven: bool = False  # allow splits where classes do not divide evenly


@register_scenario("class_incremental", config=ClassSplitConfig,
                   description="Class-IL: disjoint class groups, no task id, one head over all seen classes")
def class_incremental(cfg: ClassSplitConfig, seed: int, cache_dir: str | None = None) -> Stream:
    return build_class_split(cfg, seed, protocol="class", cache_dir=cache_dir)


@dataclass
class TaskSplitConfig(ClassSplitConfig):
    name: str = "task_incremental"


@register_scenario("task_incremental", config=TaskSplitConfig,
                   description="Task-IL: the class-IL split with the task id given (masked per-task head)")
def task_incremental(cfg: TaskSplitConfig, seed: int, cache_dir: str | None = None) -> Stream:
    return build_class_split(cfg, seed, protocol="task", cache_dir=cache_dir)


def resolve_class_order(n_available: int, cfg: ClassSplitConfig, seed: int) -> torch.Tensor:
    """The original labels used, in stream order (seeded permutation unless given)."""
    if cfg.class_order is not None:
        order = torch.tensor(list(cfg.class_order), dtype=torch.int64)
        bad = [c for c in order.tolist() if not 0 <= c < n_available]
        if bad or order.unique().numel() != order.numel():
            raise ClbenchError(f"class_order must list distinct labels in [0, {n_available}); bad or repeated: {bad or order.tolist()}")
        return order
    pool = torch.arange(n_available) if cfg.classes is None else torch.tensor(sorted(set(cfg.classes)), dtype=torch.int64)
    if pool.numel() and (pool.min() < 0 or pool.max() >= n_available):
        raise ClbenchError(f"scenario.classes must be labels in [0, {n_available}), got {cfg.classes}")
    if not cfg.shuffle_classes:
        return pool
    return pool[torch.randperm(pool.numel(), generator=seeded_generator(seed, 1))]


def build_class_split(cfg: ClassSplitConfig, seed: int, protocol: str, cache_dir: str | None = None) -> Stream:
    """Cut a dataset's classes into experiences (see the module docstring)."""
    dataset = load_dataset(cfg.dataset, cfg.data_root, cache_dir)
    order = resolve_class_order(dataset.num_classes, cfg, seed)
    try:
        sizes = split_sizes(order.numel(), cfg.n_tasks, cfg.initial_classes, cfg.allow_uneven)
    except ValueError as err:
        raise ClbenchError(f"scenario {cfg.name} on {cfg.dataset}: {err}") from None
    train, test = remap_labels(dataset, order)
    bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
    experiences = []
    for t in range(len(sizes)):
        classes = torch.arange(bounds[t], bounds[t + 1])
        experiences.append(Experience(
            index=t, task_id=t, classes=classes,
            train_idx=indices_by_class(train.y, classes), test_idx=indices_by_class(test.y, classes),
        ))
    return Stream(
        name=cfg.name, protocol=protocol, train=train, test=test, experiences=tuple(experiences),
        num_classes=order.numel(), class_order=tuple(order.tolist()),
        class_names=tuple(dataset.class_names[c] for c in order.tolist()),
        mean=dataset.mean, std=dataset.std, info={"dataset": dataset.name, "classes_per_task": sizes},
    )
