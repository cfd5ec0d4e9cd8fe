"""SI: Synaptic Intelligence, an online path-integral importance per parameter.

Zenke, Poole & Ganguli 2017, "Continual Learning Through Synaptic Intelligence" (ICML):

* Eq. 4 (surrogate loss): L~_mu = L_mu + c * sum_k Omega_k (theta*_k - theta_k)^2
  (no 1/2), theta* the parameters at the end of the previous task;
* path integral over task mu's training steps: omega_k = - sum_t g_k(t) * delta_k(t), with g
  the gradient of the *task* loss (the authors' code, ``unreg_grads``) and delta(t) the update
  the optimiser made with it;
* Eq. 5: Omega_k <- Omega_k + omega_k / (Delta_k^2 + xi), Delta_k = theta_k(end) - theta_k(start)
  of the task; omega is reset at each task start.

The task-loss gradient is the step's gradient minus the penalty's own, 2c Omega (theta - theta*)
(exact unless ``train.grad_clip`` rescales the gradient).  A step's contribution is added at the
next step's ``loss`` (its gradient still lies in ``p.grad`` then, the update is done), and the
last one in ``after_experience``, so every optimiser step counts, online protocol included.

Avalanche's ``SynapticIntelligencePlugin`` differs (tests/test_vs_avalanche_regularizers.py):
its penalty is ``si_lambda / 2 * ...`` (c = si_lambda / 2), it integrates the *total* gradient,
penalty included (``path_grad: total``), and it clips Omega at 0.001 (``importance_clip: 0.001``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from clbench.registry import register_strategy
from clbench.regularizers import ParameterRegularization
from clbench.strategy import Batch, Context, StrategyConfig
from clbench.validation import bounded, choice


@dataclass
class SIConfig(StrategyConfig):
    name: str = "si"
    c: float = bounded(1.0, ge=0)  # Zenke et al. 2017, split MNIST: c = 1 (permuted MNIST: 0.1)
    xi: float = bounded(1e-3, gt=0)  # damping xi of Eq. 5 (split MNIST / CIFAR: 1e-3; permuted MNIST: 0.1)
    params: str = choice("all", "all", "backbone")  # all (the paper) | backbone
    path_grad: str = choice("task", "task", "total")  # task (the paper's code) | total (penalty included: Avalanche)
    importance_clip: Optional[float] = bounded(None, gt=0)  # clip Omega from above (Avalanche: 0.001); null: none
    gamma: float = bounded(1.0, ge=0, le=1)  # Omega <- gamma * Omega + Omega_new (1: the paper's sum)


@register_strategy("si", config=SIConfig, description="Synaptic Intelligence (path-integral importance, Zenke et al. 2017)")
class SI(ParameterRegularization):
    """L = CE + c * sum Omega (theta - theta*)^2, Omega from the path integral of -g * delta."""

    cfg: SIConfig

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        p = self.reg.params
        self.omega = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in p.items()}  # running path integral
        self.start = {n: t.detach().clone() for n, t in p.items()}  # theta at the task start
        self.prev: dict[str, torch.Tensor] = {}  # theta before the pending step
        self.raw: dict[str, torch.Tensor] = {}  # unclipped accumulated Omega (the clip applies to a copy)

    def penalty_scale(self) -> float:
        return self.cfg.c

    def before_experience(self, exp, ctx: Context) -> None:
        for n, t in self.reg.params.items():
            self.omega[n].zero_()
            self.start[n] = t.detach().clone()
        self.prev = {}

    @torch.no_grad()
    def _integrate(self) -> None:
        """Add the pending step's -g * delta (g: its gradient, still in ``p.grad``)."""
        for n, p in self.reg.params.items():
            if p.grad is None or n not in self.prev:
                continue
            g = p.grad.float()
            if self.cfg.path_grad == "task" and self.reg.active:
                g = g - 2 * self.cfg.c * self.reg.importance[n] * (self.prev[n] - self.reg.anchor[n])
            self.omega[n] -= g * (p.detach().float() - self.prev[n])
        self.prev = {}

    def loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        if self.model.training and torch.is_grad_enabled():
            self._integrate()
            self.prev = {n: p.detach().float().clone() for n, p in self.reg.params.items()}
        return super().loss(output, batch, ctx)

    @torch.no_grad()
    def after_experience(self, exp, ctx: Context) -> None:
        self._integrate()
        new = {n: self.omega[n] / ((p.detach().float() - self.start[n]).pow(2) + self.cfg.xi)
               for n, p in self.reg.params.items()}
        for n, w in new.items():  # Eq. 5, accumulated unclipped; the clip (parity) applies to the copy in use
            self.raw[n] = w.clone() if n not in self.raw else self.cfg.gamma * self.raw[n] + w
        use = {n: w if self.cfg.importance_clip is None else w.clamp(max=self.cfg.importance_clip)
               for n, w in self.raw.items()}
        self.reg.importance = {}
        self.reg.consolidate(use)

    def state_dict(self) -> dict[str, Any]:
        return {"reg": self.reg.state_dict(), "omega": self.omega, "start": self.start, "raw": self.raw}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reg.load_state_dict(state["reg"])
        self.omega, self.start, self.raw = dict(state["omega"]), dict(state["start"]), dict(state["raw"])
        self.prev = {}  # a step pending at the checkpoint lost its gradient: dropped
