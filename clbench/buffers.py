"""Replay memory: one reservoir buffer used by ER, ER-ACE, DER++ and friends.

Reservoir sampling (Vitter 1985; as used for experience replay by Chaudhry et al. 2019,
"On Tiny Episodic Memories in Continual Learning"): the n-th sample of the stream (0-based)
is stored if n < capacity, otherwise it replaces slot r ~ U{0..n} when r < capacity, so every
sample seen so far is in the buffer with equal probability capacity / n_seen.  A batch is
inserted in one vectorised step with the same outcome as inserting its samples one by one
(later samples win when two pick the same slot).
"""

from __future__ import annotations

from typing import Any

import torch


class ReservoirBuffer:
    """A fixed-capacity reservoir of named tensors (e.g. ``x`` uint8 images, ``y``, ``task``, ``logits``)."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 0:
            raise ValueError(f"buffer capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.n_seen = 0
        self.data: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return min(self.n_seen, self.capacity)

    def add(self, **tensors: torch.Tensor) -> None:
        """Offer a batch of samples (all tensors share the first dimension) to the reservoir."""
        b = next(iter(tensors.values())).shape[0]
        if self.capacity == 0 or b == 0:
            self.n_seen += b
            return
        if not self.data:
            self.data = {k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in tensors.items()}
        positions = torch.arange(self.n_seen, self.n_seen + b)
        draws = (torch.rand(b, generator=self.generator, dtype=torch.float64) * (positions + 1)).long()
        slots = torch.where(positions < self.capacity, positions, draws)
        keep = slots < self.capacity
        order = torch.arange(b)
        last = torch.full((self.capacity,), -1, dtype=torch.long)
        last.scatter_reduce_(0, slots[keep], order[keep], reduce="amax")
        winners = keep & (last[slots.clamp(max=self.capacity - 1)] == order)
        src, dst = order[winners], slots[winners]
        for k, v in tensors.items():
            store = self.data[k]
            store[dst.to(store.device)] = v[src.to(v.device)].to(store.dtype)
        self.n_seen += b

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` distinct stored samples chosen uniformly (all of them if fewer are stored)."""
        size = len(self)
        idx = torch.randperm(size, generator=self.generator)[: min(n, size)]
        return {k: v[idx.to(v.device)] for k, v in self.data.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "n_seen": self.n_seen, "data": self.data,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.capacity, self.n_seen = state["capacity"], state["n_seen"]
        self.data = dict(state["data"])
        self.generator.set_state(state["generator"])
