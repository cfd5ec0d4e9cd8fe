"""A complete user strategy in one file: Learning without Forgetting (Li & Hoiem, 2016).

Run it with:  clbench run plugins=[examples/lwf.py] strategy=lwf_example strategy.alpha=1.0

clbench ships the full strategy as ``strategy=lwf`` (strategies/lwf.py); this example registers
itself as ``lwf_example`` so the two names do not clash.

After each experience a frozen copy of the model is kept; while learning the next one, the
new model's logits over the previously seen classes are distilled toward the copy's
(temperature-scaled KL, Eq. 2 of the paper's knowledge-distillation loss).
"""

import copy
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from clbench.registry import register_strategy
from clbench.strategy import Strategy, StrategyConfig


@dataclass
class LwFConfig(StrategyConfig):
    name: str = "lwf_example"
    alpha: float = 1.0  # weight of the distillation term
    temperature: float = 2.0


@register_strategy("lwf_example", config=LwFConfig, description="Learning without Forgetting (example plug-in)")
class LwF(Strategy):
    """Cross-entropy on the current data + alpha * KD toward the previous model on old classes."""

    def setup(self, model, ctx):
        super().setup(model, ctx)
        self.teacher = None
        self.old_classes = torch.zeros(ctx.stream.num_classes, dtype=torch.bool, device=ctx.device)

    def loss(self, output, batch, ctx):
        loss = super().loss(output, batch, ctx)
        if self.teacher is None:
            return loss
        with torch.no_grad():
            target = self.teacher(ctx.inputs(batch.x))[:, self.old_classes]
        t = self.cfg.temperature
        kd = F.kl_div(F.log_softmax(output[:, self.old_classes] / t, 1), F.softmax(target / t, 1),
                      reduction="batchmean") * t * t
        return loss + self.cfg.alpha * kd

    def after_experience(self, exp, ctx):
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.old_classes[exp.classes.to(ctx.device)] = True

    def state_dict(self):
        return {"teacher": None if self.teacher is None else self.teacher.state_dict(), "old": self.old_classes}

    def load_state_dict(self, state):
        self.old_classes = state["old"]
        if state["teacher"] is not None:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.teacher.load_state_dict(state["teacher"])
