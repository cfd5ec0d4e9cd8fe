"""ER-ACE: experience replay with the asymmetric cross-entropy (Caccia, Aljundi, Asadi,
Tuytelaars, Pineau & Belilovsky, "New Insights on Reducing Abrupt Representation Change in
Online Continual Learning", ICLR 2022; official code ``pclucas14/AML``, ``methods/er_ace.py``).

Each step trains on ONE joint forward of ``[incoming batch ; buffer batch]`` (reservoir
buffer, :class:`clbench.buffers.ReservoirBuffer`):

* incoming samples: cross-entropy over the logits of the classes *present in the incoming
  batch* only, so their gradient never pushes down the logits of old classes (ACE);
* buffer samples: cross-entropy over all classes seen so far;
* ``loss = CE_in + CE_buf`` (each a mean over its samples), plus AdaB2N's ``lambda`` term
  when ``norm=adab2n`` (Lyu et al. 2023; :mod:`clbench.norms`).

The joint forward is the same for ``norm=bn`` and ``norm=adab2n`` (AdaB2N's ``ErACEAda``
forwards current and buffer samples jointly, the baseline mammoth ER-ACE separately; here both
norms use the joint batch so that a comparison isolates the normalisation).  Replay starts as
soon as the buffer holds samples (task-free, as the ER-ACE code; mammoth's port replays from
the second task on).

AdaB2N's regulariser enters the loss from experience ``ada_t0`` on (default 0); the released
``ErACEAda`` adds it only from the second task (its first task has no replay), which
``strategy.ada_t0=1`` reproduces.

``unseen_logits=true`` reproduces the released codes' masks: the incoming CE also keeps every
class id >= the largest class seen so far (``mask[:, seen.max():] = 1``, "unmask unseen
classes"), and the buffer CE runs over all logits, seen or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.nn import functional as F

from clbench.norms import NormOptions
from clbench.registry import register_strategy
from clbench.strategy import Batch, Context, StrategyConfig, masked_cross_entropy
from clbench.strategies._joint_replay import JointReplayStrategy
from clbench.validation import bounded


@dataclass
class ERACEConfig(NormOptions, StrategyConfig):
    name: str = "er_ace"
    buffer_size: int = bounded(500, ge=0)  # reservoir buffer (AdaB2N's Split CIFAR-10 settings: 500 and 2000)
    replay_batch_size: Optional[int] = bounded(None, ge=1)  # buffer samples per step (default: train.batch_size, as the code)
    unseen_logits: bool = False  # true: the released codes' masks (see the module docstring)


@register_strategy("er_ace", config=ERACEConfig,
                   description="ER-ACE: replay with asymmetric cross-entropy (one joint forward; norm bn|adab2n)")
class ERACE(JointReplayStrategy):
    """ER-ACE on one joint forward of incoming + buffer samples; BatchNorm or AdaB2N."""

    cfg: ERACEConfig

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        self.seen = torch.zeros(ctx.stream.num_classes, dtype=torch.bool, device=ctx.device)
        self._n_incoming = 0

    def prepare_batch(self, batch: Batch, ctx: Context) -> Batch:
        self._n_incoming = len(batch)
        if len(self.buffer) == 0:
            return batch
        stored = self.buffer.sample(self.cfg.replay_batch_size or len(batch))
        return batch.cat(Batch(stored["x"], stored["y"], stored["task"]))

    def loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        n = self._n_incoming
        logits = output.float()
        y_in = batch.y[:n]
        self.seen[y_in] = True
        allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        allowed[y_in] = True  # the classes present in the incoming batch
        if self.cfg.unseen_logits:
            ids = torch.arange(logits.shape[1], device=logits.device)
            allowed |= ids >= (ids * self.seen).max()  # mask[:, seen_so_far.max():] = 1
        loss_in = F.cross_entropy(logits[:n].masked_fill(~allowed, float("-inf")), y_in)
        loss = loss_in
        terms = {"ce_incoming": loss_in}
        if logits.shape[0] > n:
            buf_allowed = (torch.ones_like(ctx.class_mask[batch.task[n:]]) if self.cfg.unseen_logits
                           else ctx.class_mask[batch.task[n:]])
            loss_buf = masked_cross_entropy(logits[n:], batch.y[n:], buf_allowed)
            loss = loss + loss_buf
            terms["ce_buffer"] = loss_buf
        return self.total_loss(loss, terms, ctx)

    def after_step(self, batch: Batch, ctx: Context) -> None:
        self.buffer.add(x=batch.x, y=batch.y, task=batch.task)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seen = state["seen"].to(self.seen.device)
