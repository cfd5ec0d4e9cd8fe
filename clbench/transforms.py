"""Batched input pipeline on the device: uint8 images -> normalised float model inputs.

Augmentations run on whole batches with tensor ops (no per-sample Python), using the global
torch RNG of the batch's device (saved in checkpoints, so resumed runs are identical).
"""

from __future__ import annotations

import math

import torch

AUGMENTATIONS = ("none", "flip", "crop_flip", "resized_crop_flip")


class Preprocess:
    """``(x / 255 - mean) / std``, with optional training augmentation, then a bilinear resize to
    ``size`` when the model needs another input size than the data's (augmentation happens at the
    data's resolution, e.g. 4-px crops of a 32-px CIFAR image fed to a 64-px ViT).

    ``crop_flip``: random crop of the original size from the image zero-padded by ``pad``
    pixels (black padding, as torchvision's ``RandomCrop(padding=4)``), then a horizontal flip
    with probability 1/2.  ``resized_crop_flip``: torchvision's ``RandomResizedCrop(size)``
    (area 8-100 %, aspect 3/4-4/3; :func:`random_resized_crop`) straight to the model's input size
    (the data's when ``size`` is None), then the flip -- FeTrIL's released initial-model recipe.

    ``crop < 1`` (evaluation only): resize to ``size / crop`` then take the central ``size``, as
    torchvision's ``Resize(256) + CenterCrop(224)`` for ``crop=0.875`` (:func:`resize_center_crop`).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], augment: str = "none", pad: int = 4,
                 size: tuple[int, int] | None = None, crop: float = 1.0):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation '{augment}'; valid: {', '.join(AUGMENTATIONS)}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment
        self.pad = pad
        self.size = tuple(size) if size is not None else None  # resize to the model's input size (bilinear)
        self.crop = float(crop)  # evaluation: central fraction kept after resizing to size / crop
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
        if train and self.augment == "resized_crop_flip":
            out = random_resized_crop(out, self.size or tuple(out.shape[-2:]))
        if train and self.augment in ("flip", "crop_flip", "resized_crop_flip"):
            out = random_flip(out)
        out = out.sub_(mean).div_(std)
        if not train and self.crop < 1.0:
            out = resize_center_crop(out, self.size or tuple(out.shape[-2:]), self.crop)
        elif self.size is not None and tuple(out.shape[-2:]) != self.size:
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


def crop_boxes(b: int, h: int, w: int, device: torch.device, scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for ``b`` images at once: ``[b, 4]`` boxes
    ``(top, left, height, width)`` in pixels.  Each image takes the first of ``attempts`` draws
    (area ~ U(scale) x h w, log aspect ~ U(log ratio)) that fits; none fitting: the central crop
    with the aspect clamped to ``ratio`` (the whole image when its aspect is within it)."""
    area = h * w * torch.empty(b, attempts, device=device).uniform_(*scale)
    aspect = torch.exp(torch.empty(b, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    cw = torch.sqrt(area * aspect).round()
    ch = torch.sqrt(area / aspect).round()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((b,), -1, device=device))
    pick = first.clamp(min=0).unsqueeze(1)
    cw, ch = cw.gather(1, pick).squeeze(1), ch.gather(1, pick).squeeze(1)
    top = torch.floor(torch.rand(b, device=device) * (h - ch + 1))
    left = torch.floor(torch.rand(b, device=device) * (w - cw + 1))
    in_ratio = w / h  # fallback, as torchvision
    if in_ratio < ratio[0]:
        fw, fh = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = h, int(round(h * ratio[1]))
    else:
        fw, fh = w, h
    none = first < 0
    ch, cw = torch.where(none, float(fh), ch), torch.where(none, float(fw), cw)
    top = torch.where(none, float((h - fh) // 2), top)
    left = torch.where(none, float((w - fw) // 2), left)
    return torch.stack([top, left, ch, cw], 1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each image's box ``(top, left, height, width)`` resized to ``size`` by bilinear sampling with
    half-pixel centres (``F.interpolate(..., align_corners=False)`` of the crop; at the box's border
    the neighbours outside it are sampled where the crop would clamp)."""
    b, _, h, w = x.shape
    top, left, ch, cw = boxes.to(x.dtype).unbind(1)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = cw / w
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = torch.nn.functional.affine_grid(theta, [b, x.shape[1], *size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop(size)`` (default scale and ratio, bilinear) on a batch."""
    return crop_resize(x, crop_boxes(x.shape[0], x.shape[2], x.shape[3], x.device), tuple(size))


def resize_center_crop(x: torch.Tensor, size: tuple[int, int], crop: float) -> torch.Tensor:
    """``Resize(size / crop)`` (bilinear) then ``CenterCrop(size)``, e.g. 256 then 224 for ``crop=0.875``."""
    big = (int(round(size[0] / crop)), int(round(size[1] / crop)))
    out = torch.nn.functional.interpolate(x, size=big, mode="bilinear", align_corners=False)
    top, left = int(round((big[0] - size[0]) / 2.0)), int(round((big[1] - size[1]) / 2.0))
    return out[:, :, top:top + size[0], left:left + size[1]]
