"""The stream contract shared by every scenario: a :class:`Stream` of :class:`Experience` s.

An experience is pure data: which training/test samples it holds (index tensors into the
stream's splits), which classes, its task id, and an optional input transform (a pixel
permutation or a rotation for domain-incremental streams).  Scenarios build streams with
tensor ops from a dataset and a seed; they know nothing of models or strategies.

Labels are remapped by the class order, so the classes of a class-incremental stream arrive
as 0, 1, 2, ... and ``stream.class_order[j]`` is the dataset's original label of class j.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Literal, Protocol

import torch

from clbench.data.types import ImageDataset, ImageSplit

Protocol_ = Literal["class", "task", "domain", "tta"]


class InputTransform(Protocol):
    """A deterministic, batched input transform on uint8 ``[B, C, H, W]`` images."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class PixelPermutation:
    """Permuted-pixels domain (Goodfellow et al. 2013): the same permutation of the H*W pixel
    positions applied to every channel."""

    perm: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, c, h * w)[:, :, self.perm.to(x.device)].reshape(b, c, h, w)

    def __repr__(self) -> str:
        return f"PixelPermutation(n={self.perm.numel()})"


@dataclass(frozen=True)
class Rotation:
    """Rotated-images domain: every image rotated by ``degrees`` (bilinear, zero fill)."""

    degrees: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.degrees % 360 == 0:
            return x
        from torchvision.transforms.functional import InterpolationMode, rotate

        return rotate(x, self.degrees, interpolation=InterpolationMode.BILINEAR)


@dataclass(frozen=True)
class Experience:
    """One step of a stream.

    Attributes:
        index: position in the stream (0-based).
        task_id: the task label (given to the model at test time only in task-IL).
        classes: int64 ids of the (remapped) classes present in this experience.
        train_idx: int64 indices into ``stream.train`` (each training sample belongs to one experience).
        test_idx: int64 indices into ``stream.test``: this task's test data.
        transform: the domain's input transform, applied to raw uint8 images, or None.
    """

    index: int
    task_id: int
    classes: torch.Tensor
    train_idx: torch.Tensor
    test_idx: torch.Tensor
    transform: InputTransform | None = None

    def eval_subset(self, size: int, seed: int) -> torch.Tensor:
        """A fixed, seeded subset of ``test_idx`` of at most ``size`` samples (all if size <= 0)."""
        if size <= 0 or size >= self.test_idx.numel():
            return self.test_idx
        g = torch.Generator().manual_seed(_mix(seed, 7919, self.index))
        return self.test_idx[torch.randperm(self.test_idx.numel(), generator=g)[:size]].sort().values

    def __repr__(self) -> str:
        cls = self.classes.tolist()
        shown = cls if len(cls) <= 12 else cls[:10] + ["..."]
        extra = f", transform={self.transform!r}" if self.transform is not None else ""
        return (
            f"Experience({self.index}, task={self.task_id}, classes={shown}, "
            f"train={self.train_idx.numel()}, test={self.test_idx.numel()}{extra})"
        )


@dataclass(frozen=True)
class Stream:
    """A sequence of experiences over one pair of (label-remapped) train/test splits.

    ``protocol`` says what the model is told and predicts over (van de Ven et al. 2022):
    ``class``: no task id, one head over all classes seen so far; ``task``: the task id is
    given and predictions are restricted to that task's classes; ``domain``: no task id, the
    same label space in every experience; ``tta``: test-time adaptation, a sequence of
    unlabelled test domains over one label space (no training data; the engine streams each
    domain's test set once through ``predict``).
    """

    name: str
    protocol: Protocol_
    train: ImageSplit
    test: ImageSplit
    experiences: tuple[Experience, ...]
    num_classes: int
    class_order: tuple[int, ...]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.experiences)

    def __iter__(self) -> Iterator[Experience]:
        return iter(self.experiences)

    def __getitem__(self, k: int) -> Experience:
        return self.experiences[k]

    @property
    def n_tasks(self) -> int:
        return 1 + max(e.task_id for e in self.experiences)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)

    def class_mask(self, after_experience: int) -> torch.Tensor:
        """Which logits a sample of each task may use once experiences ``0..after_experience``
        have been trained: bool ``[n_tasks, num_classes]``; row t is for samples of task t.

        class-IL: every row = all classes seen so far; task-IL: row t = task t's classes;
        domain-IL: all classes.
        """
        mask = torch.zeros(self.n_tasks, self.num_classes, dtype=torch.bool)
        if self.protocol in ("domain", "tta"):
            mask[:] = True
        elif self.protocol == "task":
            for e in self.experiences:
                mask[e.task_id, e.classes] = True
        else:
            for e in self.experiences[: after_experience + 1]:
                mask[:, e.classes] = True
        return mask

    def to(self, device: torch.device | str) -> "Stream":
        """The same stream with its image and label tensors on ``device``."""
        move = lambda s: ImageSplit(s.x.to(device), s.y.to(device))  # noqa: E731
        return replace(self, train=move(self.train), test=move(self.test))

    def describe(self) -> str:
        lines = [f"Stream {self.name!r} ({self.protocol}-incremental, {len(self)} experiences, {self.num_classes} classes)"]
        lines += [f"  {e!r}" for e in self.experiences]
        return "\n".join(lines)


def _mix(*ints: int) -> int:
    """A deterministic 63-bit seed from a few integers (for per-experience generators)."""
    h = 1469598103934665603
    for i in ints:
        h = ((h ^ (int(i) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


def seeded_generator(*ints: int) -> torch.Generator:
    """A CPU generator seeded from ``ints`` (e.g. run seed, experience, epoch)."""
    return torch.Generator().manual_seed(_mix(*ints))


def split_sizes(n_classes: int, n_tasks: int, initial: int = 0, allow_uneven: bool = False) -> list[int]:
    """Classes per experience: ``initial`` classes first (if > 0), the rest in equal steps.

    Raises ValueError for an impossible split (more tasks than classes, or classes that do not
    divide evenly unless ``allow_uneven``, in which case the first steps get one more class).
    """
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
    if initial < 0 or initial > n_classes:
        raise ValueError(f"initial_classes={initial} must be in [0, {n_classes}]")
    rest_tasks = n_tasks - (1 if initial else 0)
    rest = n_classes - initial
    valid = [d + (1 if initial else 0) for d in range(1, rest + 1) if rest % d == 0] or [1]
    if initial and rest_tasks == 0:
        if rest:
            raise ValueError(f"initial_classes={initial} with n_tasks=1 leaves {rest} classes unused; choose n_tasks among {valid}")
        return [initial]
    if rest_tasks > rest:
        raise ValueError(f"cannot split {rest} classes into {rest_tasks} tasks: each task needs at least one class; "
                         f"choose n_tasks among {valid}")
    if rest % rest_tasks and not allow_uneven:
        raise ValueError(
            f"{rest} classes do not split evenly into {rest_tasks} tasks "
            f"({rest / rest_tasks:.2f} per task); choose n_tasks among {valid} or set allow_uneven=true"
        )
    base, extra = divmod(rest, rest_tasks)
    steps = [base + (1 if t < extra else 0) for t in range(rest_tasks)]
    return ([initial] if initial else []) + steps


def indices_by_class(y: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Indices of the samples whose label is in ``classes``, in dataset order (vectorised)."""
    return torch.isin(y, classes).nonzero().flatten()


def remap_labels(dataset: ImageDataset, class_order: torch.Tensor) -> tuple[ImageSplit, ImageSplit]:
    """Train/test splits restricted to ``class_order`` with labels remapped to their position in it."""
    lookup = torch.full((dataset.num_classes,), -1, dtype=torch.int64)
    lookup[class_order] = torch.arange(class_order.numel())

    def remap(split: ImageSplit) -> ImageSplit:
        keep = lookup[split.y] >= 0
        if bool(keep.all()):
            return ImageSplit(split.x, lookup[split.y])
        return ImageSplit(split.x[keep], lookup[split.y[keep]])

    return remap(dataset.train), remap(dataset.test)
