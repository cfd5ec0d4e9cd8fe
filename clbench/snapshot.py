"""Weight snapshots for evaluation overlapped with training (``eval.overlap``).

To evaluate iteration t while iteration t+1 already trains, the evaluator copies every
parameter and buffer the strategy owns into a pre-allocated shadow set (one device copy on the
training stream), then, while it *enqueues* the evaluation kernels, points each live tensor
at its shadow (``tensor.data = shadow``) and back.  Kernels capture the addresses they read
when they are launched, so the queued evaluation reads the weights of iteration t however far
the training stream has moved on; ``strategy.predict`` needs no change.

What is covered: the parameters and buffers of every ``nn.Module`` the strategy holds as an
attribute (directly, or in a list/tuple/dict attribute), its model included.  A strategy whose
``predict`` reads a *plain* tensor attribute that ``after_step`` changes in place must register
it as a module buffer; tensors changed only in ``before_experience``/``after_experience`` are
safe (the evaluator drains pending evaluations before those hooks run).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


def strategy_modules(strategy: Any) -> list[nn.Module]:
    """The ``nn.Module`` attributes of ``strategy`` (one level into lists, tuples and dicts)."""
    found: list[nn.Module] = []
    for value in vars(strategy).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        found.extend(v for v in items if isinstance(v, nn.Module))
    return found


def live_tensors(strategy: Any) -> list[torch.Tensor]:
    """Every parameter and buffer of the strategy's modules, each once."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for module in strategy_modules(strategy):
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


class WeightSnapshot:
    """One shadow copy of a strategy's tensors (reallocated when their shapes change, e.g. a
    head that grows)."""

    def __init__(self) -> None:
        self.shadow: list[torch.Tensor] = []

    @torch.no_grad()
    def capture(self, live: list[torch.Tensor]) -> None:
        """Copy ``live`` into the shadow tensors (queued on the current stream)."""
        if [(t.shape, t.dtype, t.device) for t in self.shadow] != [(t.shape, t.dtype, t.device) for t in live]:
            self.shadow = [torch.empty_like(t, memory_format=torch.preserve_format) for t in live]
        if live:
            torch._foreach_copy_(self.shadow, [t.detach() for t in live])

    @contextmanager
    def swapped_in(self, live: list[torch.Tensor]) -> Iterator[None]:
        """While the block runs, ``live`` tensors read the snapshot's storage."""
        originals = [t.data for t in live]
        try:
            for t, s in zip(live, self.shadow):
                t.data = s
            yield
        finally:
            for t, o in zip(live, originals):
                t.data = o
