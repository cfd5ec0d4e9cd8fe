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
``strategy.replay_start=second_task`` reproduces together with the rest of that first task
(``ada_t0=1`` alone only drops the term).

``unseen_logits=true`` reproduces the released codes' masks: the incoming CE also keeps every
class id >= the largest class seen so far (``mask[:, seen.max():] = 1``, "unmask unseen
classes", only while that is not the last class id, as the code's ``if seen_so_far.max() <
num_classes - 1``), and the buffer CE runs over all logits, seen or not.

Parity switches with the released AdaB2N code (``lvyilin/AdaB2N`` @ 9aaba7e, ``models/er_ace.py``
for BN, ``models/er_ace_ada.py`` for AdaB2N; checked against it by
``tests/test_reference_adab2n.py``):

* ``replay_start``: ``buffer`` (default; the ER-ACE paper's task-free code ``pclucas14/AML``
  ``methods/er_ace.py``) replays as soon as the buffer holds samples, with the ACE mask from the
  first step; ``second_task`` (mammoth's ``er_ace.py``/``er_ace_ada.py``: ``if self.task > 0``)
  trains the first experience on the incoming batch alone with a plain CE over ALL logits (no
  mask, no replay, no AdaB2N term whatever ``ada_t0``; the buffer still fills), from the second
  experience on as above.
* ``replay_forward``: ``joint`` (default; ``er_ace_ada.py``'s batching) or ``separate``: the
  incoming and the buffer batch through the model in two forwards, incoming first, as
  mammoth's BN ``er_ace.py`` (so BN normalises and updates its running statistics per part;
  the paper's BN rows were run that way).  ``norm=bn`` only; a part of a single sample joins the next part
  (:func:`clbench.strategies._joint_replay.merge_single_samples`).
* ``norm=adab2n`` with ``adab2n_variant=released``, ``ada_t0`` (the released run.py sweeps
  {0, 1}), ``kappa``, ``lambda_``: see :mod:`clbench.norms`.
* The cosine classifier of the ER-ACE paper's code (``distLinear``, scale 10) is a model option,
  ``model.classifier=cosine`` (``model.cosine_scale``); AdaB2N's mammoth code uses the linear head.

``configs/repro/adab2n_online_cifar10_er_ace.yaml`` sets these to the released code's values.
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
from clbench.validation import bounded, choice


@dataclass
class ERACEConfig(NormOptions, StrategyConfig):
    name: str = "er_ace"
    buffer_size: int = bounded(500, ge=0)  # reservoir buffer (AdaB2N's Split CIFAR-10 settings: 500 and 2000)
    replay_batch_size: Optional[int] = bounded(None, ge=1)  # buffer samples per step (default: train.batch_size, as the code)
    unseen_logits: bool = False  # true: the released codes' masks (see the module docstring)
    # buffer: replay from the first step (AML code) | second_task: first experience plain CE, no replay (mammoth)
    replay_start: str = choice("buffer", "buffer", "second_task")


@register_strategy("er_ace", config=ERACEConfig,
                   description="ER-ACE: replay with asymmetric cross-entropy (one joint forward; norm bn|adab2n)")
class ERACE(JointReplayStrategy):
    """ER-ACE on one joint forward of incoming + buffer samples; BatchNorm or AdaB2N."""

    cfg: ERACEConfig

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        self.seen = torch.zeros(ctx.stream.num_classes, dtype=torch.bool, device=ctx.device)
        self._n_incoming = self._n_total = 0

    def _first_task_plain(self, ctx: Context) -> bool:
        return self.cfg.replay_start == "second_task" and ctx.experience == 0

    def segments(self) -> list[int]:
        return [self._n_incoming, self._n_total - self._n_incoming]

    def prepare_batch(self, batch: Batch, ctx: Context) -> Batch:
        self._n_incoming = self._n_total = len(batch)
        if len(self.buffer) == 0 or self._first_task_plain(ctx):
            return batch
        stored = self.buffer.sample(self.cfg.replay_batch_size or len(batch))
        self._n_total += len(stored["y"])
        return batch.cat(Batch(stored["x"], stored["y"], stored["task"]))

    def loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        n = self._n_incoming
        logits = output.float()
        y_in = batch.y[:n]
        self.seen[y_in] = True
        allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        allowed[y_in] = True  # the classes present in the incoming batch
        if self._first_task_plain(ctx):  # mammoth: no mask while self.task == 0
            allowed[:] = True
        elif self.cfg.unseen_logits:
            ids = torch.arange(logits.shape[1], device=logits.device)
            top = (ids * self.seen).max()
            if top < logits.shape[1] - 1:  # if seen_so_far.max() < num_classes - 1
                allowed |= ids >= top  # mask[:, seen_so_far.max():] = 1
        loss_in = F.cross_entropy(logits[:n].masked_fill(~allowed, float("-inf")), y_in)
        loss = loss_in
        terms = {"ce_incoming": loss_in}
        if logits.shape[0] > n:
            buf_allowed = (torch.ones_like(ctx.class_mask[batch.task[n:]]) if self.cfg.unseen_logits
                           else ctx.class_mask[batch.task[n:]])
            loss_buf = masked_cross_entropy(logits[n:], batch.y[n:], buf_allowed)
            loss = loss + loss_buf
            terms["ce_buffer"] = loss_buf
        if self._first_task_plain(ctx):  # er_ace_ada.py: no AdaB2N term either while self.task == 0
            self.norm.penalty(self.model, ctx.experience)  # consumed, not added
            self.last_terms = {k: v.detach() for k, v in terms.items()}
            return loss
        return self.total_loss(loss, terms, ctx)

    def after_step(self, batch: Batch, ctx: Context) -> None:
        self.buffer.add(x=batch.x, y=batch.y, task=batch.task)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seen": self.seen.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.seen = state["seen"].to(self.seen.device)
