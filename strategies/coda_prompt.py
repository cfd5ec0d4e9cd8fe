"""CODA-Prompt (Smith et al., CVPR 2023, "CODA-Prompt: COntinual Decomposed Attention-based
Prompting for Rehearsal-Free Continual Learning"); code ``GT-RIPL/CODA-Prompt`` @ 6417d4f,
``models/zoo.py`` ``CodaPrompt``.

In each prompted block l a pool of M prompt *components* P_m (``[L, D]``), keys K_m and
attention vectors A_m (``[D]``); the prompt is a weighted sum with no selection (Eq. 3-4)::

    alpha_m = cos(q(x) * A_m, K_m),    p(x) = sum_m alpha_m P_m

q(x) = the [CLS] feature of the frozen ViT without prompts (first forward, no grad); p(x) is
given by prefix-tuning (second forward).  The pool grows by M / T components per task: task t
uses components ``[0, (t+1) M/T)``, those of earlier tasks are **detached** (frozen: they get no
gradient and are not in the optimiser), later ones are unused.  At the start of every task its
new components (P flattened to ``L*D``, K and A) are re-drawn from N(0, I) and
Gram-Schmidt-orthonormalised against the existing ones (``process_task_count``; the code's
README: this replaced the paper's orthogonality penalty, whose weight ``ortho_mu`` is 0 --
available here as the mean-squared ``||X X^T - I||`` of K, A and P, Eq. 5).

Defaults: ``prompt_param 100 8 0.0``: M = 100, L = 8 (4 key + 4 value tokens), blocks 0-4.

Parity flag ``gram_schmidt``: ``exact`` (default) orthonormalises the new components against the
*span* of the old ones; ``released`` is the code's loop, which subtracts the projections
``(v.u_j / u_j.u_j) u_j`` onto each old component separately -- exact only if the old ones are
still mutually orthogonal, which training breaks, so its new components are not quite
orthogonal to the old span.

Parity with the released code (``GT-RIPL/CODA-Prompt`` @ 6417d4f): ``tests/test_reference_prompts.py`` runs
the official ``CodaPrompt`` module and ``Prompt.update_model`` (golden from ``tools/reference/coda_prompt.py``)
and finds the composition weights, logits, losses (with and without ``ortho_mu``), gradients and Adam updates
equal to float precision, and ``gram_schmidt: released`` equal to ``process_task_count`` given the same draws.
The released recipe: ``configs/repro/coda_prompt_imagenet_r.yaml`` (``train.scheduler: coda_cosine``, the
code's ``CosineSchedule``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from clbench.prompts import LayerPrompts, PromptConfig, PromptPool, PromptStrategy
from clbench.registry import ClbenchError, register_strategy
from clbench.scenarios.base import seeded_generator
from clbench.validation import bounded, choice


@dataclass
class CodaPromptConfig(PromptConfig):
    name: str = "coda_prompt"
    pool_size: int = bounded(100, ge=1)  # M components in total (M / n_tasks new ones per task)
    length: int = bounded(8, ge=1)  # L
    layers: List[int] = bounded(default_factory=lambda: [0, 1, 2, 3, 4], ge=0)
    ortho_mu: float = bounded(0.0, ge=0)  # orthogonality penalty weight (0 in the released code)
    gram_schmidt: str = choice("exact", "exact", "released")  # exact | released (parity: per-vector projections onto old components)


def gram_schmidt(old: torch.Tensor, n_new: int, generator: torch.Generator | None, released: bool = False,
                 draws: torch.Tensor | None = None) -> torch.Tensor:
    """``n_new`` unit vectors drawn from N(0, I) and orthogonalised against the rows of ``old``
    ``[s, n]`` and each other (``released``: the CODA code's loop, see module doc).  ``draws``: the
    ``[n_new, n]`` Gaussian vectors to use instead of drawing them (reference tests)."""
    s, n = old.shape
    if s + n_new > n:
        raise ClbenchError(f"CODA-Prompt: {s + n_new} components of dimension {n} cannot be orthogonal; "
                           "lower strategy.pool_size or give the ViT a larger embedding")
    if draws is None:
        draws = torch.randn(n_new, n, generator=generator, dtype=torch.float64)
    draws = draws.detach().double().cpu()
    old64 = old.detach().double().cpu()
    out = []
    if released:
        basis = list(old64)
        for v in draws:
            u = v - sum(((v @ b) / (b @ b)) * b for b in basis) if basis else v
            basis.append(u)
            out.append(u)
    else:
        q = torch.linalg.qr(old64.t()).Q if s else old64.new_zeros(n, 0)  # orthonormal basis of the old span
        for v in draws:
            for _ in range(2):  # twice is enough (Giraud et al. 2005)
                v = v - q @ (q.t() @ v)
                for u in out:
                    v = v - (u @ v) * u
            out.append(v / v.norm())
    new = torch.stack(out)
    new = new / new.norm(dim=1, keepdim=True)
    return new.to(old.dtype)


def ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    """mean((X X^T - I)^2) of the rows of ``t`` (flattened)."""
    t = t.reshape(t.shape[0], -1)
    return ((t @ t.t() - torch.eye(t.shape[0], device=t.device, dtype=t.dtype)) ** 2).mean()


@register_strategy("coda_prompt", config=CodaPromptConfig,
                   description="CODA-Prompt: attention-weighted sum of prompt components (frozen ViT)")
class CodaPrompt(PromptStrategy):
    """Decomposed, attention-weighted prompts; see the module docstring."""

    cfg: CodaPromptConfig

    def setup(self, model, ctx) -> None:
        if self.cfg.gram_schmidt not in ("exact", "released"):
            raise ClbenchError(f"strategy.gram_schmidt must be 'exact' or 'released', got '{self.cfg.gram_schmidt}'")
        super().setup(model, ctx)

    def build_prompt(self, dim: int, n_tasks: int) -> nn.Module:
        if self.cfg.pool_size % n_tasks:
            raise ClbenchError(f"strategy.pool_size={self.cfg.pool_size} must be a multiple of the {n_tasks} tasks")
        return PromptPool(self.cfg.layers, self.cfg.pool_size, self.cfg.length, dim,
                          key_dim=dim, key_per_layer=True, attention=True, chunks=n_tasks)

    def before_experience(self, exp, ctx) -> None:
        super().before_experience(exp, ctx)
        self.orthogonalise(self.task, ctx.seed)

    @torch.no_grad()
    def orthogonalise(self, task: int, seed: int, draws: dict[str, torch.Tensor] | None = None) -> None:
        """Re-draw task ``task``'s components, orthonormal to those of tasks ``< task`` (per block).
        ``draws``: ``{"p"|"k"|"a": [n_layers, M/T, dim]}`` Gaussian vectors to use instead (reference tests)."""
        pool: PromptPool = self.prompt
        released = self.cfg.gram_schmidt == "released"
        for j in range(len(pool.layers)):
            for name, plist in (("p", pool.prompts), ("k", pool.keys), ("a", pool.attn)):
                old = torch.cat([plist[c][j].reshape(pool.chunk, -1) for c in range(task)]) if task else \
                    plist[task][j].new_zeros(0, plist[task][j][0].numel())
                g = seeded_generator(seed, 106, task, j, ord(name))
                new = gram_schmidt(old, pool.chunk, g, released, None if draws is None else draws[name][j])
                plist[task][j].copy_(new.reshape(plist[task][j].shape))

    def trainable_prompt_parameters(self) -> list[nn.Parameter]:
        return self.prompt.chunk_parameters(self.task)

    def components(self, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P ``[n_layers, M', L, D]``, K and A ``[n_layers, M', D]`` of tasks ``<= current``; old ones detached."""
        upto, frozen = self.task + 1, self.task if train else self.task + 1
        pool: PromptPool = self.prompt
        return (pool.all_prompts(upto, frozen), pool.all_keys(upto, frozen), pool.all_attention(upto, frozen))

    @staticmethod
    def weights(q: torch.Tensor, k: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """alpha ``[B, layers, M']`` = cos(q * A_m, K_m) per block (Eq. 3; the CODA code's ``aq_k``)."""
        qn = nn.functional.normalize(q[:, None, None, :] * a[None], dim=-1)  # [B, layers, M', D]
        return (qn * nn.functional.normalize(k, dim=-1)[None]).sum(-1)

    def prompts_for(self, q, batch_size, task, train) -> tuple[LayerPrompts, torch.Tensor | None]:
        p, k, a = self.components(train)
        alpha = self.weights(q, k, a)
        prompt = torch.einsum("blm,lmxd->blxd", alpha, p)  # [B, layers, L, D]
        out = {layer: prompt[:, j, None] for j, layer in enumerate(self.prompt.layers)}
        aux = None
        if train and self.cfg.ortho_mu > 0:
            aux = self.cfg.ortho_mu * sum(ortho_penalty(t[j]) for t in (p, k, a) for j in range(t.shape[0]))
        return out, aux
