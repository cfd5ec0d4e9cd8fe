"""VOR: virtual outlier regularisation (Huang et al., "OVOR: OnePrompt with Virtual Outlier
Regularization for Rehearsal-Free Class-Incremental Learning", ICLR 2024; code
``jpmorganchase/ovor`` @ 4f59b75, ``learners/default.py``, ``learners/ood.py``).

In the last E2 of E1 + E2 epochs of every task the prompts are frozen and only the head trains,
on the task's features plus *virtual outliers* synthesised NPOS-style (Tao et al., ICLR 2023):

1. features f of all training images of the task (fresh augmentation), L2-normalised;
2. boundary samples: the ``select`` samples with the largest distance to their k-th nearest
   neighbour (k = 50, exact L2 kNN over the task's features pooled over its classes; like faiss
   on the index itself, a sample is its own first neighbour);
3. for each boundary sample x_b, ``sample_from`` candidates x_b + sigma * eps, eps ~ N(0, I);
4. keep the ``per_class * C`` candidates with the largest k-NN distance to the ID set.

Loss (OVOR Eq. 5-6): CE(ID) + lambda * [Huber(ReLU(E(x_id) - tau_id)) + Huber(ReLU(tau_ood - E(x_ood)))]
with the energy E(x) = -logsumexp of the logits of the current task's classes, Huber delta 1.

Differences from the released code (paper behaviour by default):

* ``ood.py::_generate`` computes the boundary points but never uses them: the outliers are
  ``cov * offsets.repeat(select, 1)``, i.e. N(0, sigma^2 I) around the **origin** (issue
  ovor#5), with the ``sample_from`` offsets drawn ONCE (``self.dis.rsample((sample_from,))``)
  and the same block repeated for each of the ``select`` boundary points; the kNN distance of
  these un-normalised candidates is taken against the normalised index.  Identical copies
  have identical distances, so the ``per_class * C`` kept outliers are only
  ``ceil(per_class * C / select)`` distinct points (about 40 C / 50 at the defaults), each
  repeated ``select`` times (the last possibly fewer).  ``vor_outlier_center: origin``
  reproduces exactly that (the same draw-once-and-repeat, the same selection).
* ``boundary`` (default, clbench's reading of the paper; a deviation from the released code):
  independent offsets per boundary point, candidates ``x_b + sigma * eps`` around the
  normalised boundary points, then (our choice, stated because the head sees un-normalised
  features) multiplied by the mean norm of the task's features.  With sigma = 0.1 the offset
  alone has norm ~ 0.1 sqrt(D), so at D = 192 (ViT-Tiny) a candidate has norm
  ~ sqrt(1 + 1.92) ~ 1.7 before the rescaling: the outliers sit at ~1.7x the ID feature norm
  (~3.1x at D = 768), a little more for the kept ones (the farthest from the ID set: ~1.9x at
  D = 192 on clustered features).  With ``origin`` they are used as generated, as in the code.

Outliers per VOR step (``vor_ood_batch``): clbench draws as many as the ID batch at random
(``batch``, default); the released ``NPOS.generate`` hands them out in order,
``floor(#outliers / #ID batches)`` per batch (~10 per batch of 128 on ImageNet-R), each once per
epoch (``released``, :func:`outlier_batch`).  The released code also trains the head on features
cached at the start of the epoch; clbench recomputes each batch's (a fresh augmentation).

Parity with the released code (``tests/test_reference_ovor.py``, golden from
``tools/reference/ovor.py`` running ``ood.py`` with faiss): with ``origin`` and the same seed the
offsets, the boundary indices and the outliers are bit-identical; ``boundary`` is checked to differ
as described above; the VOR loss (CE + lambda * energy terms) and the head's Adam steps agree to
~1e-6.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from clbench.prompts import PromptConfig


def kth_neighbour_distance(queries: torch.Tensor, index: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance from each query ``[Q, D]`` to its k-th nearest point of ``index`` ``[N, D]``
    (exact search; a query that is in the index is its own first neighbour, as with faiss)."""
    k = min(k, index.shape[0])
    out = [torch.cdist(queries[s:s + chunk], index).topk(k, dim=1, largest=False).values[:, -1]
           for s in range(0, queries.shape[0], chunk)]
    return torch.cat(out) if out else queries.new_zeros(0)


def boundary_indices(normed: torch.Tensor, k: int, select: int) -> torch.Tensor:
    """Indices of the ``select`` samples of ``normed`` ``[N, D]`` with the largest distance to their
    k-th nearest neighbour in ``normed`` itself, largest first (``ood.py::_boundary``)."""
    return kth_neighbour_distance(normed, normed, k).topk(min(select, normed.shape[0])).indices


def synthesize_outliers(features: torch.Tensor, cfg: "PromptConfig", n_classes: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Virtual outliers ``[per_class * n_classes, D]`` for ID ``features`` ``[N, D]`` (module doc)."""
    feats = features.float()
    normed = F.normalize(feats, dim=1)
    k = cfg.vor_k
    n_keep = cfg.vor_per_class * max(1, n_classes)
    boundary = normed[boundary_indices(normed, k, cfg.vor_select)]
    if cfg.vor_outlier_center == "origin":  # released code: one draw, repeated for every boundary point
        offsets = torch.randn(cfg.vor_sample_from, feats.shape[1], generator=generator).to(feats.device)
        candidates = (cfg.vor_sigma * offsets).repeat(boundary.shape[0], 1)
    else:
        eps = torch.randn(boundary.shape[0], cfg.vor_sample_from, feats.shape[1], generator=generator).to(feats.device)
        candidates = (boundary[:, None] + cfg.vor_sigma * eps).reshape(-1, feats.shape[1])
    d_out = kth_neighbour_distance(candidates, normed, k)
    outliers = candidates[d_out.topk(min(n_keep, candidates.shape[0])).indices]
    if cfg.vor_outlier_center == "boundary":
        outliers = outliers * feats.norm(dim=1).mean()
    return outliers.to(features.dtype)


def outlier_batch(n_outliers: int, step: int, steps_per_epoch: int, batch_size: int, mode: str = "batch",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of the outliers used with the ID batch ``step`` (0-based) of a VOR epoch of
    ``steps_per_epoch`` ID batches (``vor_ood_batch``).

    * ``batch`` (clbench's default): ``batch_size`` drawn uniformly with replacement.
    * ``released`` (``ood.py::NPOS.generate``: ``DataLoader(oods, batch_size=floor(#oods / #ID batches))``
      zipped with the ID loader): the outliers in order, ``floor(n_outliers / steps_per_epoch)`` per
      step (at least 1, wrapping around), each used once per epoch, the remainder unused.
    """
    if mode == "released":
        size = max(1, n_outliers // max(1, steps_per_epoch))
        return torch.arange(step * size, (step + 1) * size) % n_outliers
    if mode != "batch":
        raise ValueError(f"vor_ood_batch must be 'batch' or 'released', got '{mode}'")
    return torch.randint(0, n_outliers, (batch_size,), generator=generator)


def energy(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """E(x) = -logsumexp over the logits of ``classes`` (bool ``[C]``)."""
    return -torch.logsumexp(logits.float()[:, classes], dim=1)


def energy_regularizer(id_logits: torch.Tensor, ood_logits: torch.Tensor, classes: torch.Tensor,
                       tau_id: float, tau_ood: float) -> torch.Tensor:
    """Huber(ReLU(E_id - tau_id)) + Huber(ReLU(tau_ood - E_ood)), Huber delta 1, means (OVOR Eq. 6)."""
    e_id = F.relu(energy(id_logits, classes) - tau_id)
    e_ood = F.relu(tau_ood - energy(ood_logits, classes))
    return F.huber_loss(e_id, torch.zeros_like(e_id)) + F.huber_loss(e_ood, torch.zeros_like(e_ood))
