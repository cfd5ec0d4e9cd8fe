"""L2: a quadratic penalty toward the previous task's weights, importance 1 for every parameter.

Smith et al. 2023, "A Closer Look at Rehearsal-Free Continual Learning" (CVPR-W), Sec. 3:
L = L_task + lambda * sum_theta (theta - theta*)^2 (``|eps|`` in their released code,
``learners/kd.py``), with theta* the weights at the end of the previous task.  As in their
code only the feature extractor is regularised (``params: backbone``; ``all`` adds the head);
``anchor_initial: true`` anchors at the initial weights from task 1 on (their ``EWC_MC_L1L2``).
The machinery is shared with EWC (:class:`clbench.regularizers.ParameterRegularization`).
"""

from __future__ import annotations

from dataclasses import dataclass

from clbench.registry import register_strategy
from clbench.regularizers import ParameterRegularization
from clbench.strategy import Context, StrategyConfig


@dataclass
class L2Config(StrategyConfig):
    name: str = "l2"
    lambda_: float = 0.05  # Smith et al. 2023: eps = 0.05 (CIFAR-100, ResNet-18)
    params: str = "backbone"  # backbone | all
    anchor_initial: bool = False  # regularise toward the initial weights during task 1


@register_strategy("l2", config=L2Config, description="L2 penalty toward the previous task's weights")
class L2(ParameterRegularization):
    """L = CE + lambda * sum (theta - theta*)^2, anchor updated after each task."""

    cfg: L2Config

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        if self.cfg.anchor_initial:
            self.reg.consolidate()

    def penalty_scale(self) -> float:
        return self.cfg.lambda_

    def after_experience(self, exp, ctx: Context) -> None:
        self.reg.consolidate()
