"""Batched input pipeline on the device: uint8 images -> normalised float model inputs.

Augmentations run on whole batches with tensor ops (no per-sample Python), using the global
torch RNG of the batch's device (saved in checkpoints, so resumed runs are identical).
"""

from __future__ import annotations

import torch

AUGMENTATIONS = ("none", "flip", "crop_flip")


class Preprocess:
    """``(x / 255 - mean) / std``, with optional training augmentation, then a bilinear resize to
    ``size`` when the model needs another input size than the data's (augmentation happens at the
    data's resolution, e.g. 4-px crops of a 32-px CIFAR image fed to a 64-px ViT).

    ``crop_flip``: random crop of the original size from the image zero-padded by ``pad``
    pixels (black padding, as torchvision's ``RandomCrop(padding=4)``), then a horizontal flip
    with probability 1/2.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], augment: str = "none", pad: int = 4,
                 size: tuple[int, int] | None = None):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation '{augment}'; valid: {', '.join(AUGMENTATIONS)}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment
        self.pad = pad
        self.size = tuple(size) if size is not None else None  # resize to the model's input size (bilinear)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._cache:
            self._cache[device] = (self.mean.to(device), self.std.to(device))
        return self._cache[device]

    def __call__(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Model inputs for uint8 images ``x`` (augmented only when ``train``)."""
        mean, std = self._stats(x.device)
        out = x.float().div_(255.0)
        if train and self.augment == "crop_flip":
            out = random_crop(out, self.pad)
        if train and self.augment in ("flip", "crop_flip"):
            out = random_flip(out)
        out = out.sub_(mean).div_(std)
        if self.size is not None and tuple(out.shape[-2:]) != self.size:
            out = torch.nn.functional.interpolate(out, size=self.size, mode="bilinear", align_corners=False)
        return out


def random_flip(x: torch.Tensor) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """A random ``H x W`` crop of each zero-padded image (one gather, no loop)."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    left = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    rows = (top.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (left.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chan, rows, cols]
