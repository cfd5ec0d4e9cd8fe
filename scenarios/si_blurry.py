"""Si-Blurry: the stochastic-incremental blurry task boundary of Moon et al., ICCV 2023,
"Online Class Incremental Learning on Stochastic Blurry Task Boundary via Mask and Visual
Prompt Tuning" (MVP), Sec. 3; reference code ``KHU-AGI/Si-Blurry`` @61bd5eb,
``utils/online_sampler.py::OnlineSampler``.

Given the classes, T tasks, N (% disjoint classes) and M (% blurry samples):

1. ``n_D = floor(|C| N / 100)`` rounded down to a multiple of T; ``n_B = |C| - n_D`` rounded
   down to a multiple of T (left-over classes are dropped from the stream).
2. A seeded random class order; the first n_D classes are *disjoint* (seen in one task only),
   the next n_B *blurry*.
3. ``variant: stochastic`` (Si-Blurry): each list is cut at T-1 sorted uniform integer cut
   points in ``[0, n)``, so every task gets a random number of classes (possibly none).
   ``variant: fixed`` (i-Blurry-like): n_D / T and n_B / T classes per task.
4. Every training sample goes to the task owning its class.
5. Blurring. stochastic: ``K = floor(#blurry-class samples * M / 100)`` is cut at T-1 sorted
   uniform cut points in ``[0, K)`` into k_1..k_T; task j puts k_j of its blurry samples into
   a pool, the pool is shuffled and handed back, k_j to task j.  A task owning fewer than
   k_j blurry samples gives all it has and the pool is topped up to K with random blurry
   samples of the other tasks (``exact_pool``), so exactly M% of the blurry samples move.
   fixed: each task pools ``floor(M%)`` of its blurry samples and the pool is dealt out in
   equal shares.  Blurry classes thus leak into other tasks; task sizes vary (step 3).
6. Each task's samples are shuffled; that is the stream order, consumed once by the online
   protocol (``train.online``, :mod:`clbench.engine`).

Everything is built with tensor ops from one seeded generator (plus the class order of
:func:`clbench.scenarios.class_incremental.resolve_class_order`): same seed, same stream.

Labels are remapped in order of *first appearance in the stream*, so the classes exposed at
any point form a prefix ``0..n_exposed-1``.  Experience j's ``classes`` are all labels in its
training data (its own and leaked blurry ones); its ``test_idx`` are the test images of the
classes first exposed during task j (may be empty), so experiences ``0..j`` together hold the
test images of every class exposed by the end of task j (A_last's test set).

Parity notes (the released code vs. this generator; we follow the paper):

* ``methods/_trainer.py`` calls ``OnlineSampler(ds, n_tasks, m, n, seed, rnd_NM,
  selection_size)`` positionally, so ``rnd_NM`` lands in ``cur_iter`` and ``selection_size``
  (=1) in ``varing_NM``: the released code *always* takes the stochastic branch, whatever
  ``--rnd_NM`` says.  Here ``variant`` picks the branch explicitly (default ``stochastic``,
  which matches both the paper's Si-Blurry and what the code runs).
* The code pools the *first* k_j blurry samples of task j in dataset order (a random subset
  on torchvision's CIFAR, whose order is random; one class on a class-sorted folder).  We
  pool a seeded random subset, so the stream does not depend on the files' order.
* When task j owns fewer than k_j blurry samples (frequent with few blurry classes per
  task, since a task may own none) the code pools only what it has and the last tasks of
  the hand-back receive fewer: fewer than M% move (e.g. 5% instead of 10% on digits).  We
  top the pool up to K (the paper's M%); ``exact_pool: false`` reproduces the code.
* Fixed variant: the code drops the ``len(pool) % T`` samples left after equal sharing; we
  give them one each to the first tasks, so every training sample is used exactly once.
* ``sampler: clbench`` (default) makes its own draws (a class order from
  :func:`~clbench.scenarios.class_incremental.resolve_class_order`, then a generator of its own),
  so its streams equal the code's statistically, not bitwise.  It stays the default because it
  differs in more than the order: the pooled samples are a random subset (not the files' first
  ones) and exactly M% move.

Parity mode ``sampler: official`` (:func:`assign_blurry_official`): the released sampler's
draws replayed one for one -- ``torch.Generator().manual_seed(seed)``, ``randperm`` of the
classes, the ``randint`` cut points, the first-k_j clipped pool, its ``randperm``, one
``randperm`` per task -- so, given the same training-set order and seed, the per-task classes
and every task's sample order are the code's exactly (``exact_pool`` does not apply;
``class_order`` / ``shuffle_classes: false`` are refused).  ``variant: fixed`` then replays the
code's fixed branch too (which drops the ``len(pool) % T`` left-over pooled samples).  Checked
against the official ``OnlineSampler`` run inside the released ``_Trainer`` loop by
``tests/test_reference_si_blurry.py`` (golden from ``tools/reference/si_blurry.py``), together
with the A_auc trigger points of ``eval.online_points: official``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from clbench.data import load_dataset
from clbench.registry import ClbenchError, register_scenario
from clbench.scenarios.base import (
    Experience,
    Stream,
    indices_by_class,
    remap_labels,
    seeded_generator,
)
from clbench.scenarios.class_incremental import resolve_class_order
from clbench.validation import bounded, choice, path

VARIANTS = ("stochastic", "fixed")


@dataclass
class SiBlurryConfig:
    name: str = "si_blurry"
    dataset: str = "digits"
    data_root: Optional[str] = path(None)  # folder of the dataset's files (see `clbench list`)
    n_tasks: int = bounded(5, ge=1)  # T (paper: 5)
    disjoint_percent: float = bounded(50.0, ge=0, le=100)  # N: % of classes that are disjoint (paper: 50)
    blurry_percent: float = bounded(10.0, ge=0, le=100)  # M: % of blurry-class samples shuffled across tasks (paper: 10)
    variant: str = choice("stochastic", "stochastic", "fixed")  # stochastic (Si-Blurry: random classes/blur per task) | fixed (i-Blurry-like)
    classes: Optional[List[int]] = bounded(None, ge=0)  # restrict to these original labels
    class_order: Optional[List[int]] = bounded(None, ge=0)  # explicit class permutation (overrides the seeded one)
    shuffle_classes: bool = True  # seeded random class permutation; false = sorted labels
    exact_pool: bool = True  # pool exactly M% of blurry samples (paper); false: the released code's clipped pool
    sampler: str = choice("clbench", "clbench", "official")  # clbench (seeded random pool, exact M%) | official (the released OnlineSampler's draws, bit for bit)


@dataclass(frozen=True)
class BlurryAssignment:
    """The generator's output on labels ``y`` (positions in the class permutation).

    Attributes:
        order: int64 sample indices into ``y`` in stream order (tasks one after another).
        task: int64 task of each entry of ``order``.
        class_task: int64 owning task of each class (-1: dropped).
        disjoint: bool per class, whether it is a disjoint class.
        n_pooled: number of blurry samples that went through the pool.
        n_blurry_samples: number of samples of blurry classes.
    """

    order: torch.Tensor
    task: torch.Tensor
    class_task: torch.Tensor
    disjoint: torch.Tensor
    n_pooled: int
    n_blurry_samples: int


def class_counts(n_classes: int, n_tasks: int, disjoint_percent: float) -> tuple[int, int]:
    """(n_D, n_B): disjoint and blurry classes, each a multiple of ``n_tasks`` (step 1)."""
    n_d = int(n_classes * disjoint_percent // 100)
    n_d = n_d // n_tasks * n_tasks
    n_b = (n_classes - n_d) // n_tasks * n_tasks
    return n_d, n_b


def class_owners(y: torch.Tensor, n_d: int, n_b: int, n_tasks: int, variant: str,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The task owning each class (-1: dropped) and which classes are disjoint: positions
    0..n_d-1 are the disjoint classes, n_d..n_d+n_b-1 the blurry ones; ``stochastic`` cuts both
    ranges at random points (disjoint first, then blurry: the draws' order), ``fixed`` evenly."""
    n_classes = max(int(y.max()) + 1 if y.numel() else 0, n_d + n_b)
    class_task = torch.full((n_classes,), -1, dtype=torch.int64)
    if variant == "stochastic":
        d_bounds, b_bounds = _random_cuts(n_d, n_tasks, g), _random_cuts(n_b, n_tasks, g)
    else:
        d_bounds = torch.arange(n_tasks + 1) * (n_d // n_tasks)
        b_bounds = torch.arange(n_tasks + 1) * (n_b // n_tasks)
    class_task[:n_d] = _owner(torch.arange(n_d), d_bounds)
    class_task[n_d:n_d + n_b] = _owner(torch.arange(n_b), b_bounds)
    return class_task, torch.arange(n_classes) < n_d


def _random_cuts(n: int, n_tasks: int, g: torch.Generator) -> torch.Tensor:
    """Bounds ``[0, c_1, ..., c_{T-1}, n]`` with T-1 sorted uniform cut points in ``[0, n)``."""
    if n <= 0:
        return torch.zeros(n_tasks + 1, dtype=torch.int64)
    cuts = torch.randint(0, n, (n_tasks - 1,), generator=g).sort().values
    return torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([n])])


def _owner(positions: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Task j of each position p with ``bounds[j] <= p < bounds[j+1]``."""
    return torch.searchsorted(bounds[1:-1], positions, right=True)


def assign_blurry(y: torch.Tensor, n_disjoint: int, n_blurry_classes: int, n_tasks: int, blurry_percent: float,
                  variant: str, g: torch.Generator, exact_pool: bool = True) -> BlurryAssignment:
    """Steps 3-6 on labels ``y``: label c is the c-th class of the (already random) class
    order, so ``0..n_disjoint-1`` are disjoint classes, the next ``n_blurry_classes`` blurry
    and any higher label is dropped.  Tensor ops only; every draw comes from ``g``.

    ``exact_pool`` (stochastic variant): when task j owns fewer blurry samples than its k_j,
    top the pool up with random blurry samples of other tasks so that exactly K samples move
    (the paper's M%); false pools only what each task has, as the released code does."""
    if variant not in VARIANTS:
        raise ClbenchError(f"scenario.variant must be one of {', '.join(VARIANTS)}, got '{variant}'")
    if not 0 <= blurry_percent <= 100:
        raise ClbenchError(f"scenario.blurry_percent must be in [0, 100], got {blurry_percent}")
    # Step 3: owning task of each class (positions 0..n_d-1 disjoint, n_d..n_d+n_b-1 blurry).
    class_task, disjoint = class_owners(y, n_disjoint, n_blurry_classes, n_tasks, variant, g)
    # Step 4: every sample of a kept class goes to its class's task.
    sample_task = class_task[y]
    kept = (sample_task >= 0).nonzero().flatten()
    task = sample_task[kept]
    blurry = ~disjoint[y[kept]]
    n_blurry = int(blurry.sum())
    # Step 5: per-task pool sizes k_j (wanted) and what each task can give.
    blurry_per_task = torch.bincount(task[blurry], minlength=n_tasks)
    if variant == "stochastic":
        total = int(n_blurry * blurry_percent // 100)
        k = _random_cuts(total, n_tasks, g).diff() if total > 0 else torch.zeros(n_tasks, dtype=torch.int64)
        give = torch.minimum(k, blurry_per_task)
    else:
        give = (blurry_per_task.double() * blurry_percent / 100).floor().long()
    # Which blurry samples each task gives: a random subset (random key, ranked within task).
    key = torch.rand(kept.numel(), generator=g)
    key = torch.where(blurry, key, torch.full_like(key, 2.0))  # disjoint samples never pooled
    by_task_key = torch.argsort(task.double() * 4 + key.double())
    rank = torch.empty_like(by_task_key)
    starts = torch.bincount(task, minlength=n_tasks).cumsum(0) - torch.bincount(task, minlength=n_tasks)
    rank[by_task_key] = torch.arange(kept.numel()) - starts[task[by_task_key]]
    pooled = blurry & (rank < give[task])
    if variant == "stochastic" and exact_pool:  # top the pool up to K from other tasks' blurry samples
        deficit = total - int(pooled.sum())
        if deficit > 0:
            spare = torch.where(blurry & ~pooled, key, torch.full_like(key, 3.0))
            pooled[torch.topk(spare, deficit, largest=False).indices] = True
    n_pooled = int(pooled.sum())
    # Shuffle the pool and hand it back: pool position p goes to task owner(p).
    pool = pooled.nonzero().flatten()
    pool = pool[torch.randperm(pool.numel(), generator=g)]
    if variant == "stochastic":
        receive_bounds = torch.cat([torch.zeros(1, dtype=torch.int64), k.cumsum(0)]).clamp(max=n_pooled)
    else:
        share, extra = divmod(n_pooled, n_tasks)
        sizes = torch.full((n_tasks,), share, dtype=torch.int64) + (torch.arange(n_tasks) < extra).long()
        receive_bounds = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    receive_bounds[-1] = n_pooled
    task = task.clone()
    task[pool] = _owner(torch.arange(n_pooled), receive_bounds)
    # Step 6: shuffle within each task; tasks in order.
    within = torch.rand(kept.numel(), generator=g, dtype=torch.float64)
    stream = torch.argsort(task.double() * 2 + within)
    return BlurryAssignment(order=kept[stream], task=task[stream], class_task=class_task, disjoint=disjoint,
                            n_pooled=n_pooled, n_blurry_samples=n_blurry)


def official_class_order(n_available: int, cfg: SiBlurryConfig, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """``sampler: official``: the class order and the generator as the released ``OnlineSampler``
    draws them: one ``torch.Generator().manual_seed(seed)`` whose first draw is
    ``torch.randperm(n_classes)`` (over ``scenario.classes``, sorted, when given)."""
    if cfg.class_order is not None or not cfg.shuffle_classes:
        raise ClbenchError("scenario.sampler=official draws the class order from the run seed as the released "
                           "OnlineSampler does; drop scenario.class_order / scenario.shuffle_classes=false")
    pool = torch.arange(n_available) if cfg.classes is None else torch.tensor(sorted(set(cfg.classes)), dtype=torch.int64)
    if pool.numel() and (pool.min() < 0 or pool.max() >= n_available):
        raise ClbenchError(f"scenario.classes must be labels in [0, {n_available}), got {cfg.classes}")
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(pool.numel(), generator=g)], g


def assign_blurry_official(y: torch.Tensor, n_disjoint: int, n_blurry_classes: int, n_tasks: int,
                           blurry_percent: float, variant: str, g: torch.Generator) -> BlurryAssignment:
    """Steps 3-6 with the released sampler's draws (``sampler: official``; ``utils/online_sampler.py``
    ``OnlineSampler`` @61bd5eb, written anew): ``y`` as in :func:`assign_blurry`, ``g`` the generator
    that already drew the class order (:func:`official_class_order`).  Draw for draw:

    * stochastic (``varing_NM``, what the released trainer always runs): ``randint`` cut points of
      the disjoint classes (if any), of the blurry classes (if any), of the pool size
      ``K = floor(#blurry samples * M / 100)`` (if K > 0), then ``randperm`` of the pool (if K > 0);
    * fixed: each task pools the first ``floor(M% of its blurry samples)``, ``randperm`` of the
      pool, ``len(pool) // T`` back to each task (the remainder is dropped, as there);
    * then one ``randperm`` per task of [its disjoint samples, its remaining blurry samples, what
      it received] -- the task's stream order.

    Task j pools its *first* k_j blurry samples in dataset order and only as many as it has
    (the code's clipped pool): the stream depends on the order of the training set's files."""
    if variant not in VARIANTS:
        raise ClbenchError(f"scenario.variant must be one of {', '.join(VARIANTS)}, got '{variant}'")
    class_task, disjoint = class_owners(y, n_disjoint, n_blurry_classes, n_tasks, variant, g)
    sample_task = class_task[y]
    is_blurry = ~disjoint[y] & (sample_task >= 0)
    own = [torch.nonzero((sample_task == t) & ~is_blurry).flatten() for t in range(n_tasks)]  # dataset order
    blurry = [torch.nonzero((sample_task == t) & is_blurry).flatten() for t in range(n_tasks)]
    n_blurry = int(is_blurry.sum())
    if variant == "stochastic":
        total = int(n_blurry * blurry_percent // 100)
        k = _random_cuts(total, n_tasks, g).diff().tolist() if total > 0 else None
    else:
        k = [int(b.numel() * blurry_percent // 100) for b in blurry]
    pool = torch.zeros(0, dtype=torch.int64)
    if k is not None:
        pool = torch.cat([b[:kj] for b, kj in zip(blurry, k)])
        blurry = [b[kj:] for b, kj in zip(blurry, k)]
        pool = pool[torch.randperm(pool.numel(), generator=g)]
        share = k if variant == "stochastic" else [pool.numel() // n_tasks] * n_tasks
        start = 0
        for t in range(n_tasks):
            blurry[t] = torch.cat([blurry[t], pool[start:start + share[t]]])
            start += share[t]
    order, task = [], []
    for t in range(n_tasks):
        idx = torch.cat([own[t], blurry[t]])
        order.append(idx[torch.randperm(idx.numel(), generator=g)])
        task.append(torch.full((idx.numel(),), t, dtype=torch.int64))
    return BlurryAssignment(order=torch.cat(order), task=torch.cat(task), class_task=class_task, disjoint=disjoint,
                            n_pooled=int(pool.numel()), n_blurry_samples=n_blurry)


def first_appearance_order(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Classes sorted by their first position in ``labels`` (absent classes last, by id)."""
    first = torch.full((n_classes,), labels.numel(), dtype=torch.int64)
    first.scatter_reduce_(0, labels, torch.arange(labels.numel()), reduce="amin")
    return torch.argsort(first * n_classes + torch.arange(n_classes))


@register_scenario("si_blurry", config=SiBlurryConfig,
                   description="Si-Blurry (Moon et al. 2023): random classes per task, disjoint + blurry classes; "
                               "use with train.online=true")
def si_blurry(cfg: SiBlurryConfig, seed: int, cache_dir: str | None = None) -> Stream:
    """Build the Si-Blurry stream (see the module docstring)."""
    dataset = load_dataset(cfg.dataset, cfg.data_root, cache_dir)
    where = f"scenario si_blurry on {cfg.dataset}"
    if cfg.sampler not in ("clbench", "official"):
        raise ClbenchError(f"{where}: sampler must be 'clbench' or 'official', got '{cfg.sampler}'")
    official = cfg.sampler == "official"
    if official:
        perm, g = official_class_order(dataset.num_classes, cfg, seed)
    else:
        perm, g = resolve_class_order(dataset.num_classes, cfg, seed), seeded_generator(seed, 17)  # type: ignore[arg-type]
    if cfg.n_tasks < 1:
        raise ClbenchError(f"{where}: n_tasks must be >= 1, got {cfg.n_tasks}")
    if not 0 <= cfg.disjoint_percent <= 100:
        raise ClbenchError(f"{where}: disjoint_percent must be in [0, 100], got {cfg.disjoint_percent}")
    n_d, n_b = class_counts(perm.numel(), cfg.n_tasks, cfg.disjoint_percent)
    if n_d + n_b == 0:
        raise ClbenchError(f"{where}: {perm.numel()} classes leave no class for {cfg.n_tasks} tasks (disjoint and "
                           f"blurry classes are each rounded down to a multiple of n_tasks); lower n_tasks")
    kept = perm[:n_d + n_b]  # step 1: left-over classes are dropped
    train, _ = remap_labels(dataset, kept)  # label c = kept[c]: 0..n_d-1 disjoint, then blurry
    try:
        if official:
            a = assign_blurry_official(train.y.cpu(), n_d, n_b, cfg.n_tasks, cfg.blurry_percent, cfg.variant, g)
        else:
            a = assign_blurry(train.y.cpu(), n_d, n_b, cfg.n_tasks, cfg.blurry_percent, cfg.variant, g,
                              exact_pool=cfg.exact_pool)
    except ClbenchError as err:
        raise ClbenchError(f"{where}: {err}") from None
    # Relabel in order of first appearance in the stream (sample indices are unchanged).
    expo = first_appearance_order(train.y[a.order], n_d + n_b)
    lookup = torch.empty(n_d + n_b, dtype=torch.int64)
    lookup[expo] = torch.arange(n_d + n_b)
    order = kept[expo]
    train, test = remap_labels(dataset, order)
    counts = torch.bincount(a.task, minlength=cfg.n_tasks)
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).tolist()
    y_stream = train.y[a.order]
    experiences, new_counts, first_label = [], [], 0
    for t in range(cfg.n_tasks):
        labels = y_stream[bounds[t]:bounds[t + 1]]
        end = max(first_label, int(labels.max()) + 1 if labels.numel() else 0)  # labels: first-appearance order
        new = torch.arange(first_label, end)
        experiences.append(Experience(
            index=t, task_id=t, classes=labels.unique() if labels.numel() else new,
            train_idx=a.order[bounds[t]:bounds[t + 1]].clone(), test_idx=indices_by_class(test.y, new),
        ))
        new_counts.append(end - first_label)
        first_label = end
    owned = lambda mask: [sorted(lookup[(a.class_task == t) & mask].tolist()) for t in range(cfg.n_tasks)]  # noqa: E731
    info = {
        "dataset": dataset.name, "variant": cfg.variant, "sampler": cfg.sampler,
        "n_disjoint_classes": n_d, "n_blurry_classes": n_b,
        "dropped_classes": perm[n_d + n_b:].tolist(),
        "disjoint_classes": owned(a.disjoint), "blurry_classes": owned(~a.disjoint),
        "n_pooled": a.n_pooled, "n_blurry_samples": a.n_blurry_samples,
        "blurry_fraction": a.n_pooled / max(a.n_blurry_samples, 1),
        "samples_per_task": counts.tolist(), "new_classes_per_task": new_counts,
    }
    return Stream(
        name=cfg.name, protocol="class", train=train, test=test, experiences=tuple(experiences),
        num_classes=order.numel(), class_order=tuple(order.tolist()),
        class_names=tuple(dataset.class_names[c] for c in order.tolist()),
        mean=dataset.mean, std=dataset.std, info=info,
    )
