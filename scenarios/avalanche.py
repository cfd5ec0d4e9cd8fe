"""Avalanche benchmarks as clbench streams (``scenario=avalanche``).

``scenario.benchmark`` names an Avalanche benchmark factory (``avalanche.benchmarks.classic.SplitMNIST``),
a user function returning a benchmark, or a benchmark object (``pkg.module.attr`` or
``pkg.module:attr``), or a name given to :func:`register_benchmark` from Python;
``scenario.kwargs`` are passed to the factory.  From Python, :func:`stream_from_avalanche`
turns a benchmark object into a :class:`~clbench.scenarios.base.Stream` directly.

Each experience's train and test sets are materialised once, with the benchmark's **eval**
transform (train-time augmentation is clbench's ``train.augment``; a random train transform of
the benchmark is replaced, with a warning).  Avalanche's experience order, class order
(``benchmark.classes_order`` when it has one, else first appearance) and task labels are
kept.  Inside an experience the samples are listed in the order of the dataset they come from
(as clbench's own scenarios list them; Avalanche groups them by class), found by following the
benchmark's subset/concatenation indices down to the source dataset; where that cannot be traced
(a dataset type clbench does not know) Avalanche's order is kept.  So a seeded run over an
Avalanche Split MNIST sees the same batches as over clbench's ``class_incremental`` with the same
class order.  Images are stored as clbench's uint8 tensors whenever that is lossless:

* uint8 inputs are kept as they are;
* float inputs ending in a ``Normalize(mean, std)`` of ``[0, 1]`` pixels are un-normalised to
  uint8, and the stream's ``mean``/``std`` become that Normalize's, so clbench's own
  preprocessing feeds the model the same floats as Avalanche;
* float inputs in ``[0, 1]`` that are whole multiples of 1/255 (``ToTensor``) become uint8 with
  the train set's per-channel statistics as ``mean``/``std``;
* any other float input (a resize, a learned embedding, ...) is quantised to 8 bits over its
  range, with ``mean``/``std`` chosen so that the model receives the original values up to that
  quantisation (a warning gives the largest error).

The protocol is ``task`` when experiences carry different task labels, ``domain`` when every
experience has the same classes (Permuted MNIST, ``ni_benchmark``), ``class`` otherwise
(``scenario.protocol`` overrides).  A test stream with one experience (``ni_benchmark``) is
shared: each experience is tested on the test samples of its classes.  Online (sub-experience)
streams, detection benchmarks and non-tensor inputs raise :class:`ClbenchError` naming the
experience.  A stream built from an in-memory object cannot be resumed from its run directory
in another process (the object is not in ``config.yaml``).
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from clbench.data.datasets import _channel_stats
from clbench.data.types import ImageSplit
from clbench.registry import ClbenchError, register_scenario
from clbench.scenarios.base import Experience, Stream
from clbench.validation import choice, path

PROTOCOLS = ("auto", "class", "task", "domain")
_REGISTERED: dict[str, Any] = {}  # register_benchmark(name, benchmark or factory)
_RANDOM_TRANSFORMS = ("ColorJitter", "RandAugment", "AutoAugment", "TrivialAugmentWide", "AugMix", "ElasticTransform")


@dataclass
class AvalancheConfig:
    """An Avalanche benchmark, built by a factory or registered from Python."""

    name: str = "avalanche"
    benchmark: str = "avalanche.benchmarks.classic.SplitMNIST"  # dotted path, pkg.mod:attr, or a register_benchmark name
    kwargs: Dict[str, Any] = field(default_factory=dict)  # arguments of the factory (e.g. n_experiences, seed)
    dataset_root: Optional[str] = path(None)  # passed as kwargs.dataset_root (relative to the YAML's folder)
    protocol: str = choice("auto", *PROTOCOLS)  # auto: task if task labels differ, domain if classes repeat, else class
    mean: Optional[List[float]] = None  # override the per-channel input normalisation (pixels in [0, 1])
    std: Optional[List[float]] = None
    batch_size: int = 512  # samples per materialisation batch (Avalanche's DataLoader, no workers)


@register_scenario("avalanche", config=AvalancheConfig,
                   description="any Avalanche benchmark (factory path + kwargs): experiences, classes and task labels kept")
def avalanche_scenario(cfg: AvalancheConfig, seed: int, cache_dir: str | None = None) -> Stream:
    kwargs = dict(cfg.kwargs or {})
    if cfg.dataset_root is not None:
        kwargs["dataset_root"] = cfg.dataset_root
    benchmark = load_benchmark(cfg.benchmark, kwargs)
    return stream_from_avalanche(benchmark, name=cfg.benchmark.replace(":", ".").rsplit(".", 1)[-1],
                                 protocol=cfg.protocol, mean=cfg.mean, std=cfg.std, batch_size=cfg.batch_size)


def register_benchmark(name: str, benchmark: Any) -> str:
    """Make an Avalanche benchmark object (or a factory) usable as ``scenario.benchmark=<name>``
    in this process; returns ``name``."""
    _REGISTERED[name] = benchmark
    return name


def load_benchmark(spec: str, kwargs: dict[str, Any]) -> Any:
    """The benchmark named by ``spec`` (see the module docstring), built with ``kwargs`` if callable."""
    if spec in _REGISTERED:
        target = _REGISTERED[spec]
    else:
        target = _import_object(spec)
    if callable(target) and not hasattr(target, "train_stream"):
        try:
            return target(**kwargs)
        except TypeError as err:
            raise ClbenchError(f"scenario.benchmark {spec}: bad scenario.kwargs {sorted(kwargs)}: {err}") from None
    if kwargs:
        raise ClbenchError(f"scenario.benchmark {spec} is a benchmark object, not a factory: remove scenario.kwargs")
    return target


def _import_object(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        known = f" (registered here: {', '.join(sorted(_REGISTERED))})" if _REGISTERED else ""
        raise ClbenchError(f"scenario.benchmark {spec!r} is neither a dotted path like avalanche.benchmarks.classic.SplitMNIST "
                           f"nor a name given to register_benchmark in this process{known}: a benchmark registered from "
                           "Python cannot be rebuilt in another process (e.g. to resume its run)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ClbenchError(f"scenario.benchmark {spec}: cannot import {module_name} ({err})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ClbenchError(f"scenario.benchmark {spec}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- conversion


def stream_from_avalanche(benchmark: Any, name: str = "avalanche", protocol: str = "auto",
                          mean: Optional[List[float]] = None, std: Optional[List[float]] = None,
                          batch_size: int = 512) -> Stream:
    """A clbench :class:`Stream` holding the data of an Avalanche benchmark's train and test streams."""
    if protocol not in PROTOCOLS:
        raise ClbenchError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    kind = type(benchmark).__name__
    if "Detection" in kind:
        raise ClbenchError(f"Avalanche benchmark {kind} is a detection benchmark: clbench streams are image classification only")
    if not (hasattr(benchmark, "train_stream") and hasattr(benchmark, "test_stream")):
        raise ClbenchError(f"{kind} is not an Avalanche benchmark (it needs train_stream and test_stream)")
    train_exps = _experiences(benchmark.train_stream, "train")
    test_exps = _experiences(benchmark.test_stream, "test")
    if len(test_exps) not in (1, len(train_exps)):
        raise ClbenchError(f"the test stream has {len(test_exps)} experiences for {len(train_exps)} training ones: "
                           "clbench needs one test experience per training experience, or a single shared one")
    _warn_random_train_transforms(train_exps)

    train = [_materialise(e, "train", batch_size) for e in train_exps]
    test = [_materialise(e, "test", batch_size) for e in test_exps]
    shapes = {x.shape[1:] for x, _, _ in train + test}
    if len(shapes) != 1:
        raise ClbenchError(f"experiences have images of different shapes {sorted(tuple(s) for s in shapes)}: "
                           "make the eval transform resize them to one size")

    tasks = [_task_label(t, e, "train") for (_, _, t), e in zip(train, train_exps)]
    exp_classes = [sorted(set(y.tolist())) for _, y, _ in train]
    order = _class_order(benchmark, exp_classes, [y for _, y, _ in test])
    lookup = {c: j for j, c in enumerate(order)}
    if protocol == "auto":
        protocol = _auto_protocol(tasks, exp_classes)
    remap = lambda y: torch.tensor([lookup[c] for c in y.tolist()], dtype=torch.int64)  # noqa: E731

    train_x = torch.cat([x for x, _, _ in train])
    test_x = torch.cat([x for x, _, _ in test])
    x_u8, test_u8, stats = _to_uint8(train_x, test_x, _normalize_of(train_exps[0]), mean, std)
    train_y = torch.cat([remap(y) for _, y, _ in train])
    test_y = torch.cat([remap(y) for _, y, _ in test])

    experiences = []
    start, test_starts = 0, [0]
    for _, y, _ in test:
        test_starts.append(test_starts[-1] + y.numel())
    for k, (_, y, _) in enumerate(train):
        classes = torch.tensor(sorted(lookup[c] for c in exp_classes[k]), dtype=torch.int64)
        if len(test) == 1:
            test_idx = torch.isin(test_y, classes).nonzero().flatten()
        else:
            test_idx = torch.arange(test_starts[k], test_starts[k + 1])
        experiences.append(Experience(index=k, task_id=tasks[k], classes=classes,
                                      train_idx=torch.arange(start, start + y.numel()), test_idx=test_idx))
        start += y.numel()
    return Stream(
        name=name, protocol=protocol, train=ImageSplit(x_u8, train_y), test=ImageSplit(test_u8, test_y),
        experiences=tuple(experiences), num_classes=len(order), class_order=tuple(order),
        class_names=tuple(str(c) for c in order), mean=stats[0], std=stats[1],
        info={"source": "avalanche", "benchmark": type(benchmark).__name__, "input_encoding": stats[2]},
    )


def _experiences(stream: Any, split: str) -> list[Any]:
    try:
        exps = list(stream)
    except Exception as err:  # noqa: BLE001 - lazy/online streams fail in many ways
        raise ClbenchError(f"cannot list the {split} stream's experiences ({type(err).__name__}: {err}): "
                           "lazy or online streams cannot be materialised") from None
    for k, e in enumerate(exps):
        if hasattr(e, "origin_experience") or "Online" in type(e).__name__:
            raise ClbenchError(f"{split} experience {k} is an online sub-experience ({type(e).__name__}): clbench cannot "
                               "map online streams; pass the benchmark before split_online_stream and use train.online=true")
        if not hasattr(e, "dataset"):
            raise ClbenchError(f"{split} experience {k} ({type(e).__name__}) has no dataset to materialise")
    if not exps:
        raise ClbenchError(f"the benchmark's {split} stream has no experiences")
    return exps


def _materialise(exp: Any, split: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, t)`` of one experience under its eval transform, in source-dataset order (see
    :func:`source_order`)."""
    where = f"{split} experience {getattr(exp, 'current_experience', '?')}"
    dataset = exp.dataset.eval() if hasattr(exp.dataset, "eval") else exp.dataset
    order = source_order(dataset)
    order = order.tolist() if order is not None else list(range(len(dataset)))
    xs, ys, ts = [], [], []
    for i in range(0, len(dataset), batch_size):
        items = [dataset[j] for j in order[i:i + batch_size]]
        for j, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ClbenchError(f"{where}, sample {i + j}: expected (x, y[, task]), got {type(item).__name__}")
            x, y = item[0], item[1]
            if not isinstance(x, torch.Tensor):
                raise ClbenchError(f"{where}, sample {i + j}: input is a {type(x).__name__}, not a tensor; "
                                   "add ToTensor() to the benchmark's eval transform")
            if isinstance(y, dict) or (isinstance(y, torch.Tensor) and y.numel() != 1):
                raise ClbenchError(f"{where}, sample {i + j}: the target is not one class label "
                                   "(detection or multi-label data cannot be mapped)")
        xs.append(torch.stack([_as_chw(item[0]) for item in items]))
        ys.append(torch.tensor([int(item[1]) for item in items], dtype=torch.int64))
        ts.append(torch.tensor([int(item[2]) if len(item) > 2 else 0 for item in items], dtype=torch.int64))
    if not xs:
        raise ClbenchError(f"{where} is empty")
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


def source_order(dataset: Any) -> Optional[torch.Tensor]:
    """The permutation of ``dataset``'s positions that lists its samples in the order of the
    dataset(s) they come from (by source dataset in order of first use, then by position in it),
    or None when the subset/concatenation structure cannot be traced (then Avalanche's order is kept).

    Follows Avalanche's ``_flat_data`` (subset ``_indices`` over concatenated ``_datasets``),
    ``torch.utils.data.Subset`` and ``ConcatDataset`` down to the leaf datasets."""
    n = len(dataset)
    if n == 0:
        return None
    traced = _trace(dataset, torch.arange(n), {}, 0)
    if traced is None:
        return None
    leaf, pos = traced
    key = leaf * (int(pos.max()) + 1) + pos
    if key.unique().numel() != n:  # a sample used twice: no single source order
        return None
    return key.argsort()


def _trace(ds: Any, idx: torch.Tensor, leaves: dict[int, int], depth: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(leaf rank, position in that leaf)`` of the samples ``idx`` of ``ds``, or None."""
    if depth > 100:
        return None
    flat = getattr(ds, "_flat_data", None)  # an AvalancheDataset: its data is a FlatData
    if flat is not None and flat is not ds:
        return _trace(flat, idx, leaves, depth + 1)
    if isinstance(ds, torch.utils.data.Subset):
        return _trace(ds.dataset, torch.as_tensor(list(ds.indices), dtype=torch.int64)[idx], leaves, depth + 1)
    if isinstance(ds, torch.utils.data.ConcatDataset):
        subs, indices = list(ds.datasets), None
    elif hasattr(ds, "_datasets") and hasattr(ds, "_indices"):  # Avalanche's FlatData
        subs, indices = list(ds._datasets), ds._indices
    elif hasattr(ds, "_datasets") or hasattr(ds, "datasets") or hasattr(ds, "_indices") or hasattr(ds, "indices"):
        return None  # some other composite: its order cannot be traced safely
    else:  # a leaf: a torchvision or user dataset
        rank = leaves.setdefault(id(ds), len(leaves))
        return torch.full_like(idx, rank), idx
    if indices is not None:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)[idx]
    ends = torch.tensor([len(d) for d in subs], dtype=torch.int64).cumsum(0)
    if idx.numel() and int(idx.max()) >= int(ends[-1]):
        return None
    which = torch.bucketize(idx, ends, right=True)
    leaf, pos = torch.empty_like(idx), torch.empty_like(idx)
    for j in which.unique().tolist():
        sel = which == j
        inner = _trace(subs[j], idx[sel] - (int(ends[j - 1]) if j else 0), leaves, depth + 1)
        if inner is None:
            return None
        leaf[sel], pos[sel] = inner
    return leaf, pos


def _as_chw(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        return x
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 1:
        return x.view(1, 1, -1)
    raise ClbenchError(f"inputs of shape {tuple(x.shape)} are not images [C, H, W] or vectors")


def _task_label(t: torch.Tensor, exp: Any, split: str) -> int:
    labels = t.unique().tolist()
    if len(labels) != 1:
        raise ClbenchError(f"{split} experience {getattr(exp, 'current_experience', '?')} mixes task labels {labels}: "
                           "clbench needs one task label per experience")
    return int(labels[0])


def _class_order(benchmark: Any, exp_classes: list[list[int]], test_ys: list[torch.Tensor]) -> list[int]:
    """Avalanche's class order if it has one (and it covers the data), else first appearance."""
    seen = [c for classes in exp_classes for c in classes]
    first = list(dict.fromkeys(seen))
    given = getattr(benchmark, "classes_order", None)
    if given is not None:
        order = [c for c in dict.fromkeys(int(c) for c in given) if c in set(first)]
        first = order + [c for c in first if c not in set(order)]
    extra = sorted(set(torch.cat(test_ys).tolist()) - set(first))
    return first + extra  # classes only in the test stream come last


def _auto_protocol(tasks: list[int], exp_classes: list[list[int]]) -> str:
    if len(set(tasks)) > 1:
        return "task"
    if len(exp_classes) > 1 and all(c == exp_classes[0] for c in exp_classes):
        return "domain"
    return "class"


# --------------------------------------------------------------------------- transforms and encoding


def _flatten(transform: Any) -> list[Any]:
    if transform is None:
        return []
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple)):
        return [leaf for t in inner for leaf in _flatten(t)]
    return [transform]


def _transforms(dataset: Any, group: str) -> list[Any]:
    """Every transform of ``group`` in an Avalanche dataset tree (inner datasets first)."""
    found: list[Any] = []
    for inner in getattr(dataset, "_datasets", []) or []:
        found += _transforms(inner, group)
    if not hasattr(dataset, "_datasets") and getattr(dataset, "transform", None) is not None:
        found += _flatten(dataset.transform)  # a torchvision dataset's own transform
    for attr in ("_frozen_transform_groups", "_transform_groups"):
        groups = getattr(getattr(dataset, attr, None), "transform_groups", None) or {}
        found += _flatten(groups.get(group))
    return found


def _warn_random_train_transforms(exps: list[Any]) -> None:
    names = sorted({type(t).__name__ for t in _transforms(exps[0].dataset, "train")
                    if type(t).__name__.startswith("Random") or type(t).__name__ in _RANDOM_TRANSFORMS})
    if names:
        warnings.warn(f"the benchmark's train transform has random augmentation ({', '.join(names)}): clbench "
                      "materialises the eval transform once and replaces it by train.augment (none, flip, crop_flip)",
                      stacklevel=3)


def _normalize_of(exp: Any) -> Optional[tuple[list[float], list[float]]]:
    """The mean/std of the last ``Normalize`` of an experience's eval transform, if any."""
    norms = [t for t in _transforms(exp.dataset, "eval") if type(t).__name__ == "Normalize"]
    if not norms:
        return None
    return [float(m) for m in torch.as_tensor(norms[-1].mean).flatten()], [float(s) for s in torch.as_tensor(norms[-1].std).flatten()]


def _to_uint8(train: torch.Tensor, test: torch.Tensor, normalize: Optional[tuple[list[float], list[float]]],
              mean: Optional[List[float]], std: Optional[List[float]]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """uint8 images and ``(mean, std, encoding)`` such that clbench's preprocessing reproduces the inputs."""
    c = train.shape[1]

    def stats(default: tuple[tuple[float, ...], tuple[float, ...]]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        m = tuple(mean) if mean is not None else default[0]
        s = tuple(std) if std is not None else default[1]
        if len(m) != c or len(s) != c:
            raise ClbenchError(f"scenario.mean/std need {c} values (one per channel), got {m} / {s}")
        return m, s

    if train.dtype == torch.uint8 and test.dtype == torch.uint8:
        return train, test, (*stats(_channel_stats(train)), "uint8")
    train, test = train.float(), test.float()
    if normalize is not None:
        m = torch.tensor(normalize[0]).expand(c).view(1, c, 1, 1)
        s = torch.tensor(normalize[1]).expand(c).view(1, c, 1, 1)
        pixels = [(x * s + m) * 255 for x in (train, test)]
        if all(_whole_bytes(p) for p in pixels):
            u8 = [p.round().to(torch.uint8) for p in pixels]
            return u8[0], u8[1], (*stats((tuple(m.flatten().tolist()), tuple(s.flatten().tolist()))), "uint8 (un-normalised)")
    pixels = [x * 255 for x in (train, test)]
    if all(_whole_bytes(p) for p in pixels):
        u8 = [p.round().to(torch.uint8) for p in pixels]
        return u8[0], u8[1], (*stats(_channel_stats(u8[0])), "uint8 (ToTensor)")
    # anything else: 8-bit quantisation over each channel's range, undone by mean/std
    both = torch.cat([train, test]).transpose(0, 1).reshape(c, -1)
    lo, hi = both.min(1).values, both.max(1).values
    span = (hi - lo).clamp_min(1e-12)
    view = lambda v: v.view(1, c, 1, 1)  # noqa: E731
    u8 = [((x - view(lo)) / view(span) * 255).round().clamp(0, 255).to(torch.uint8) for x in (train, test)]
    error = float((span / 510).max())
    warnings.warn(f"the benchmark's eval transform gives float inputs that are not 8-bit pixels: quantised to uint8 "
                  f"over their range (largest error {error:.3g}); mean/std are set to undo the scaling", stacklevel=3)
    if mean is not None or std is not None:
        raise ClbenchError("scenario.mean/std cannot be set for float inputs that are quantised over their range")
    return u8[0], u8[1], (tuple((-lo / span).tolist()), tuple((1 / span).tolist()), "uint8 (quantised floats)")


def _whole_bytes(p: torch.Tensor) -> bool:
    return bool(((p - p.round()).abs().max() < 2e-3) and p.min() > -0.5 and p.max() < 255.5)


__all__ = ["AvalancheConfig", "load_benchmark", "register_benchmark", "source_order", "stream_from_avalanche"]
