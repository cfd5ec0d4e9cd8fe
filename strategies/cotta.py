"""CoTTA: continual test-time domain adaptation (Wang, Fink, Van Gool & Dai, CVPR 2022,
"Continual Test-Time Domain Adaptation"), following the released CIFAR code
(``qinenergy/cotta`` ``cifar/cotta.py`` and ``cifar/cfgs/cifar10/cotta.yaml``).

Set-up (``configure_model``, once, before the first domain; never reset afterwards): the
student f_θ trains **all** parameters, BatchNorm normalises with the test batch's statistics
(running statistics removed); the teacher f_θ' and the anchor f_θ0 are copies of it, and θ0
(the source weights) is kept for the stochastic restore.  Per test batch x (one step):

1. student logits y_s = f_θ(x); anchor confidence c = mean_i max_k softmax(f_θ0(x_i))_k;
2. pseudo-label (paper Eq. 4-5): if c < p_th, the teacher's logits averaged over N = 32
   augmentations of x, else the teacher's logits on x;
3. loss: cross-entropy of the student to the pseudo-label's softmax, mean over the batch
   (the engine takes the optimiser step: Adam lr 1e-3, betas (0.9, 0.999), batch 200);
4. teacher EMA, θ' <- α θ' + (1 - α) θ with α = 0.999 (Eq. 3);
5. stochastic restore: per weight, with probability p = 0.01, θ <- θ0 (Eq. 6);
6. the prediction scored is the pseudo-label of step 2 (the official ``forward`` returns it).

Augmentation (``get_tta_transforms``), on pixels in [0, 1]: clip; colour jitter in random order
(brightness 0.6-1.4, contrast 0.7-1.3, saturation 0.5-1.5, hue +-0.06, gamma 0.7-1.3); edge-pad
by 16; random affine (+-15 deg, translation up to 1/16 of the padded size, scale 0.9-1.1,
bilinear, zero fill); Gaussian blur (5x5, sigma 0.001-0.5); centre crop 32; horizontal flip
(p 0.5); Gaussian noise (std 0.005); clip.  Re-implemented batched in torch: each op matches
torchvision's functional op on a batch tensor (tests compare them).

Parity flags (defaults = the released CIFAR code; the paper leaves these open):

* ``gate``: ``batch`` compares the *batch mean* of the anchor confidence with p_th (code);
  ``sample`` gates each sample by its own confidence (a per-sample reading of Eq. 5).
* ``anchor_bn``: ``batch``, the anchor is a copy of the configured model and so uses test-batch
  BN statistics (code); ``source``, the source model as trained (eval-mode running statistics).
* ``average``: ``logits`` averages the teacher's logits over augmentations (code); ``probs``
  averages their softmax.
* ``augment_params``: ``batch``, one random draw of every augmentation parameter per
  augmented copy, shared by the whole batch (torchvision transforms on a batch tensor, code);
  ``sample``, independent parameters per image (the colour-jitter order stays per batch).
* ``symmetric_ce``: the ImageNet code's symmetric cross-entropy ½(CE(ŷ'→y_s) + CE(y_s→ŷ'));
  off for CIFAR.
* ``predict``: ``teacher`` scores the pseudo-label (code); ``student`` the student's logits.

Known issues (spec §6): results depend on resetting exactly once, before the first domain
(done in ``setup``); the official restore masks come from the CPU RNG, ours from a generator
on the model's device seeded by the run seed, so the random streams differ by device.
Hyper-parameters for other datasets: CIFAR-100 p_th 0.72; ImageNet (hard-coded there) SGD lr
0.01, batch 64, p_th 0.1, restore p 0.001, symmetric CE.

Reference test: ``tests/test_reference_tta.py`` runs this strategy (code mode) against the golden
``tests/reference/cotta.safetensors``, written by ``tools/reference/cotta.py`` from the released
``CoTTA`` wrapper (qinenergy/cotta @ c212a20) on a tiny BN CNN over 4 batches, with the global RNG
and the restore generator matched to the official run: same random augmentation parameters
(clbench's batched augmentation consumes the global RNG in the order of ``get_tta_transforms``),
same restore masks, pseudo-labels within 2e-7 and weights within 4e-7 (gated steps; bit-exact on
plain-teacher steps).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from clbench.registry import ClbenchError, register_strategy
from clbench.strategy import Batch, Context, Strategy, StrategyConfig
from clbench.scenarios.base import seeded_generator
from clbench.strategies.bn_adapt import use_batch_statistics
from clbench.validation import bounded, choice

_CHOICES = {"gate": ("batch", "sample"), "anchor_bn": ("batch", "source"), "average": ("logits", "probs"),
            "augment_params": ("batch", "sample"), "predict": ("teacher", "student")}


@dataclass
class CoTTAConfig(StrategyConfig):
    name: str = "cotta"
    ema: float = bounded(0.999, ge=0, le=1)  # teacher momentum α (OPTIM.MT)
    restore_p: float = bounded(0.01, ge=0, le=1)  # stochastic restore probability p (OPTIM.RST)
    threshold: float = bounded(0.92, ge=0, le=1)  # anchor-confidence threshold p_th (OPTIM.AP; CIFAR-100 0.72, ImageNet 0.1)
    n_augmentations: int = bounded(32, ge=1)  # N, augmented copies averaged for the pseudo-label
    gate: str = choice("batch", "batch", "sample")  # batch (code: mean confidence of the batch) | sample
    anchor_bn: str = choice("batch", "batch", "source")  # batch (code: anchor uses test-batch BN statistics) | source (running statistics)
    average: str = choice("logits", "logits", "probs")  # logits (code) | probs: what is averaged over augmentations
    augment_params: str = choice("batch", "batch", "sample")  # batch (code: one draw per augmented copy for the whole batch) | sample
    symmetric_ce: bool = False  # ImageNet code's symmetric cross-entropy
    predict: str = choice("teacher", "teacher", "student")  # teacher (code: the pseudo-label is the prediction) | student


@register_strategy("cotta", config=CoTTAConfig,
                   description="CoTTA: EMA teacher, augmentation-averaged pseudo-labels, stochastic restore")
class CoTTA(Strategy):
    """Mean-teacher self-training with augmentation averaging under an anchor-confidence gate,
    and stochastic restoration of source weights (see the module docstring)."""

    cfg: CoTTAConfig

    def __init__(self, cfg: CoTTAConfig):
        super().__init__(cfg)
        for key, valid in _CHOICES.items():
            if getattr(cfg, key) not in valid:
                raise ClbenchError(f"strategy cotta: {key} must be one of {', '.join(valid)}, got '{getattr(cfg, key)}'")
        if not 0.0 <= cfg.ema <= 1.0 or not 0.0 <= cfg.restore_p <= 1.0:
            raise ClbenchError(f"strategy cotta: ema and restore_p must be in [0, 1], got {cfg.ema}, {cfg.restore_p}")
        if cfg.n_augmentations < 1:
            raise ClbenchError(f"strategy cotta: n_augmentations must be >= 1, got {cfg.n_augmentations}")

    # ------------------------------------------------------------------ set-up
    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        model.train()
        model.requires_grad_(True)
        anchor = copy.deepcopy(model).eval() if self.cfg.anchor_bn == "source" else None
        if not use_batch_statistics(model):
            raise ClbenchError("strategy cotta needs a model with BatchNorm layers (it normalises with test-batch statistics)")
        if anchor is None:
            anchor = copy.deepcopy(model)
        self.anchor = anchor.requires_grad_(False)
        self.teacher = copy.deepcopy(model).requires_grad_(False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.source = [p.detach().clone() for p in self.params]
        self.generator = torch.Generator(device=ctx.device).manual_seed(seeded_generator(ctx.seed, 4099).initial_seed())
        self.augment = TTAAugment(ctx.preprocess.mean, ctx.preprocess.std, per_sample=self.cfg.augment_params == "sample")
        self._student: torch.Tensor | None = None
        self._target: torch.Tensor | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.params}]

    # ------------------------------------------------------------------ one test batch
    def forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        self.model.train()
        student = self.model(x)
        with torch.no_grad():
            target = self.pseudo_label(x, batch.x)
        self._student, self._target = student, target
        return target if self.cfg.predict == "teacher" else student.detach()

    @torch.no_grad()
    def pseudo_label(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """The teacher's prediction (logits, or log-probabilities when ``average=probs``),
        augmentation-averaged where the anchor's confidence is below the threshold."""
        confidence = self.anchor(x).float().softmax(1).amax(1)
        teacher = self.teacher(x).float()
        if self.cfg.gate == "batch":
            gated = torch.full_like(confidence, float(confidence.mean()) < self.cfg.threshold, dtype=torch.bool)
        else:
            gated = confidence < self.cfg.threshold
        if not bool(gated.any()):
            return teacher if self.cfg.average == "logits" else teacher.log_softmax(1)
        images = raw.float().div(255.0)
        total = torch.zeros_like(teacher)
        for _ in range(self.cfg.n_augmentations):
            out = self.teacher(self.augment(images)).float()
            total += out if self.cfg.average == "logits" else out.softmax(1)
        mean = total / self.cfg.n_augmentations
        if self.cfg.average == "probs":
            mean, teacher = mean.clamp_min(1e-12).log(), teacher.log_softmax(1)
        return torch.where(gated[:, None], mean, teacher)

    def loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        student, target = self._student.float(), self._target.detach().float()
        loss = consistency_loss(student, target)
        if self.cfg.symmetric_ce:
            loss = 0.5 * loss + 0.5 * -(student.softmax(1) * target.log_softmax(1)).sum(1)
        return loss.mean(0)

    @torch.no_grad()
    def after_step(self, batch: Batch, ctx: Context) -> None:
        self._student = self._target = None
        ema_update(self.teacher, self.model, self.cfg.ema)
        if self.cfg.restore_p > 0:
            stochastic_restore(self.params, self.source, self.cfg.restore_p, self.generator)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        return self.teacher(x)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "anchor": self.anchor.state_dict(),
                "source": [p.clone() for p in self.source], "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.anchor.load_state_dict(state["anchor"])
        for p, saved in zip(self.source, state["source"]):
            p.copy_(saved)
        self.generator.set_state(state["generator"].cpu())


# ---------------------------------------------------------------------- the mechanisms
def consistency_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy ``-sum_k softmax(target)_k log softmax(student)_k`` (the official
    ``softmax_entropy(x, x_ema)``)."""
    return -(target.softmax(1) * student.log_softmax(1)).sum(1)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """θ' <- α θ' + (1 - α) θ for every parameter (the official ``update_ema_variables``, in its order
    of floating-point operations, so that the teacher matches the released code bit for bit)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.copy_(alpha * t + (1.0 - alpha) * s.detach())


@torch.no_grad()
def stochastic_restore(params: list[torch.Tensor], source: list[torch.Tensor], p: float,
                       generator: torch.Generator | None = None) -> int:
    """θ <- M ⊙ θ0 + (1 - M) ⊙ θ with M ~ Bernoulli(p) per element; returns how many were restored."""
    restored = 0
    for param, original in zip(params, source):
        mask = torch.rand(param.shape, generator=generator, device=param.device) < p
        param.copy_(torch.where(mask, original, param))
        restored += int(mask.sum())
    return restored


# ---------------------------------------------------------------------- augmentation
def _gray(img: torch.Tensor) -> torch.Tensor:
    """torchvision's ``rgb_to_grayscale`` weights, ``[B, 1, H, W]``."""
    return (0.2989 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).unsqueeze(1)


def _rgb2hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(1)
    maxc, minc = img.amax(1), img.amin(1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    return torch.stack((torch.fmod(h / 6.0 + 1.0, 1.0), s, maxc), 1)


def _hsv2rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    table = torch.stack([torch.stack(c, 1) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], 1)
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)  # [B, 3, H, W]


class TTAAugment:
    """CoTTA's ``get_tta_transforms()`` for normalised-model inputs: pixels in [0, 1] in,
    normalised (``(x - mean) / std``) augmented images out.  Random parameters come from the
    global torch RNG of the images' device; one draw per call (``per_sample=False``, as the
    official transforms on a batch tensor) or one per image."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, per_sample: bool = False, gaussian_std: float = 0.005):
        self.mean, self.std = mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)
        self.per_sample = per_sample
        self.gaussian_std = gaussian_std

    def _uniform(self, low: float, high: float, n: int, device: torch.device) -> torch.Tensor:
        k = n if self.per_sample else 1
        return torch.empty(k, device=device).uniform_(low, high).expand(n)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        b, device = img.shape[0], img.device
        img = img.clamp(0.0, 1.0)
        img = self.color_jitter(img)
        size = img.shape[-1]
        pad = size // 2
        img = F.pad(img, (pad, pad, pad, pad), mode="replicate")
        angle = self._uniform(-15.0, 15.0, b, device)
        max_d = 1 / 16 * img.shape[-1]
        tx = torch.round(self._uniform(-max_d, max_d, b, device))
        ty = torch.round(self._uniform(-max_d, max_d, b, device))
        scale = self._uniform(0.9, 1.1, b, device)
        img = affine(img, angle, tx, ty, scale)
        img = gaussian_blur(img, self._uniform(0.001, 0.5, b, device))
        top = int(round((img.shape[-2] - size) / 2.0))
        left = int(round((img.shape[-1] - size) / 2.0))
        img = img[..., top:top + size, left:left + size]
        flip = self._uniform(0.0, 1.0, b, device) < 0.5
        img = torch.where(flip.view(-1, 1, 1, 1), img.flip(-1), img)
        img = img + torch.randn_like(img) * self.gaussian_std
        img = img.clamp(0.0, 1.0)
        return (img - self.mean.to(device)) / self.std.to(device)

    def color_jitter(self, img: torch.Tensor) -> torch.Tensor:
        """ColorJitterPro: brightness, contrast, saturation, hue and gamma in a random order."""
        b, device = img.shape[0], img.device
        for op in torch.randperm(5).tolist():
            if op == 0:
                img = adjust_brightness(img, self._uniform(0.6, 1.4, b, device))
            elif op == 1:
                img = adjust_contrast(img, self._uniform(0.7, 1.3, b, device))
            elif op == 2:
                img = adjust_saturation(img, self._uniform(0.5, 1.5, b, device))
            elif op == 3:
                img = adjust_hue(img, self._uniform(-0.06, 0.06, b, device))
            else:
                img = adjust_gamma(img.clamp(1e-8, 1.0), self._uniform(0.7, 1.3, b, device))
        return img


def _per_image(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def adjust_brightness(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (_per_image(factor) * img).clamp(0.0, 1.0)


def adjust_contrast(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _gray(img).mean(dim=(-3, -2, -1), keepdim=True)
    f = _per_image(factor)
    return (f * img + (1.0 - f) * mean).clamp(0.0, 1.0)


def adjust_saturation(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_image(factor)
    return (f * img + (1.0 - f) * _gray(img)).clamp(0.0, 1.0)


def adjust_hue(img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    hsv = _rgb2hsv(img)
    h = torch.remainder(hsv[:, 0] + factor.view(-1, 1, 1), 1.0)
    return _hsv2rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


def adjust_gamma(img: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return img.pow(_per_image(gamma)).clamp(0.0, 1.0)


def affine(img: torch.Tensor, angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """torchvision ``F.affine`` (no shear, centre rotation, bilinear, zero fill) with per-image
    angle (degrees), integer translations and scale."""
    b, _, h, w = img.shape
    rot = torch.deg2rad(angle.to(img.dtype))
    cos, sin = torch.cos(rot), torch.sin(rot)
    s = scale.to(img.dtype)
    m0, m1, m3, m4 = cos / s, sin / s, -sin / s, cos / s  # inverse rotation-scale
    m2 = m0 * -tx + m1 * -ty
    m5 = m3 * -tx + m4 * -ty
    theta = torch.stack((torch.stack((m0, m1, m2), 1), torch.stack((m3, m4, m5), 1)), 1)  # [B, 2, 3]
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w, device=img.device, dtype=img.dtype)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h, device=img.device, dtype=img.dtype)
    base = torch.stack((xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=img.device, dtype=img.dtype)), -1)
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], device=img.device, dtype=img.dtype)
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(rescaled).view(b, h, w, 2)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gaussian_blur(img: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 5) -> torch.Tensor:
    """torchvision ``F.gaussian_blur`` (reflect padding) with a per-image sigma."""
    b, c, h, w = img.shape
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, device=img.device, dtype=img.dtype)
    pdf = torch.exp(-0.5 * (x[None] / sigma.to(img.dtype)[:, None]).pow(2))
    k1 = pdf / pdf.sum(1, keepdim=True)  # [B, K]
    k2 = (k1[:, :, None] * k1[:, None, :])  # [B, K, K]
    weight = k2[:, None].expand(b, c, kernel_size, kernel_size).reshape(b * c, 1, kernel_size, kernel_size)
    p = kernel_size // 2
    padded = F.pad(img.reshape(1, b * c, h, w), (p, p, p, p), mode="reflect")
    return F.conv2d(padded, weight, groups=b * c).view(b, c, h, w)

