"""The in-memory form of every dataset: uint8 NCHW image tensors and int64 labels.

Images stay uint8 until the engine or the evaluator turns a batch into normalised floats
on the device; this keeps whole datasets small enough to live on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageSplit:
    """One split of a dataset: ``x`` uint8 ``[N, C, H, W]``, ``y`` int64 ``[N]`` in ``[0, num_classes)``."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"ImageSplit.x must be uint8 [N, C, H, W], got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(f"ImageSplit.y must be int64 [{self.x.shape[0]}], got {self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image dataset with a train and a test split.

    ``mean``/``std`` are the per-channel statistics (of pixels scaled to [0, 1]) used to
    normalise inputs.
    """

    name: str
    train: ImageSplit
    test: ImageSplit
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.train.x.shape[1:] != self.test.x.shape[1:]:
            raise ValueError(
                f"{self.name}: train and test images differ in shape: "
                f"{tuple(self.train.x.shape[1:])} vs {tuple(self.test.x.shape[1:])}"
            )
        channels = self.train.x.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"{self.name}: mean/std need {channels} values, got {self.mean} / {self.std}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)

    def __repr__(self) -> str:
        return (
            f"ImageDataset({self.name!r}, train={len(self.train)}, test={len(self.test)}, "
            f"classes={self.num_classes}, image={self.image_shape})"
        )
