"""LwF: Learning without Forgetting, class-incremental form.

Li & Hoiem 2016/2018, "Learning without Forgetting" (ECCV / TPAMI), Eq. 2 (knowledge distillation,
Hinton et al. 2015): after each experience a frozen copy of the model (the teacher) is kept;
while learning the next one the loss is

    L = CE(current data) + lambda_o * L_old,
    L_old = - sum_{c in old} softmax(z_teacher / T)_c * log softmax(z / T)_c,

over the logits of the classes of all previous experiences, with T = 2 and lambda_o = 1 (the
paper's values).  We compute L_old as the KL divergence (it differs from the cross-entropy by the
teacher's entropy, a constant: same gradients), averaged over the batch, with no T^2 factor as in
the paper (``t_squared: true`` adds Hinton's T^2).  The teacher sees the very inputs the student
sees (augmented ones included).  The paper's warm-up step (new head alone first) is not used.

Avalanche's ``LwF`` computes the same loss (KL with ``batchmean``, no T^2, over the units of
previously seen classes; tests/test_vs_avalanche_regularizers.py); its ``alpha`` may be a list,
one per experience, where ours is one value.

``variant: mc`` is LwF.MC (Rebuffi et al. 2017, iCaRL Sec. 2.2/4: LwF's multi-class variant) as in
Smith et al. 2023's released code (``shaunak27/data-free-continual-learning`` @ 5388102,
``learners/kd.py`` ``LWF_MC.update_model``, and the same loss inside ``EWC_MC`` with ``--KD``, their
"prediction distillation"): one binary cross-entropy on the sigmoid of every seen class's logit,

    L = bce_scale * mean_{samples, seen classes c} BCE(sigmoid(z_c), t_c),
    t_c = sigmoid(z_teacher,c) for the old classes, one-hot of the label for the current ones,

(``nn.BCELoss()``, mean over batch x seen classes; ``alpha``, ``temperature`` and ``t_squared`` are not
used).  ``bce_scale``: 1 is iCaRL's, 5 the released code's ``ce_loss_scale``.  ``freeze_bn: true``
trains in eval mode (BatchNorm keeps its running statistics), as their ``update_model`` does.
Composed with EWC or L2 (``strategy: [lwf, ewc]``) this is their "ewc-mc" / "mc-l2" runs
(tests/test_reference_smith2023.py; configs/repro/smith2023_*.yaml).

``feature_kd`` adds their feature distillation (``LWF_MC_FEATKD``, "FeatKD", ``--mu 5``):
``feature_kd x MSE(f(x), f_teacher(x))`` on the penultimate features (mean over batch x dimensions).
In the released code the teacher of task 1 is the initial model (``learn_batch`` copies the model
before training when there is no teacher yet, and ``update_model`` always adds the term), so the
features are pulled toward the initial (random or pretrained) ones from the start:
``feature_kd_initial: true``.  Their "featkd" run (``--playground_flag --temp -3``) is
``variant: kd, alpha: 0`` (CE, no logit distillation) with ``feature_kd: 5``; "lwf-mc-featkd" is
``variant: mc`` with it.

``task_loss`` (``variant: kd``; default ``ce``) replaces the cross-entropy term as in EWC/L2:
``bce`` / ``bce_new`` = ``bce_scale`` x BCE on the sigmoid of the seen / the current experience's logits,
one-hot targets.  Their "lwf-mc-featkd-nologitkd" run (``LWF_MC_FEATKD --mu 5 --playground_flag --temp -1``,
``learners/kd.py`` lines 298-300: 5 x BCE on ``logits[:, last_valid_out_dim:valid_out_dim]``) is
``variant: kd, alpha: 0, task_loss: bce_new, bce_scale: 5`` with ``feature_kd: 5, feature_kd_initial: true``
(``configs/repro/smith2023_lwf_mc_featkd_nologitkd_cifar100.yaml``).

``balanced_bce: true`` (``variant: mc``) is their ``--balanced_bce`` ("-balance" runs; ``LWF_MC.update_model``
lines 242-266, the same in ``LWF_MC_FEATKD`` and ``EWC_MC``): the current classes' BCE with the label's
term weighing as much as the other n - 1 together, x 2n / (1 + 1/n), mixed with the old classes' BCE
toward sigmoid(teacher) in proportion to their numbers, n / (n + m) and m / (n + m)
(:func:`clbench.regularizers.balanced_bce`).  Their balanced loss has no ``ce_loss_scale``: its repro
configs set ``bce_scale: 1`` (the loss is multiplied by ``bce_scale``).  With EWC, their Fisher then
uses the same weighting (``ewc.fisher_loss: bce_new_balanced``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from clbench.registry import ClbenchError, register_strategy
from clbench.regularizers import TASK_LOSSES, BCETaskLoss, balanced_bce, one_hot, sigmoid_bce
from clbench.strategy import Batch, Context, Strategy, StrategyConfig
from clbench.validation import bounded, choice, require


@dataclass
class LwFConfig(StrategyConfig):
    name: str = "lwf"
    alpha: float = bounded(1.0, ge=0)  # lambda_o, weight of the distillation term (paper: 1)
    temperature: float = bounded(2.0, gt=0)  # T (paper: 2)
    t_squared: bool = False  # scale the distillation term by T^2 (Hinton et al. 2015); the paper does not
    variant: str = choice("kd", "kd", "mc")  # kd (Li & Hoiem: CE + alpha * KD) | mc (LwF.MC: sigmoid BCE, old classes' targets = sigmoid(teacher))
    bce_scale: float = bounded(1.0, gt=0)  # variant=mc: factor of the BCE (iCaRL: 1; Smith et al.'s code: 5)
    freeze_bn: bool = False  # train in eval mode (BatchNorm keeps its running statistics), as Smith et al.'s update_model
    feature_kd: float = bounded(0.0, ge=0)  # weight of MSE(features, teacher's features) (Smith et al.'s FeatKD: 5); 0 = off
    feature_kd_initial: bool = False  # feature_kd in the first experience too, toward the initial model (their LWF_MC_FEATKD)
    task_loss: str = choice("ce", *TASK_LOSSES)  # variant=kd: ce | bce (bce_scale x sigmoid BCE, seen classes) | bce_new (current classes only; their --playground_flag --temp -1)
    balanced_bce: bool = False  # variant=mc: Smith et al.'s --balanced_bce class-balanced BCE (their "-balance" runs)

    def validate(self) -> None:
        require(not self.balanced_bce or self.variant == "mc",
                f"lwf: balanced_bce=true is a form of the LwF.MC loss: set variant=mc (got variant={self.variant})")
        require(self.task_loss == "ce" or self.variant == "kd",
                f"lwf: task_loss={self.task_loss} replaces the cross-entropy of variant=kd; variant=mc has its own BCE")


@register_strategy("lwf", config=LwFConfig, description="Learning without Forgetting (Li & Hoiem 2016), class-IL distillation")
class LwF(BCETaskLoss, Strategy):
    """CE on the current data + alpha * KD(T) toward the previous model on the old classes' logits
    (``variant: kd``'s classification term and ``freeze_bn``: :class:`~clbench.regularizers.BCETaskLoss`)."""

    cfg: LwFConfig

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        if self.cfg.variant not in ("kd", "mc"):
            raise ClbenchError(f"strategy.variant must be 'kd' or 'mc', got '{self.cfg.variant}'")
        if self.cfg.task_loss not in TASK_LOSSES:
            raise ClbenchError(f"strategy.task_loss must be one of {', '.join(TASK_LOSSES)}, got '{self.cfg.task_loss}'")
        self.cfg.validate()
        self.teacher: torch.nn.Module | None = None
        if self.cfg.feature_kd > 0 and self.cfg.feature_kd_initial:  # the released code's teacher in task 1
            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.old_classes = torch.zeros(ctx.stream.num_classes, dtype=torch.bool, device=ctx.device)
        self._x: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        self._x = x
        return self.model(x)

    def distillation(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """KL(softmax(teacher/T) || softmax(output/T)) over the old classes, batch mean."""
        with torch.no_grad():
            target = self.teacher(x)[:, self.old_classes].float()
        t = self.cfg.temperature
        kd = F.kl_div(F.log_softmax(output[:, self.old_classes].float() / t, 1), F.softmax(target / t, 1),
                      reduction="batchmean")
        return kd * t * t if self.cfg.t_squared else kd

    def penalty(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor | float:
        """``feature_kd`` x MSE (mean) between the model's and the teacher's features (``model.features``,
        a second forward of the same inputs, as the released ``generate_scores_pen`` / ``forward(pen=True)``)."""
        if self.cfg.feature_kd == 0 or self.teacher is None:
            return 0.0
        with torch.no_grad():
            target = self.teacher.features(self._x).float()
        return self.cfg.feature_kd * F.mse_loss(self.model.features(self._x).float(), target)

    def mc_loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        """LwF.MC: ``bce_scale`` x BCE(sigmoid(z), t) over the allowed (seen) classes, t = one-hot on
        the current classes and sigmoid(teacher logits) on the old ones."""
        target = one_hot(batch.y, output.shape[1])
        distill = self.teacher is not None and bool(self.old_classes.any())
        if distill:
            with torch.no_grad():
                soft = torch.sigmoid(self.teacher(self._x).float())
            target[:, self.old_classes] = soft[:, self.old_classes]
        allowed = ctx.class_mask[batch.task]
        if self.cfg.balanced_bce:  # their --balanced_bce: current classes balanced, old ones in proportion
            if not distill:
                return balanced_bce(output, target, allowed, scale=self.cfg.bce_scale)
            return balanced_bce(output, target, allowed & ~self.old_classes, allowed & self.old_classes,
                                scale=self.cfg.bce_scale)
        return sigmoid_bce(output, target, allowed, self.cfg.bce_scale)

    def loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        if self.cfg.variant == "mc":
            penalty = self.penalty(output, batch, ctx)
            return self.mc_loss(output, batch, ctx) + penalty
        loss = super().loss(output, batch, ctx)
        if self.teacher is None or not bool(self.old_classes.any()):
            return loss
        return loss + self.cfg.alpha * self.distillation(output, self._x)

    def after_experience(self, exp, ctx: Context) -> None:
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.old_classes[exp.classes.to(ctx.device)] = True

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": None if self.teacher is None else self.teacher.state_dict(), "old": self.old_classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old_classes = state["old"].to(self.old_classes.device)
        if state["teacher"] is not None:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.teacher.load_state_dict(state["teacher"])
