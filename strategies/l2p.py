"""L2P: Learning to Prompt (Wang et al., CVPR 2022, "Learning to Prompt for Continual Learning").

A frozen pretrained ViT, a pool of M prompts P_m with keys k_m, and a linear head.  Query
q(x) = the [CLS] feature of the frozen ViT without prompts (a first forward, no grad).  The
top-N keys by cosine similarity (L2P Eq. 3, gamma(q, k) = 1 - cos) select N prompts, which
are given to the ViT (a second forward); the head sees the pooled features.  Loss (L2P
Eq. 5): CE + lambda * sum_i gamma(q(x), k_{s_i}) -- the "pull" of the selected keys
towards the query (the query is detached); we take the mean over the selected keys and the
batch (coefficient 1); the CODA code sums instead (``key_loss_reduction``, below).

Defaults: **L2P++** as benchmarked in the CODA-Prompt paper and code (``GT-RIPL/CODA-Prompt``
``models/zoo.py`` ``L2P``, ``prompt_param 30 20 -1``): prefix-tuning, pool 30, length 20
(10 key + 10 value tokens), top-5, prompts in block 0 only (``layers: [0, 1, 2, 3, 4]`` is
"Deep L2P++"), [CLS] features.  The original L2P (``google-research/l2p``
``configs/cifar100_l2p.py``): ``mode: tokens``, ``pool_features: prompt`` (the head sees the
mean of the prompt tokens' outputs), pool 10, length 10 (the paper's 5 is recalled,
UNVERIFIED), top-4 -- see ``configs/repro/l2p_original_imagenet_r.yaml``.

Parity options with the JAX code (``google-research/l2p`` @ dd8836e, ``models/prompt.py``,
``models/vit.py``), off by default, on in the repro config:

* ``batchwise_prompt`` (``configs/cifar100_l2p.py``: true): in training and inference every
  sample of a batch uses the same ``top_k`` prompts -- the ``top_k`` most frequent ids among the
  batch's per-sample top-k selections (ties: the smaller id, as ``jnp.unique`` + ``lax.top_k``);
  the pull constraint then pulls each query towards those keys.
* ``prompt_init_scale: 0.01``: prompts and keys ~ U(0, 0.01) (flax ``nn.initializers.uniform()``;
  default 1: U(0, 1), the CODA code's).
* ``zero_head``: the head's weight and bias start at zero (``kernel_init=zeros``).

Parity flag: ``key_loss_gather`` reproduces the CODA code's key loss
``(1 - cos_sim[:, k_idx]).mean()``: ``cos_sim[:, k_idx]`` is a ``[B, B, N]`` gather, so each
sample's query is pulled towards the keys *every* sample of the batch selected.  By default
each query is pulled only towards its own selected keys (the paper's Eq. 5).  ``key_loss_reduction``:
``mean`` (default) or ``sum`` -- the CODA code **sums** (``(1.0 - cos_sim[:, k_idx]).sum()``, over
B x B x top_k terms), it does not average as an earlier version of this docstring said; with Adam and a
detached query only the keys get this gradient, so the scale barely changes training.  The CODA-code mode
(``key_loss_gather: true, key_loss_reduction: sum``) equals the released ``L2P`` module (L2P++) to float
precision (``tests/test_reference_prompts.py``, golden from ``tools/reference/coda_prompt.py``).

``key_sharing``: ``shared`` (default; one key set selects the prompts for every prompted block, as in the
paper and the JAX code) or ``per_layer`` (the CODA code's ``L2P`` with ``prompt_param[2] > 0``, "Deep
L2P++": each of blocks 0-4 has its own keys ``e_k_<l>``, selects its own top-k prompts and adds its own key
loss).  With ``layers: [0]`` (L2P++) the two are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from clbench.prompts import LayerPrompts, PromptConfig, PromptPool, PromptStrategy, cosine_to_keys, zero_head_
from clbench.registry import ClbenchError, register_strategy
from clbench.validation import bounded, choice, require


@dataclass
class L2PConfig(PromptConfig):
    name: str = "l2p"
    pool_size: int = bounded(30, ge=1)  # M
    length: int = bounded(20, ge=1)  # L (prefix: L/2 key + L/2 value tokens)
    top_k: int = bounded(5, ge=1)  # N prompts selected per sample
    layers: List[int] = bounded(default_factory=lambda: [0], ge=0)  # [0]: L2P++; [0..4]: Deep L2P++
    mode: str = choice("prefix", "prefix", "tokens")  # prefix (L2P++) | tokens (original L2P: prompt-tuning)
    pool_features: str = choice("cls", "cls", "prompt")  # cls | prompt (original L2P: mean of the prompt tokens' outputs)
    key_loss_weight: float = bounded(1.0, ge=0)  # lambda of the pull constraint
    key_loss_gather: bool = False  # parity: CODA code's cos_sim[:, k_idx] (B x B x N) key loss
    key_loss_reduction: str = choice("mean", "mean", "sum")  # mean (paper Eq. 5 as a mean) | sum (CODA code)
    key_sharing: str = choice("shared", "shared", "per_layer")  # shared (paper, JAX) | per_layer (CODA code's Deep L2P++: keys per block)
    batchwise_prompt: bool = False  # parity (JAX L2P): the batch's top_k most frequent prompts for every sample
    prompt_init_scale: float = bounded(1.0, gt=0)  # prompts and keys ~ U(0, scale) (JAX code: 0.01; CODA code: 1)
    zero_head: bool = False  # parity (JAX code): zero-initialised head

    def validate(self) -> None:
        require(self.top_k <= self.pool_size,
                f"strategy.top_k must be in [1, pool_size={self.pool_size}], got {self.top_k}")


def select_top_k(q: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities ``[B, M]`` of queries to keys and the indices ``[B, k]`` of the top k."""
    cos = cosine_to_keys(q, keys)
    return cos, cos.topk(k, dim=1).indices


def batchwise_top_k(idx: torch.Tensor, pool_size: int) -> torch.Tensor:
    """The ``k`` most frequent ids of the per-sample selections ``idx`` ``[B, k]``, for every sample
    (``[B, k]``); ties go to the smaller id (JAX L2P ``batchwise_prompt``)."""
    counts = torch.bincount(idx.flatten(), minlength=pool_size)
    order = torch.argsort(-counts * (pool_size + 1) + torch.arange(pool_size, device=counts.device))
    return order[: idx.shape[1]].unsqueeze(0).expand(idx.shape[0], -1)


def key_loss(cos: torch.Tensor, idx: torch.Tensor, gather_all: bool = False, reduction: str = "mean") -> torch.Tensor:
    """mean (or sum) of 1 - cos(q_b, k_{idx[b, j]}); ``gather_all``: the CODA code's ``cos[:, idx]`` over all b'."""
    sel = cos[:, idx] if gather_all else cos.gather(1, idx)
    return (1 - sel).sum() if reduction == "sum" else (1 - sel).mean()


@register_strategy("l2p", config=L2PConfig,
                   description="L2P / L2P++: prompt pool with key-query top-k selection (frozen ViT)")
class L2P(PromptStrategy):
    """Prompt pool + key-query selection; see the module docstring."""

    cfg: L2PConfig

    def setup(self, model, ctx) -> None:
        self.mode, self.pool = self.cfg.mode, self.cfg.pool_features
        if not 1 <= self.cfg.top_k <= self.cfg.pool_size:
            raise ClbenchError(f"strategy.top_k must be in [1, pool_size={self.cfg.pool_size}], got {self.cfg.top_k}")
        super().setup(model, ctx)
        if self.cfg.zero_head:
            zero_head_(model.head)

    def build_prompt(self, dim: int, n_tasks: int) -> nn.Module:
        return PromptPool(self.cfg.layers, self.cfg.pool_size, self.cfg.length, dim, key_dim=dim,
                          init_scale=self.cfg.prompt_init_scale, key_per_layer=self.cfg.key_sharing == "per_layer")

    def selections(self, q: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per key set (one, or one per prompted block): cosines ``[B, M]`` and the selected ids ``[B, k]``."""
        out = []
        for keys in self.prompt.all_keys():
            cos, idx = select_top_k(q, keys, self.cfg.top_k)
            if self.cfg.batchwise_prompt:
                idx = batchwise_top_k(idx, self.cfg.pool_size)
            out.append((cos, idx))
        return out

    def prompts_for(self, q, batch_size, task, train) -> tuple[LayerPrompts, torch.Tensor | None]:
        sel = self.selections(q)
        aux = self.cfg.key_loss_weight * sum(key_loss(cos, idx, self.cfg.key_loss_gather, self.cfg.key_loss_reduction)
                                             for cos, idx in sel) if train else None
        if len(sel) == 1:
            return self.prompt.select(sel[0][1]), aux
        p = self.prompt.all_prompts()  # per_layer: block j uses the prompts its own keys picked
        return {layer: p[j][sel[j][1]] for j, layer in enumerate(self.prompt.layers)}, aux
