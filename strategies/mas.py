"""MAS: Memory Aware Synapses, importance from the sensitivity of the learned function.

Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars 2018, "Memory Aware Synapses: Learning
what (not) to forget" (ECCV):

* Eq. 4: Omega_ij = 1/N sum_k || g_ij(x_k) ||, g_ij(x_k) = d [l2(F(x_k; theta))^2] / d theta_ij,
  the gradient of the squared L2 norm of the output, per sample (no labels needed); the output is
  the logits the protocol allows for the sample's task (those of classes not yet seen are no output
  of the learned function);
* Eq. 3: L = L_task + lambda * sum_ij Omega_ij (theta_ij - theta*_ij)^2 (no 1/2), theta* the
  parameters at the end of the previous task; Omega accumulates over tasks (Sec. 4, a sum).

Computed on the experience's training images in eval mode, one gradient per sample (``vmap``
chunks, as EWC's Fisher).  Avalanche's ``MASPlugin`` (after FACIL) differs
(tests/test_vs_avalanche_regularizers.py): it takes |gradient of the mini-batch *mean*| averaged
over mini-batches (``importance: batch``; equal to the paper's at batch size 1) and averages
importances, Omega <- alpha Omega + (1 - alpha) Omega_new with alpha = 0.5 (``alpha: 0.5``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from clbench.registry import register_strategy
from clbench.regularizers import ParameterRegularization, _eval_mode, fisher_chunk_size
from clbench.strategy import Context, StrategyConfig
from clbench.validation import bounded, choice


@dataclass
class MASConfig(StrategyConfig):
    name: str = "mas"
    lambda_: float = bounded(1.0, ge=0)  # Aljundi et al. 2018: lambda = 1 (object recognition sequences)
    params: str = choice("all", "all", "backbone")  # all (the paper) | backbone
    importance: str = choice("sample", "sample", "batch")  # sample (Eq. 4) | batch (|grad of the batch mean|: Avalanche/FACIL)
    importance_batch_size: int = bounded(64, ge=1)
    alpha: Optional[float] = bounded(None, ge=0, lt=1)  # Omega <- alpha Omega + (1-alpha) Omega_new (Avalanche: 0.5); null: the paper's sum


def output_norm_importance(model: nn.Module, params: dict[str, nn.Parameter],
                           batches: Iterable[tuple[torch.Tensor, torch.Tensor]], per_sample: bool = True
                           ) -> dict[str, torch.Tensor]:
    """1/N sum_n |d ||F(x_n)||^2 / d theta| over ``(inputs, allowed)`` batches (``allowed``: bool
    ``[B, C]``, the outputs that count); ``per_sample=False``: |d mean_n ||F(x_n)||^2 / d theta|
    averaged over the batches instead.  No autograd graph in the result."""
    from torch.func import functional_call, grad, vmap

    names = list(params)
    out = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    frozen = {n: t.detach() for n, t in list(model.named_parameters()) + list(model.named_buffers()) if n not in params}
    diff = {n: params[n].detach() for n in names}

    def sq_norm(p: dict[str, torch.Tensor], x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**frozen, **p}, (x,)).float().masked_fill(~allowed, 0.0)
        return logits.pow(2).sum(-1).mean()

    per = vmap(grad(lambda p, xi, ai: sq_norm(p, xi.unsqueeze(0), ai.unsqueeze(0))), in_dims=(None, 0, 0))
    step = fisher_chunk_size(sum(t.numel() for t in diff.values()))
    count = 0
    with _eval_mode(model), torch.no_grad():
        for x, allowed in batches:
            if per_sample:
                for s in range(0, x.shape[0], step):
                    g = per(diff, x[s:s + step], allowed[s:s + step])
                    for n in names:
                        out[n] += g[n].float().abs().sum(0)
                count += x.shape[0]
            else:
                g = grad(sq_norm)(diff, x, allowed)
                for n in names:
                    out[n] += g[n].float().abs()
                count += 1
    return {n: o.div_(max(count, 1)).to(params[n].dtype) for n, o in out.items()}


@register_strategy("mas", config=MASConfig, description="Memory Aware Synapses (output-norm importance, Aljundi et al. 2018)")
class MAS(ParameterRegularization):
    """L = CE + lambda * sum Omega (theta - theta*)^2, Omega = mean |grad ||F(x)||^2|."""

    cfg: MASConfig

    def penalty_scale(self) -> float:
        return self.cfg.lambda_

    def after_experience(self, exp, ctx: Context) -> None:
        size = self.cfg.importance_batch_size
        batches = ctx.progress(((ctx.inputs(b.x), ctx.class_mask[b.task]) for b in ctx.batches([exp], size)),
                               total=-(-exp.train_idx.numel() // size), description="MAS importance")
        omega = output_norm_importance(self.model, self.reg.params, batches, per_sample=self.cfg.importance == "sample")
        a = self.cfg.alpha
        self.reg.gamma = 1.0 if a is None else a
        self.reg.consolidate(omega, new_weight=1.0 if a is None else 1.0 - a)
