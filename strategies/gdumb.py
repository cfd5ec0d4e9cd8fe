"""GDumb: Greedy sampler and Dumb learner (Prabhu, Torr & Dokania, "GDumb: A Simple Approach
that Questions Our Progress in Continual Learning", ECCV 2020, Sec. 3 and Alg. 1).

* Sampler (greedy, class-balanced, memory of ``mem_size`` = k samples): each incoming sample
  (x, y) is stored if the memory is not full; otherwise, if its class holds fewer than k / |Y|
  samples (|Y|: classes seen so far, y included), a random sample of the largest class (lowest
  class id on ties) is evicted and (x, y) takes its place; else it is dropped.
* Learner: at the end of every experience the model is re-initialised and trained from scratch
  on the memory only (``epochs``, ``batch_size``, SGD with ``lr``/``momentum``/``weight_decay``,
  gradient clipping at ``grad_clip``, SGDR cosine restarts T0 = 1 epoch, Tmult = 2 down to
  ``min_lr``, stepped per batch), cross-entropy over the classes the protocol allows;
  predictions come from that model, masked to the classes in memory.

No gradient step runs in the engine's loop (``training_experiences`` returns nothing): the
experience's samples reach the sampler at its end, in a seeded random order.  Re-initialising
restores the weights the model had at ``setup`` (the run's seeded initialisation), as Avalanche's
``GDumbPlugin`` does with its copy of the initial model; the official code builds a new randomly
initialised model.  Not reproduced: CutMix (p = 0.5) and the official code's linear warm-up epoch.
Avalanche trains the re-initialised model inside the experience's ordinary loop with the run's
optimiser and updates its class-balanced buffer (per-class reservoirs of ``mem_size // |Y|``) at
the experience's start; here the learner has its own optimiser settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from clbench.registry import register_strategy
from clbench.scenarios.base import Experience, seeded_generator
from clbench.strategy import Context, Strategy, StrategyConfig, masked_cross_entropy
from clbench.validation import bounded, choice


@dataclass
class GDumbConfig(StrategyConfig):
    name: str = "gdumb"
    mem_size: int = bounded(500, ge=1)  # k: samples in memory over the whole stream
    epochs: int = bounded(256, ge=1)  # learner epochs on the memory at each experience end (paper: up to 256)
    batch_size: int = bounded(16, ge=1)  # paper: 16
    lr: float = bounded(0.05, gt=0)  # paper: lr in [0.05, 0.0005] with SGDR
    min_lr: float = bounded(0.0005, ge=0)
    momentum: float = bounded(0.9, ge=0)
    weight_decay: float = bounded(1e-6, ge=0)
    grad_clip: Optional[float] = bounded(10.0, gt=0)  # paper: clip at 10; null: no clipping
    scheduler: str = choice("sgdr", "sgdr", "none")  # SGDR (T0 = 1 epoch, Tmult = 2) or a constant lr


@register_strategy("gdumb", config=GDumbConfig, description="GDumb: greedy class-balanced memory, model retrained from scratch on it")
class GDumb(Strategy):
    """GDumb: greedy class-balanced sampler; learner trained from scratch on the memory at each experience end."""

    cfg: GDumbConfig

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.memory: dict[str, torch.Tensor] = {}
        self.counts = torch.zeros(ctx.stream.num_classes, dtype=torch.long)
        self.seen = torch.zeros(ctx.stream.num_classes, dtype=torch.bool)
        self.generator = torch.Generator().manual_seed(ctx.seed)

    def training_experiences(self, exp: Experience, ctx: Context) -> list[Experience]:
        return []  # the learner trains at the experience's end, on the memory only

    def after_experience(self, exp: Experience, ctx: Context) -> None:
        data = ctx.stream.train
        order = exp.train_idx.cpu()[torch.randperm(exp.train_idx.numel(), generator=seeded_generator(ctx.seed, 161, exp.index))]
        x = data.x[order.to(data.x.device)]
        if exp.transform is not None:
            x = exp.transform(x)
        self.observe(x.to(ctx.device), data.y[order.to(data.y.device)].to(ctx.device),
                     torch.full((order.numel(),), exp.task_id, device=ctx.device))
        self.fit(ctx, exp.index)

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: torch.Tensor) -> None:
        """Alg. 1: offer the samples, in order, to the greedy class-balanced sampler."""
        k = self.cfg.mem_size
        if not self.memory:
            self.memory = {"x": x.new_zeros((k, *x.shape[1:])), "y": y.new_full((k,), -1), "task": task.new_zeros(k)}
        labels = y.tolist()
        size = int(self.counts.sum())
        for i, c in enumerate(labels):
            self.seen[c] = True
            if size < k:
                slot = size
                size += 1
            elif self.counts[c] < k / int(self.seen.sum()):
                largest = int(self.counts.argmax())
                members = (self.memory["y"] == largest).nonzero().flatten()
                slot = int(members[torch.randint(members.numel(), (1,), generator=self.generator)])
                self.counts[largest] -= 1
            else:
                continue
            self.counts[c] += 1
            self.memory["x"][slot], self.memory["y"][slot], self.memory["task"][slot] = x[i], y[i], task[i]

    def fit(self, ctx: Context, k: int) -> None:
        """The dumb learner: from the initial weights, trained on the memory only."""
        cfg, model = self.cfg, self.model
        model.load_state_dict(self.initial)
        n = int(self.counts.sum())
        x, y, task = (self.memory[key][:n] for key in ("x", "y", "task"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        per_epoch = math.ceil(n / cfg.batch_size)
        was_training = model.training
        model.train()
        with torch.enable_grad():
            for epoch in ctx.progress(range(cfg.epochs), total=cfg.epochs, description="GDumb learner epochs"):
                perm = torch.randperm(n, generator=seeded_generator(ctx.seed, 162, k, epoch)).to(y.device)
                for b in range(per_epoch):
                    if cfg.scheduler == "sgdr":
                        for group in opt.param_groups:
                            group["lr"] = sgdr_lr(epoch + b / per_epoch, cfg.lr, cfg.min_lr)
                    idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                    loss = masked_cross_entropy(model(ctx.inputs(x[idx], train=True)), y[idx], ctx.class_mask[task[idx]])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
        model.train(was_training)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.model(x)
        if not bool(self.counts.any()):
            return scores
        return scores.masked_fill(~(self.counts > 0).to(scores.device), float("-inf"))

    def state_dict(self) -> dict[str, Any]:
        return {"initial": {k: v.cpu() for k, v in self.initial.items()}, "memory": {k: v.cpu() for k, v in self.memory.items()},
                "counts": self.counts.clone(), "seen": self.seen.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(self.model.parameters()).device
        self.initial = {k: v.to(device) for k, v in state["initial"].items()}
        self.memory = {k: v.to(device) for k, v in state["memory"].items()}
        self.counts.copy_(state["counts"])
        self.seen.copy_(state["seen"])
        self.generator.set_state(state["generator"])


def sgdr_lr(t: float, lr: float, min_lr: float) -> float:
    """SGDR (Loshchilov & Hutter 2017) with T0 = 1 epoch and Tmult = 2 at fractional epoch ``t``."""
    period, start = 1, 0.0
    while t >= start + period:
        start += period
        period *= 2
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (t - start) / period))
