"""Quadratic parameter regularisation: one mechanism for L2 and EWC.

    L_reg = scale * sum_theta  Omega_theta * (theta - theta*)^2

with Omega = 1 for L2 and Omega = F (the diagonal Fisher information) for EWC (Kirkpatrick et
al. 2017, Eq. 3), and theta* the parameters at the end of the previous task.  Importances
accumulate online across tasks, ``Omega <- gamma * Omega + Omega_new`` (Schwarz et al. 2018;
gamma = 1 as in Smith et al. 2023's released code), and the anchor is overwritten each task.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from clbench.registry import ClbenchError
from clbench.strategy import Batch, Context, Strategy


class QuadraticRegularizer:
    """Holds anchors theta* and importances Omega for a fixed set of named parameters."""

    def __init__(self, params: dict[str, nn.Parameter], gamma: float = 1.0):
        self.params = params
        self.gamma = gamma
        self.anchor: dict[str, torch.Tensor] = {}
        self.importance: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self.anchor)

    def penalty(self) -> torch.Tensor:
        """sum Omega * (theta - theta*)^2 (zero before the first anchor)."""
        if not self.anchor:
            return torch.zeros((), device=next(iter(self.params.values())).device)
        return sum(((self.importance[n] * (p - self.anchor[n]).pow(2)).sum() for n, p in self.params.items()),
                   torch.zeros((), device=next(iter(self.params.values())).device))

    def consolidate(self, new_importance: dict[str, torch.Tensor] | None = None) -> None:
        """Anchor at the current parameters; accumulate ``new_importance`` (EWC), or keep
        Omega = 1 when it is None (L2)."""
        for n, p in self.params.items():
            old = self.importance.get(n)
            if new_importance is None:
                self.importance[n] = torch.ones_like(p, requires_grad=False)
            else:
                new = new_importance[n].detach()
                self.importance[n] = new.clone() if old is None else self.gamma * old + new
            self.anchor[n] = p.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor, "importance": self.importance}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = dict(state["anchor"])
        self.importance = dict(state["importance"])


def per_sample_fisher(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Empirical Fisher, one gradient per sample: F = 1/N sum_n (d/dtheta log p(y_n | x_n))^2.

    ``batches`` yields ``(inputs, labels, allowed)`` with ``allowed`` the bool ``[B, C]`` mask of
    the logits the model may use (the log-softmax runs over those only).  Per-sample gradients
    come from ``torch.func.vmap`` over ``grad``; the model runs in eval mode.
    """
    from torch.func import functional_call, grad, vmap

    names = list(params)
    frozen = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if n not in params}

    def nll(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**frozen, **p}, (x.unsqueeze(0),)).squeeze(0)
        logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        return -logp.gather(0, y.view(1)).squeeze(0)

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    detached = {n: params[n].detach() for n in names}
    with _eval_mode(model):
        for x, y, allowed in batches:
            grads = per_sample(detached, x, y, allowed)
            for n in names:
                fisher[n] += grads[n].pow(2).sum(0)
            count += y.numel()
    return {n: f / max(count, 1) for n, f in fisher.items()}


def batch_fisher(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The released code's estimate (Smith et al. 2023, ``learners/kd.py``): for each mini-batch
    add grad(mean batch loss)^2 * batch_size / n_batches.  A squared *mini-batch* gradient,
    smaller than the per-sample Fisher by about the batch size; kept for parity only."""
    batches = list(batches)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    with _eval_mode(model):
        for x, y, allowed in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y, allowed).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().pow(2) * y.numel() / len(batches)
    model.zero_grad(set_to_none=True)
    return fisher


class _eval_mode:
    def __init__(self, model: nn.Module):
        self.model, self.was = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was)


class ParameterRegularization(Strategy):
    """Base of the L2 and EWC strategies: the penalty added in ``loss`` over the backbone's (or all)
    parameters; subclasses set the scale and consolidate in ``after_experience``."""

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        if self.cfg.params not in ("backbone", "all"):
            raise ClbenchError(f"strategy.params must be 'backbone' or 'all', got '{self.cfg.params}'")
        named = dict(model.named_parameters())
        if self.cfg.params == "backbone":
            named = {n: p for n, p in named.items() if not n.startswith("head.")}
        self.reg = QuadraticRegularizer({n: p for n, p in named.items() if p.requires_grad},
                                        gamma=getattr(self.cfg, "gamma", 1.0))

    def penalty_scale(self) -> float:
        raise NotImplementedError

    def loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        task_loss = super().loss(output, batch, ctx)
        if not self.reg.active:
            return task_loss
        return task_loss + self.penalty_scale() * self.reg.penalty()

    def state_dict(self) -> dict[str, Any]:
        return {"reg": self.reg.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reg.load_state_dict(state["reg"])
