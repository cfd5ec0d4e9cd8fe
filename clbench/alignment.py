"""Classifier alignment with class-Gaussian feature statistics (SLCA's "CA" stage).

Zhang, Wang, Kang, Chen & Wei, "SLCA: Slow Learner with Classifier Alignment for Continual
Learning on a Pre-trained Model", ICCV 2023, Sec. 3.3 (Eq. 3-4); official code ``GengDavid/SLCA``
@ 169d4e6, ``models/slca.py::_train_clf_alignment`` and ``models/base.py::_compute_class_mean``.

* :func:`class_gaussians` -- per-class mean and covariance of features (float64),
  ``Sigma_c = cov(F_c) + eps * I`` (``torch.cov``: unbiased, as ``np.cov`` in the code).
* :func:`sample_features` -- ``N`` features per class from ``N(s_c * mu_c, Sigma_c)`` (the code's
  mean shrink ``s_c = 0.9 + 0.1 (t_c + 1) / (T + 1)``, 1 for the current task's classes).
* :func:`logit_norm_cross_entropy` -- the code's ``ca_with_logit_norm``: logits divided by the mean
  over tasks of the per-task-block L2 norm of the logits, then by ``tau``; cross-entropy.
* :func:`align_classifier` -- trains a copy of the head on sampled features only (SGD with
  momentum, weight decay, cosine annealing per epoch) and returns it; the caller decides how
  long the aligned head lives (SLCA: until the next task begins).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def class_gaussians(feats: torch.Tensor, labels: torch.Tensor, classes: Sequence[int],
                    eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Means ``[K, D]`` and covariances ``[K, D, D]`` (float64) of ``feats`` for each class in
    ``classes``; ``eps * I`` is added to every covariance (SLCA: 1e-4)."""
    feats = feats.double()
    means, covs = [], []
    eye = torch.eye(feats.shape[1], dtype=torch.float64, device=feats.device)
    for c in classes:
        f = feats[labels == int(c)]
        if f.shape[0] < 2:
            raise ValueError(f"class {int(c)} has {f.shape[0]} samples; a covariance needs at least 2")
        means.append(f.mean(0))
        covs.append(torch.cov(f.T) + eps * eye)
    return torch.stack(means), torch.stack(covs)


def mean_shrink(class_task: torch.Tensor, current_task: int) -> torch.Tensor:
    """SLCA's code: ``s_c = 0.9 + 0.1 * (t_c + 1) / (T + 1)`` (1.0 for classes of task ``T``)."""
    return 0.9 + 0.1 * (class_task.double() + 1) / (current_task + 1)


def sample_features(means: torch.Tensor, covs: torch.Tensor, n_per_class: int, generator: torch.Generator,
                    scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` float32 samples of ``N(scale_k * mu_k, Sigma_k)`` for every row k, as
    ``(x [K * n, D], y [K * n])`` with ``y`` the row index, class-major (not shuffled).

    Sampled as ``scale * mu + z L^T`` with ``L`` the float32 Cholesky factor of ``Sigma`` (the
    code's ``MultivariateNormal(mean.float(), cov.float())``, here with a seeded generator)."""
    device = means.device
    k, d = means.shape
    scales = torch.ones(k, dtype=torch.float64, device=device) if scales is None else scales.to(device)
    chol = torch.linalg.cholesky(covs.float())  # [K, D, D]
    z = torch.randn(k, n_per_class, d, generator=generator, device=generator.device).to(device)
    x = (means * scales.unsqueeze(1)).float().unsqueeze(1) + z @ chol.transpose(1, 2)
    y = torch.arange(k, device=device).repeat_interleave(n_per_class)
    return x.reshape(k * n_per_class, d), y


def logit_norm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, blocks: Sequence[torch.Tensor],
                             tau: float | None) -> torch.Tensor:
    """Cross-entropy on ``logits / (mean_t ||logits[:, block_t]||_2 + 1e-7) / tau``; plain CE when
    ``tau`` is None.  ``blocks`` are the column indices (in ``logits``) of each task's classes."""
    if tau is None:
        return F.cross_entropy(logits, targets)
    norms = torch.stack([logits[:, b].norm(p=2, dim=-1) + 1e-7 for b in blocks], dim=-1).mean(-1, keepdim=True)
    return F.cross_entropy(logits / norms / tau, targets)


@dataclass
class AlignmentConfig:
    """SLCA's classifier-alignment recipe (``exps/slca/*.json``, ``models/slca.py``)."""

    epochs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    samples_per_class: int = 256  # also the mini-batch size; #classes mini-batches per epoch
    logit_norm: float | None = 0.1  # tau; None = plain cross-entropy


def align_classifier(head: nn.Module, means: torch.Tensor, covs: torch.Tensor, classes: torch.Tensor,
                     blocks: Sequence[torch.Tensor], scales: torch.Tensor, cfg: AlignmentConfig,
                     generator: torch.Generator, progress: Callable[..., Iterable[Any]] | None = None) -> nn.Module:
    """A copy of ``head`` (features -> logits over all classes) trained on Gaussian samples.

    ``means``/``covs``: the statistics of ``classes`` (row k for ``classes[k]``); only the logits
    of ``classes`` enter the loss (the seen ones).  ``blocks``: for each task, the positions in
    ``classes`` of its classes (the blocks of the logit normalisation).  Per epoch: ``samples_per_class`` samples per class, shuffled, cut into
    ``len(classes)`` mini-batches; SGD (momentum, weight decay) with lr ``cfg.lr * (1 + cos(pi e /
    epochs)) / 2`` at epoch e (``CosineAnnealingLR(T_max=epochs)``).  ``head`` is not modified.
    ``progress``: reports the epochs (``Context.progress``; default: nothing reported).
    """
    aligned = copy.deepcopy(head)
    aligned.requires_grad_(True)
    params = list(aligned.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    classes = classes.to(means.device)
    n, k = cfg.samples_per_class, classes.numel()
    with torch.enable_grad():
        epochs = range(cfg.epochs)
        for epoch in (progress(epochs, total=cfg.epochs, description="classifier alignment") if progress else epochs):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
            x, row = sample_features(means, covs, n, generator, scales)
            perm = torch.randperm(x.shape[0], generator=generator, device=generator.device).to(x.device)
            x, y = x[perm], row[perm]
            for it in range(k):
                xb, yb = x[it * n:(it + 1) * n], y[it * n:(it + 1) * n]
                logits = aligned(xb)[:, classes]
                loss = logit_norm_cross_entropy(logits, yb, blocks, cfg.logit_norm)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    aligned.requires_grad_(False)
    return aligned
