"""A-GEM: Averaged Gradient Episodic Memory (Chaudhry, Ranzato, Rohrbach & Elhoseiny, "Efficient
Lifelong Learning with A-GEM", ICLR 2019, Sec. 4, Eq. 11).

After the backward pass of every step (:meth:`Strategy.before_optimizer_step`) the gradient
``g`` of the current batch's loss is compared with the reference gradient ``g_ref`` of the loss
on a random batch of ``sample_size`` samples drawn from the episodic memory of all previous
experiences; when they conflict it is projected (Eq. 11)::

    g~ = g - (g . g_ref / g_ref . g_ref) g_ref      if g . g_ref < 0,   else g~ = g

so that, to first order, the step does not increase the average memory loss (g~ . g_ref >= 0).
The memory keeps ``patterns_per_experience`` samples drawn uniformly from each experience's
training set, added at the experience's end (the paper's per-task episodic memory).

``g`` and ``g_ref`` are flattened over the parameters the optimiser trains (a parameter without
gradient counts as zeros).  ``g_ref`` uses the same masked cross-entropy as the task loss, in
train mode, computed after the current batch's backward (whose gradients are kept aside and
restored); Avalanche computes it before the current forward -- the same value for a model
without batch statistics.  Avalanche's ``AGEMPlugin`` draws ``sample_size // n_experiences``
samples from each experience's memory (group-balanced); the paper and clbench draw
``sample_size`` uniformly from the whole memory.  The two agree when ``sample_size`` covers the
memory (tests/test_vs_avalanche_rehearsal.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from clbench.registry import register_strategy
from clbench.scenarios.base import Experience, seeded_generator
from clbench.strategy import Context, Strategy, StrategyConfig, masked_cross_entropy
from clbench.validation import bounded


@dataclass
class AGEMConfig(StrategyConfig):
    name: str = "agem"
    patterns_per_experience: int = bounded(250, ge=1)  # episodic memory per experience (paper: 250 per task)
    sample_size: int = bounded(256, ge=1)  # memory samples per reference gradient (paper: 256)


def project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """Eq. 11: ``g`` projected onto the half-space ``g . g_ref >= 0`` (unchanged if already in it)."""
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    return g - (dot / torch.dot(g_ref, g_ref)) * g_ref


@register_strategy("agem", config=AGEMConfig, description="A-GEM: gradient projection on a memory batch's reference gradient")
class AGEM(Strategy):
    """A-GEM: episodic memory per experience, gradient projection before every optimiser step."""

    cfg: AGEMConfig

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        self.memory: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(ctx.seed)
        self.last_dot: float | None = None  # g . g_ref of the last step (before projection), for tests
        self.last_g_ref: torch.Tensor | None = None
        self.projections = 0  # steps whose gradient was projected (g . g_ref < 0)

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups() for p in g["params"] if p.requires_grad]

    def before_optimizer_step(self, ctx: Context) -> None:
        if not self.memory:
            return
        params = self._params()
        grads = [p.grad.clone() if p.grad is not None else None for p in params]
        g = torch.cat([(gr if gr is not None else torch.zeros_like(p)).flatten().float() for gr, p in zip(grads, params)])
        idx = torch.randperm(self.memory["y"].numel(), generator=self.generator)[: self.cfg.sample_size]
        x, y, task = (self.memory[k][idx.to(self.memory[k].device)] for k in ("x", "y", "task"))
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = masked_cross_entropy(self.model(ctx.inputs(x, train=True)), y, ctx.class_mask[task])
            g_ref_parts = torch.autograd.grad(loss, params, allow_unused=True)
        g_ref = torch.cat([(r if r is not None else torch.zeros_like(p)).flatten().float() for r, p in zip(g_ref_parts, params)])
        self.last_dot, self.last_g_ref = float(torch.dot(g, g_ref)), g_ref
        self.projections += self.last_dot < 0
        g = project(g, g_ref)
        offset = 0
        for p, gr in zip(params, grads):
            n = p.numel()
            p.grad = g[offset:offset + n].view_as(p).to(p.dtype) if gr is not None else None
            offset += n

    def after_experience(self, exp: Experience, ctx: Context) -> None:
        data = ctx.stream.train
        n = exp.train_idx.numel()
        pick = torch.randperm(n, generator=seeded_generator(ctx.seed, 151, exp.index))[: self.cfg.patterns_per_experience]
        idx = exp.train_idx.cpu()[pick].to(data.x.device)
        x = data.x[idx]
        if exp.transform is not None:
            x = exp.transform(x)
        new = {"x": x.to(ctx.device), "y": data.y[idx].to(ctx.device),
               "task": torch.full((idx.numel(),), exp.task_id, device=ctx.device)}
        self.memory = {k: torch.cat([self.memory[k], v]) if self.memory else v for k, v in new.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"memory": {k: v.cpu() for k, v in self.memory.items()}, "generator": self.generator.get_state(),
                "projections": self.projections}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = {k: v.to(self.model.head.weight.device) for k, v in state["memory"].items()}
        self.generator.set_state(state["generator"])
        self.projections = int(state.get("projections", 0))
