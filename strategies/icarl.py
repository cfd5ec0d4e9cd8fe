"""iCaRL: incremental classifier and representation learning (Rebuffi, Kolesnikov, Sperl &
Lampert, CVPR 2017, Alg. 1-5).

* Training set (Alg. 3): the new experience's samples together with the exemplars of every old
  class (``training_experiences`` returns the experience plus one holding the exemplars' indices).
* Loss (Alg. 3, ``UpdateRepresentation``): binary cross-entropy on the sigmoid of the logits of
  the seen classes; targets are the one-hot label for the new classes and the previous model's
  sigmoid outputs for the old classes (distillation).  Averaged over samples and seen classes (as
  Avalanche's ``ICaRLLossPlugin``; the paper sums over classes -- a constant factor).
* Exemplars (Alg. 4, herding): for each new class, with L2-normalised features phi and class mean
  mu, the k-th exemplar is ``argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||``, without
  repetition, m = ``memory_size // |seen classes|`` of them; old classes keep their first m
  (Alg. 5, ``ReduceExemplarSet``).  ``herding_repeats=true``: the original code's reading (as
  Avalanche's ``ICaRL``), where a sample already picked may win the argmin again.
* Classifier (Alg. 1, nearest mean of exemplars): ``y* = argmin_y || phi(x) - mu_y ||`` with
  ``mu_y`` the normalised mean of the normalised exemplar features of class y, recomputed after
  every experience; ``predict`` returns ``-|| phi(x) - mu_y ||`` (-inf for classes without
  exemplars).  During the first experience, before any exemplar exists, the linear head.

The paper's optimiser settings (train.*): SGD lr 2.0, batch 128, 70 epochs, weight decay 1e-5,
lr / 5 after epochs 49 and 63, K = 2000 exemplars.  Class-IL only (the exemplars are indices of
the stream's training set; domain transforms are not replayed).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from clbench.registry import register_strategy
from clbench.scenarios.base import Experience
from clbench.strategy import Batch, Context, Strategy, StrategyConfig
from clbench.validation import bounded


@dataclass
class ICaRLConfig(StrategyConfig):
    name: str = "icarl"
    memory_size: int = bounded(2000, ge=1)  # K: exemplars over all classes (paper: 2000)
    feature_batch_size: int = bounded(256, ge=1)  # batch of the feature passes (herding, means)
    # parity with the original iCaRL code and Avalanche's ICaRL: the argmin runs over all the
    # class's samples, a repeated pick is not stored again but still enters the running sum (Alg. 4
    # read literally), until m distinct exemplars (at most 1000 steps).  Default: without repetition.
    herding_repeats: bool = False


def herding(feats: torch.Tensor, m: int, repeats: bool = False) -> torch.Tensor:
    """Alg. 4: positions of ``m`` exemplars of one class (``feats``: its normalised features).
    ``repeats``: see ``ICaRLConfig.herding_repeats``."""
    mu = feats.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    if repeats:
        m, k = min(m, feats.shape[0]), 0
        while len(chosen) < m and k < 1000:
            k += 1
            i = int((mu - (feats + total) / k).norm(dim=1).argmin())
            if i not in chosen:
                chosen.append(i)
            total += feats[i]
        return torch.tensor(chosen, dtype=torch.long)
    available = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
    for k in range(1, min(m, feats.shape[0]) + 1):
        dist = (mu - (feats + total) / k).norm(dim=1).masked_fill(~available, float("inf"))
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        total += feats[i]
    return torch.tensor(chosen, dtype=torch.long)


@register_strategy("icarl", config=ICaRLConfig, description="iCaRL: herding exemplars, BCE with distillation, nearest-mean-of-exemplars")
class ICaRL(Strategy):
    """iCaRL: exemplars by herding, sigmoid BCE with distillation on old classes, NME classifier."""

    cfg: ICaRLConfig

    def setup(self, model: nn.Module, ctx: Context) -> None:
        super().setup(model, ctx)
        n = ctx.stream.num_classes
        self.exemplars: dict[int, torch.Tensor] = {}  # class -> indices into stream.train (herding order)
        self.old_model: nn.Module | None = None
        self.old_classes = torch.zeros(n, dtype=torch.bool, device=ctx.device)
        self.class_means = nn.Module()
        self.class_means.register_buffer("mu", torch.zeros(n, model.head.in_features, device=ctx.device))
        self.class_means.register_buffer("valid", torch.zeros(n, dtype=torch.bool, device=ctx.device))

    def training_experiences(self, exp: Experience, ctx: Context) -> list[Experience]:
        if not self.exemplars:
            return [exp]
        idx = torch.cat([self.exemplars[c] for c in sorted(self.exemplars)]).to(exp.train_idx.device)
        return [exp, Experience(exp.index, exp.task_id, exp.classes, idx, idx[:0])]

    def loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        allowed = ctx.class_mask[batch.task]  # [B, C]
        target = F.one_hot(batch.y, output.shape[1]).float()
        if self.old_model is not None:
            with torch.no_grad():
                old = torch.sigmoid(self.old_model(ctx.inputs(batch.x, train=False)).float())
            target = torch.where(self.old_classes, old, target)  # distillation on the old classes
        bce = F.binary_cross_entropy_with_logits(output.float(), target, reduction="none")
        return (bce * allowed).sum() / allowed.sum()

    def after_experience(self, exp: Experience, ctx: Context) -> None:
        seen = self.old_classes | ctx.class_mask.any(0)
        m = self.cfg.memory_size // int(seen.sum())
        for c in list(self.exemplars):  # Alg. 5: keep the first m
            self.exemplars[c] = self.exemplars[c][:m]
        feats, labels = self._features(exp.train_idx, ctx)
        for c in exp.classes.tolist():
            rows = (labels == c).nonzero().flatten()
            self.exemplars[c] = exp.train_idx.cpu()[rows.cpu()][herding(feats[rows], m, self.cfg.herding_repeats)]
        for c, idx in self.exemplars.items():  # Alg. 2: means of the exemplars
            f, _ = self._features(idx, ctx)
            self.class_means.mu[c] = F.normalize(f.mean(0), dim=0)
            self.class_means.valid[c] = True
        self.old_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.old_classes = seen.clone()

    @torch.no_grad()
    def _features(self, idx: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised features (eval mode, no augmentation) and labels of training rows ``idx``."""
        data = ctx.stream.train
        was_training = self.model.training
        self.model.eval()
        feats = []
        for s in range(0, idx.numel(), self.cfg.feature_batch_size):
            sel = idx[s:s + self.cfg.feature_batch_size].to(data.x.device)
            feats.append(F.normalize(self.model.features(ctx.inputs(data.x[sel].to(ctx.device))).float(), dim=1))
        self.model.train(was_training)
        return torch.cat(feats), data.y[idx.to(data.y.device)].to(ctx.device)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        if not bool(self.class_means.valid.any()):
            return self.model(x)
        feats = F.normalize(self.model.features(x).float(), dim=1)
        return (-torch.cdist(feats, self.class_means.mu)).masked_fill(~self.class_means.valid, float("-inf"))

    def head_predict(self, x: torch.Tensor) -> torch.Tensor:
        """The linear head's scores (for comparison with the NME classifier)."""
        with torch.inference_mode():
            return self.model(x)

    def state_dict(self) -> dict[str, Any]:
        return {"exemplars": {int(c): v.cpu() for c, v in self.exemplars.items()}, "old_classes": self.old_classes.cpu(),
                "mu": self.class_means.mu.cpu(), "valid": self.class_means.valid.cpu(),
                "old_model": None if self.old_model is None else {k: v.cpu() for k, v in self.old_model.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exemplars = {int(c): v for c, v in state["exemplars"].items()}
        self.old_classes.copy_(state["old_classes"])
        self.class_means.mu.copy_(state["mu"])
        self.class_means.valid.copy_(state["valid"])
        if state.get("old_model") is not None:
            self.old_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.old_model.load_state_dict(state["old_model"])
