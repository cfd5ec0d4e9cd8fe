"""The 15 CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations"), re-implemented with numpy/scipy/torch/PIL
and vectorised over a batch of 32x32 RGB images.

Parameters: the **32x32 (CIFAR) constants** of ``ImageNet-C/create_c/make_cifar_c.py`` in
``hendrycks/robustness`` (not the ImageNet-C constants used by ``imagecorruptions`` and
``corrupt-tta``), severities 1-5.  What is reproduced exactly and what only approximately:

* exact up to float rounding (same operations, same constants): ``gaussian_noise``,
  ``shot_noise``, ``impulse_noise`` (scikit-image's salt-and-pepper: each value flipped with
  probability ``amount``, half to 1 and half to 0), ``defocus_blur`` (OpenCV's anti-aliased disk
  kernel, ``filter2D`` with reflect-101 borders), ``glass_blur`` (see below), ``zoom_blur``
  (scipy ``zoom(order=1)``'s corner-aligned bilinear mapping and output sizes), ``fog`` (the
  diamond-square plasma fractal at map size 32), ``frost`` (the original frost photographs,
  downscaled exactly as ``cv2.resize(fx=0.2)`` does, random 32x32 crop of one of the first five),
  ``brightness`` (the HSV round trip with V shifted, written as the equivalent RGB rescaling),
  ``contrast``, ``elastic_transform`` (cv2 ``warpAffine`` emulated with OpenCV 3/4's fixed-point
  coordinates, rounded to 1/32 pixel, and reflect-101 border; then scipy
  ``map_coordinates(order=1, mode='reflect')``),
  ``pixelate`` and ``jpeg_compression`` (PIL, as the original).
* ``glass_blur``: the original's "swap" ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` swaps numpy
  *views*, so it copies the neighbour into (h, w) and leaves the neighbour unchanged, with
  offsets in {-1, 0} (``randint(-1, 1)``).  Because the loop runs from the bottom-right corner,
  every read sees the values from the start of the pass, so one pass is exactly a gather, which
  is what we do (CIFAR-10-C's images were made with this behaviour, so we keep it).
* **approximated**: ``motion_blur`` and ``snow`` call ImageMagick's ``MotionBlurImage`` through
  Wand in the original; we use the kernel of that C function (one-sided normalised Gaussian of
  width ``2 * radius + 1``, taps at ``ceil(i cos a - 0.5), ceil(i sin a - 0.5)``, edge pixels
  repeated), the same re-implementation as ``imagecorruptions``, with results rounded to 8 bits
  as the PNG round trip does.  Small differences from ImageMagick's output remain possible.
* The random draws (same distributions) come from a seeded ``numpy.random.Generator`` in a
  different order than the original's per-image global-state calls, so the corrupted images are
  statistically, not bitwise, those of CIFAR-10-C; they are deterministic given ``seed``.
* The original converts its float results to uint8 with ``np.uint8`` (truncation, not rounding);
  so do we.

``frost`` needs the frost photographs of the original repository; they ship inside the
``imagecorruptions`` wheel (``imagecorruptions/frost/``, Apache-2.0; only the image files are
used, its code is never imported) and ``corrupt-tta`` (``corrupt_tta/assets/frost/``), or set
``CLBENCH_FROST_DIR`` to a folder holding ``frost1.png`` ... ``frost5.jpg``.

Entry point: :func:`corrupt` (uint8 ``[N, 3, 32, 32]`` tensor in, same shape and dtype out).
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from clbench.registry import ClbenchError

#: The 15 CIFAR-10-C corruptions in the standard (CoTTA / RobustBench) order.
CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
IMAGE_SIZE = 32
FROST_ENV = "CLBENCH_FROST_DIR"
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")  # randint(5): frost6 is never used
CHUNK = 1000  # images per random stream: results do not depend on how callers batch

# ----------------------------------------------------------------------------- severity tables (make_cifar_c.py)
_GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)
_SHOT_NOISE = (500, 250, 100, 75, 50)
_IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)
_DEFOCUS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))  # disk radius, anti-alias sigma
_GLASS = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # sigma, max delta, passes
_MOTION = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))  # radius, sigma
_ZOOM = tuple(np.arange(1, top, 0.01) for top in (1.06, 1.11, 1.16, 1.21, 1.26))
_SNOW = (
    (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)  # loc, scale, zoom, threshold, blur radius, blur sigma, image weight
_FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # image weight, frost weight
_FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))  # strength, wibble decay
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
_ELASTIC = tuple((IMAGE_SIZE * a, IMAGE_SIZE * s, IMAGE_SIZE * j) for a, s, j in (
    (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)))  # alpha, sigma, affine
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
_JPEG = (80, 65, 58, 50, 40)


# ----------------------------------------------------------------------------- public API
def corrupt(images: torch.Tensor, name: str, severity: int = 5, seed: int = 0) -> torch.Tensor:
    """``images`` (uint8 ``[N, 3, 32, 32]``) with corruption ``name`` at ``severity`` (1-5).

    Deterministic given ``seed``: chunk ``i`` of :data:`CHUNK` images draws from a generator
    seeded by ``(seed, name, severity, i)``.  Returns a new uint8 tensor on the input's device.
    """
    if name not in _FUNCTIONS:
        raise ClbenchError(f"unknown corruption '{name}'; valid: {', '.join(CORRUPTIONS)}")
    if not 1 <= int(severity) <= 5:
        raise ClbenchError(f"corruption severity must be 1..5, got {severity}")
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ClbenchError(f"corruptions take uint8 [N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}] images (the CIFAR-10-C constants "
                           f"are for 32x32 RGB), got {images.dtype} {tuple(images.shape)}")
    fn = _FUNCTIONS[name]
    nhwc = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    out = np.empty_like(nhwc)
    for i, start in enumerate(range(0, len(nhwc), CHUNK)):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode()), int(severity), i])
        out[start:start + CHUNK] = _to_uint8(fn(nhwc[start:start + CHUNK], int(severity), rng))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """``np.uint8(...)`` of the original pipeline: clip, then truncate."""
    if x.dtype == np.uint8:
        return x
    return np.clip(x, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- helpers
def _gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """scikit-image's ``gaussian`` (scipy ``gaussian_filter``) over the spatial axes of ``[N, H, W(, C)]``."""
    from scipy.ndimage import gaussian_filter

    sigmas = (0, sigma, sigma) + (0,) * (x.ndim - 3)
    return gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


def _zoom_size(size: int, factor: float) -> int:
    return int(round(size * factor))  # scipy.ndimage.zoom's output size (Python's round)


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """make_cifar_c's ``clipped_zoom`` on ``[N, H, W, C]``: crop the centre ``ceil(H / factor)``,
    scipy ``zoom(order=1)`` (bilinear with corner-aligned grids), trim to ``H x W``."""
    h = x.shape[1]
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    crop = torch.from_numpy(np.ascontiguousarray(x[:, top:top + ch, top:top + ch])).permute(0, 3, 1, 2)
    size = _zoom_size(ch, factor)
    if size == ch:
        zoomed = crop
    else:
        zoomed = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=True)
    trim = (size - h) // 2
    return zoomed[:, :, trim:trim + h, trim:trim + h].permute(0, 2, 3, 1).numpy()


def _motion_blur(x: np.ndarray, radius: int, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's ``MotionBlurImage`` on ``[N, H, W, C]`` floats in [0, 255], one angle
    (degrees) per image: a one-sided Gaussian of ``2 * radius + 1`` taps along the angle,
    edge pixels repeated; rounded to 8 bits like the original's PNG round trip."""
    n, h, w, _ = x.shape
    width = 2 * int(math.ceil(radius)) + 1
    kernel = np.exp(-(np.arange(width, dtype=np.float64) ** 2) / (2.0 * sigma * sigma))
    kernel /= kernel.sum()
    rad = np.deg2rad(angles.astype(np.float64))
    rows, cols = np.arange(h), np.arange(w)
    batch = np.arange(n)[:, None, None]
    out = np.zeros(x.shape, dtype=np.float64)
    for i in range(width):
        off_x = np.ceil(i * np.cos(rad) - 0.5).astype(np.int64)  # ImageMagick: offset.x uses point.y = width*cos
        off_y = np.ceil(i * np.sin(rad) - 0.5).astype(np.int64)
        r = np.clip(rows[None, :] + off_y[:, None], 0, h - 1)[:, :, None]
        c = np.clip(cols[None, :] + off_x[:, None], 0, w - 1)[:, None, :]
        out += kernel[i] * x[batch, r, c]
    return np.clip(np.rint(out), 0, 255)


def _bilinear(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, fold: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """Bilinear samples of ``x`` ``[N, H, W, C]`` at float coordinates ``[N, H', W']``; integer
    taps outside the image are mapped inside by ``fold`` (the border mode)."""
    n, h, w, _ = x.shape
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0)[..., None], (cols - c0)[..., None]
    r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
    batch = np.arange(n).reshape(n, 1, 1)
    at = lambda r, c: x[batch, fold(r, h), fold(c, w)]  # noqa: E731
    return ((1 - fr) * (1 - fc) * at(r0, c0) + (1 - fr) * fc * at(r0, c0 + 1)
            + fr * (1 - fc) * at(r0 + 1, c0) + fr * fc * at(r0 + 1, c0 + 1))


def _reflect101(i: np.ndarray, n: int) -> np.ndarray:
    """OpenCV BORDER_REFLECT_101 / scipy 'mirror': ``d c b | a b c d | c b a``."""
    period = 2 * n - 2
    i = np.mod(i, period)
    return np.where(i >= n, period - i, i)


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """scipy 'reflect' (half-sample symmetric): ``c b a | a b c | c b a``."""
    period = 2 * n
    i = np.mod(i, period)
    return np.where(i >= n, period - 1 - i, i)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c's ``disk``: an aliased disk, normalised, then ``cv2.GaussianBlur`` (3x3 for
    radius <= 8, else 5x5; reflect-101 border), cropped to its non-zero support."""
    from scipy.ndimage import correlate1d

    if radius <= 8:
        coords, ksize = np.arange(-8, 8 + 1), 3
    else:
        coords, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(coords, coords)
    disk = np.array((xx ** 2 + yy ** 2) <= radius ** 2, dtype=np.float32)
    disk /= np.sum(disk)
    taps = np.arange(ksize) - ksize // 2
    g = np.exp(-(taps ** 2) / (2.0 * alias_blur ** 2))
    g /= g.sum()
    kernel = correlate1d(correlate1d(disk.astype(np.float64), g, axis=0, mode="mirror"), g, axis=1, mode="mirror")
    nz = np.nonzero(kernel)
    r0, r1, c0, c1 = nz[0].min(), nz[0].max(), nz[1].min(), nz[1].max()
    # keep the kernel centred (filter2D anchors it at its centre)
    half = max(kernel.shape[0] // 2 - r0, r1 - kernel.shape[0] // 2, kernel.shape[1] // 2 - c0, c1 - kernel.shape[1] // 2)
    mid = kernel.shape[0] // 2
    return kernel[mid - half:mid + half + 1, mid - half:mid + half + 1].astype(np.float32)


def _filter2d_reflect101(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``cv2.filter2D`` (correlation, BORDER_REFLECT_101) per channel of ``[N, H, W, C]``."""
    k = kernel.shape[0] // 2
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(0, 3, 1, 2)
    c = t.shape[1]
    t = F.pad(t, (k, k, k, k), mode="reflect")  # torch 'reflect' excludes the edge: reflect-101
    weight = torch.from_numpy(kernel).expand(c, 1, *kernel.shape).contiguous()
    return F.conv2d(t, weight, groups=c).permute(0, 2, 3, 1).numpy()


def _plasma_fractal(n: int, rng: np.random.Generator, mapsize: int = IMAGE_SIZE, wibbledecay: float = 3) -> np.ndarray:
    """The diamond-square height maps of make_cifar_c (``[n, mapsize, mapsize]`` in [0, 1])."""
    maparray = np.empty((n, mapsize, mapsize), dtype=np.float64)
    maparray[:, 0, 0] = 0
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares
        cornerref = maparray[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=1)
        squareaccum += np.roll(squareaccum, shift=-1, axis=2)
        maparray[:, half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(squareaccum)
        # diamonds
        drgrid = maparray[:, half:mapsize:stepsize, half:mapsize:stepsize]
        ulgrid = maparray[:, 0:mapsize:stepsize, 0:mapsize:stepsize]
        ldrsum = drgrid + np.roll(drgrid, 1, axis=1)
        lulsum = ulgrid + np.roll(ulgrid, -1, axis=2)
        maparray[:, 0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(ldrsum + lulsum)
        tdrsum = drgrid + np.roll(drgrid, 1, axis=2)
        tulsum = ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[:, half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(tdrsum + tulsum)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min(axis=(1, 2), keepdims=True)
    return maparray / maparray.max(axis=(1, 2), keepdims=True)


def _gray(x: np.ndarray) -> np.ndarray:
    """``cv2.cvtColor(x, COLOR_RGB2GRAY)`` for float images ``[N, H, W, 3]`` -> ``[N, H, W, 1]``."""
    return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]


def _pil_each(x: np.ndarray, fn: Callable) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(fn(Image.fromarray(img)).convert("RGB")) for img in x])


# ----------------------------------------------------------------------------- the corruptions
# Each takes uint8 [N, 32, 32, 3], the severity and a generator; returns floats in [0, 255] or uint8.
def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _GAUSSIAN_NOISE[severity - 1]
    x = x / 255.0
    return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _SHOT_NOISE[severity - 1]
    x = x / 255.0
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _IMPULSE_NOISE[severity - 1]
    x = x / 255.0
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    return np.clip(np.where(flipped, salted.astype(np.float64), x), 0, 1) * 255


def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias = _DEFOCUS[severity - 1]
    out = _filter2d_reflect101(x / np.float32(255.0), _disk(radius, alias))
    return np.clip(out, 0, 1) * 255


def glass_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma, delta, passes = _GLASS[severity - 1]
    if delta != 1:  # every CIFAR severity uses 1; the gather below is exact only for offsets <= 0
        raise NotImplementedError("glass_blur with max_delta != 1")
    img = (_gaussian(x / 255.0, sigma) * 255).astype(np.uint8)
    n, h, w, _ = img.shape
    lo = delta + 1  # the loop visits h, w = H-delta ... delta+1
    rows = np.arange(lo, h - delta + 1)
    cols = np.arange(lo, w - delta + 1)
    batch = np.arange(n)[:, None, None]
    for _ in range(passes):
        dy = rng.integers(-delta, delta, size=(n, rows.size, cols.size))  # randint(-1, 1): {-1, 0}
        dx = rng.integers(-delta, delta, size=(n, rows.size, cols.size))
        src = img[batch, rows[None, :, None] + dy, cols[None, None, :] + dx]
        img = img.copy()
        img[:, lo:h - delta + 1, lo:w - delta + 1] = src
    return np.clip(_gaussian(img / 255.0, sigma), 0, 1) * 255


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = _MOTION[severity - 1]
    angles = rng.uniform(-45, 45, size=len(x))
    return _motion_blur(x.astype(np.float64), radius, sigma, angles)


def zoom_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    x = (x / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    factors = _ZOOM[severity - 1]
    for factor in factors:
        out += _clipped_zoom(x, float(factor))
    x = (x + out) / (len(factors) + 1)
    return np.clip(x, 0, 1) * 255


def snow(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    loc, scale, zoom, threshold, radius, sigma, weight = _SNOW[severity - 1]
    x = np.asarray(x, dtype=np.float32) / 255.0
    n, h, w, _ = x.shape
    layer = rng.normal(size=(n, h, w, 1), loc=loc, scale=scale)
    layer = _clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)  # the PIL 'L' image
    angles = rng.uniform(-135, -45, size=n)
    layer = _motion_blur(layer.astype(np.float64), radius, sigma, angles) / 255.0
    x = weight * x + (1 - weight) * np.maximum(x, _gray(x) * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2, axes=(1, 2)), 0, 1) * 255


def frost(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    a, b = _FROST[severity - 1]
    images = frost_images()
    which = rng.integers(len(images), size=len(x))
    out = np.empty(x.shape, dtype=np.float64)
    for i, k in enumerate(which):
        fr = images[k]
        top = rng.integers(0, fr.shape[0] - IMAGE_SIZE)
        left = rng.integers(0, fr.shape[1] - IMAGE_SIZE)
        out[i] = a * x[i] + b * fr[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
    return np.clip(out, 0, 255)


def fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = _FOG[severity - 1]
    x = x / 255.0
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + strength * _plasma_fractal(len(x), rng, wibbledecay=decay)[:, :IMAGE_SIZE, :IMAGE_SIZE, None]
    return np.clip(x * max_val / (max_val + strength), 0, 1) * 255


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """RGB -> HSV, V += c (clipped), HSV -> RGB.  With H and S fixed every channel is linear
    in V, so the round trip is ``rgb * V'/V`` (and ``V'`` on all channels where V = 0)."""
    c = _BRIGHTNESS[severity - 1]
    x = x / 255.0
    v = x.max(axis=3, keepdims=True)
    v_new = np.clip(v + c, 0, 1)
    out = np.where(v > 0, x * (v_new / np.where(v > 0, v, 1)), v_new)
    return np.clip(out, 0, 1) * 255


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _CONTRAST[severity - 1]
    x = x / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def elastic_transform(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    alpha, sigma, jitter = _ELASTIC[severity - 1]
    image = np.asarray(x, dtype=np.float32) / 255.0
    n, h, w, _ = image.shape
    # random affine (cv2.getAffineTransform + warpAffine, BORDER_REFLECT_101)
    center = np.float32([h, w]) // 2
    square = min(h, w) // 3
    pts1 = np.float32([center + square, [center[0] + square, center[1] - square], center - square])
    pts2 = pts1[None] + rng.uniform(-jitter, jitter, size=(n, 3, 2)).astype(np.float32)
    src = np.concatenate([pts1, np.ones((3, 1), np.float32)], axis=1).astype(np.float64)  # [3, 3]
    forward = np.linalg.solve(src[None].repeat(n, 0), pts2.astype(np.float64)).transpose(0, 2, 1)  # [n, 2, 3]: src -> dst
    full = np.concatenate([forward, np.tile([[[0.0, 0.0, 1.0]]], (n, 1, 1))], axis=1)
    inverse = np.linalg.inv(full)[:, :2]  # dst -> src, what warpAffine samples with
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")

    def source(row: int) -> np.ndarray:
        """OpenCV 3/4 fixed point: terms rounded to 1/1024 px, then to the nearest 1/32 px."""
        a, b, c = (inverse[:, row, k, None, None] for k in range(3))
        return np.floor((np.rint(a * gx * 1024) + np.rint((b * gy + c) * 1024) + 16) / 32) / 32

    image = _bilinear(image, source(1), source(0), _reflect101).astype(np.float32)
    # elastic displacement field, then map_coordinates(order=1, mode='reflect')
    dx = (_gaussian(rng.uniform(-1, 1, size=(n, h, w)), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    dy = (_gaussian(rng.uniform(-1, 1, size=(n, h, w)), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    out = _bilinear(image.astype(np.float64), gy[None] + dy, gx[None] + dx, _reflect)
    return np.clip(out, 0, 1) * 255


def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    small = int(IMAGE_SIZE * _PIXELATE[severity - 1])
    return _pil_each(x, lambda im: im.resize((small, small), Image.BOX).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))


def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    quality = _JPEG[severity - 1]

    def encode(im):
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=quality)
        return Image.open(buffer)

    return _pil_each(x, encode)


_FUNCTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    name: globals()[name] for name in CORRUPTIONS
}


# ----------------------------------------------------------------------------- frost images
def frost_dirs() -> list[Path]:
    """Where the frost photographs are looked for, in order."""
    dirs = []
    if os.environ.get(FROST_ENV):
        dirs.append(Path(os.environ[FROST_ENV]).expanduser())
    for package, sub in (("imagecorruptions", "frost"), ("corrupt_tta", "assets/frost")):
        try:
            spec = importlib.util.find_spec(package)  # locates the package without importing it
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(Path(p) / sub for p in spec.submodule_search_locations)
    return dirs


@lru_cache(maxsize=1)
def frost_images() -> tuple[np.ndarray, ...]:
    """The five frost photographs the original samples from, as RGB float arrays downscaled as
    ``cv2.resize(fx=0.2, fy=0.2)`` does (bilinear at scale 5 samples pixels 2, 7, 12, ... exactly)."""
    from PIL import Image

    for folder in frost_dirs():
        if all((folder / f).is_file() for f in FROST_FILES):
            images = []
            for f in FROST_FILES:
                with Image.open(folder / f) as im:
                    rgb = np.asarray(im.convert("RGB"))
                h, w = int(round(rgb.shape[0] * 0.2)), int(round(rgb.shape[1] * 0.2))
                images.append(rgb[2::5, 2::5][:h, :w].astype(np.float64))
            return tuple(images)
    searched = "\n".join(f"  {d}" for d in frost_dirs()) or "  (none)"
    raise ClbenchError(
        "corruption 'frost' needs the frost photographs of Hendrycks & Dietterich (frost1.png ... frost5.jpg). "
        f"Searched:\n{searched}\nInstall them with `pip install imagecorruptions` (only its image files are used) "
        f"or set {FROST_ENV} to a folder holding them."
    )
