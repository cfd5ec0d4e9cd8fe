"""What ER-ACE and DER++ share for the AdaB2N comparison (Lyu et al., NeurIPS 2023): BatchNorm or
AdaB2N (:class:`clbench.norms.NormControl`), a reservoir buffer, ONE joint forward of incoming and
buffer samples whichever the norm (or, ``replay_forward=separate`` with BN, one forward per part
as mammoth's ``er_ace.py``/``derpp.py``), and AdaB2N's regulariser added to the loss.  Not a registered
strategy (a module starting with ``_`` is not scanned by the registry)."""

from __future__ import annotations

from typing import Any

import torch

from clbench.buffers import ReservoirBuffer
from clbench.norms import NormControl
from clbench.registry import ClbenchError
from clbench.strategy import Batch, Context, Strategy


def merge_single_samples(sizes: list[int]) -> list[int]:
    """Part sizes for separate forwards, a part of ONE sample joined to the next part (to the
    previous one if it is the last): BatchNorm cannot normalise a single sample where the feature
    map is 1x1.  With CIFAR-10 under the released protocol (batches and draws of 10) it never
    happens; it does for the last incoming batch of an experience on small data (the digits)."""
    out: list[int] = []
    carry = 0
    for s in sizes:
        s += carry
        carry = 0
        if s == 1:
            carry = 1
        else:
            out.append(s)
    if carry:
        if out:
            out[-1] += carry
        else:
            out.append(carry)
    return out


class JointReplayStrategy(Strategy):
    """Base of :class:`clbench.strategies.er_ace.ERACE` and :class:`clbench.strategies.der.DERPP`; ``cfg`` is a
    :class:`clbench.norms.NormOptions` with a ``buffer_size``."""

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        if self.cfg.replay_forward == "separate" and self.cfg.norm != "bn":
            raise ClbenchError("replay_forward=separate is the BN baseline of the released code; use norm=bn "
                             "(AdaB2N weighs tasks within one joint batch)")
        self.norm = NormControl(self.cfg)
        self.norm.setup(model, ctx.stream.n_tasks)
        self.buffer = ReservoirBuffer(self.cfg.buffer_size, seed=ctx.seed)
        self.last_terms: dict[str, torch.Tensor] = {}  # the loss terms of the last step (tests, debugging)

    def segments(self) -> list[int]:
        """Sizes of the parts of the prepared batch (incoming first, then the buffer draws)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        """The joint forward; with AdaB2N each sample's task weights its batch statistics.
        ``replay_forward=separate``: one forward per part (:meth:`segments`), in order."""
        if self.cfg.replay_forward == "separate":
            sizes = merge_single_samples([s for s in self.segments() if s])
            if len(sizes) > 1:
                return torch.cat([self.model(part) for part in torch.split(x, sizes)])
        return self.norm.forward(self.model, x, batch.task, ctx.stream[ctx.experience].task_id)

    def total_loss(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
        """``loss`` plus AdaB2N's ``lambda`` term when it applies; records ``terms`` (and ``norm``)."""
        penalty = self.norm.penalty(self.model, ctx.experience)
        if penalty is not None:
            loss = loss + penalty
            terms["norm"] = penalty
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
