"""MVP: Mask and Visual Prompt tuning (Moon et al., ICCV 2023, "Online Continual Learning on
Stochastic Blurry Task Boundary via Mask and Visual Prompt Tuning"), for the online Si-Blurry
protocol (``train.online=true``, :mod:`clbench.engine`).

A frozen timm ViT + a trainable linear head, a G-prompt (length 5, blocks 0-1, shared) and an
E-prompt pool of 10 (length 20, blocks 2-4), each E-prompt with a key ``k_m`` and a learnable
logit mask ``mask_m`` (one value per class, initialised to -1), given to the ViT by prompt-tuning
(tokens, not prefixes).  Query q(x) = [CLS] of the frozen ViT without prompts (a first forward,
no grad).  Formulas from the paper and the official code ``KHU-AGI/Si-Blurry`` @ ``61bd5eb``
(``models/mvp.py``: selection, masks, key loss; ``methods/mvp.py``: ``loss_fn``,
``_compute_grads``, ``_get_ignore``, ``_get_compensation``), re-derived and written anew here:

1. **Contrastive visual prompt tuning** (paper Sec. 4.1, ``use_contrastive``).  Distance
   ``d(a, b) = 1 - cos(a, b)``; the E-prompt of sample b is ``s_b = argmin_m d(q_b, k_m)*(n_m+1)``
   where ``n_m`` counts how often prompt m was selected in training so far (usage scaling,
   "mass"; the counts are a buffer of the prompt module and in :meth:`MVP.state_dict`).  Key
   loss, with ``mu_b = n_{s_b} + 1``::

       L_key = -log( A / (P + A) + 1e-6 ),  P = mean_b exp(d(q_b, k_{s_b}) / mu_b),
                                            A = mean_{b,m} exp(d(k_{s_b}, k_m) / mu_b)

   (pull each query to its key, push the selected key away from the others).  With
   ``use_contrastive: false`` (the code's ``mass = 1``) the selection is plain nearest-key and
   ``L_key = mean_b d(q_b, k_{s_b})``.
2. **Instance-wise logit masking** (Sec. 4.2, ``use_mask``): ``logits * 2*sigmoid(mask_{s_b})``;
   the masks are trained through the cross-entropy.  Classes not exposed yet are masked out
   (-inf) by ``ctx.class_mask`` (the engine's online exposure mask), as the code's ``self.mask``.
3. **Gradient-similarity focal loss** (Sec. 4.3, ``use_gsf``): with ``l_i`` the CE of sample i
   and ``l = mean_i l_i``, ``ign_i = 1 - cos(dl_i/dW_{y_i}, dl/dW_{y_i})`` for the head's weight
   row of the true class, computed in closed form (:func:`gradient_similarity_ignore`, no
   per-sample autograd): for ``z_c = s_c (W_c f + b_c)``, ``dl_i/dz_c = p_ic - [c = y_i]``, so
   ``dl_i/dW_{y_i} = (p_{i y_i} - 1) s_{i y_i} f_i`` and ``dl/dW_c = 1/B sum_j (p_jc - [c = y_j]) s_jc f_j``
   (features, head and mask detached, un-scaled features as in ``_compute_grads``).  Loss
   ``(1 - alpha) CE + alpha * ign^gamma * CE``, alpha 0.5, gamma 2, **per sample** (the paper);
   ``focal_batch_mean: true`` reproduces the released ``loss_fn``, where ``F.nll_loss`` already
   reduced CE to the batch mean, i.e. ``mean_i[(1 - alpha) + alpha ign_i^gamma] * mean_i CE_i``.
4. **Adaptive feature scaling** (Sec. 4.3, ``use_afs``): the training logits are computed on
   ``f_i / (1 - cos(W_{y_i}, f_i) + margin)`` (the factor detached, margin 0.5; the bias is not
   scaled: ``head(f / cps)``), then masked as in 2.  Inference uses the plain features.

Total loss: focal CE + ``key_loss_weight * L_key``.  Inference: the same usage-scaled selection
(the code keeps ``mass`` at test time), logits ``head(f) * 2*sigmoid(mask_s)``; counts are only
updated in training forwards (each of the ``online_iter`` steps counts, as in the code).

Parity flags / choices (defaults = the paper as described in spec §8):

* ``mode: tokens_per_block`` -- the code's ``prompt_tuning``: each block's prompt tokens are
  appended before that block and dropped after it (VPT-Deep); ``tokens`` keeps them through the
  later blocks (prompts.py's prompt-tuning), ``prefix`` is prefix-tuning.
* ``query: cls`` -- the pooled final [CLS] of the frozen ViT (like L2P/DualPrompt here);
  ``penultimate`` is the released script's query (``--use_last_layer`` not passed in
  ``scripts/mvp.sh``: [CLS] after the second-to-last block, no final norm).
* ``contrastive_broadcast: true`` -- the code's ``key_wise_distance[topk] / mass[topk]`` is a
  ``[B,1,M] / [B,1]`` broadcast to ``[B,B,M]`` (each sample's key distances divided by every
  sample's mass; likewise ``distance / mass[topk]`` is ``[B,B]``); default: each sample's own mass.
* ``focal_batch_mean`` -- see 3.
* Released-code parity mode: ``query: penultimate, contrastive_broadcast: true,
  focal_batch_mean: true`` (``mode: tokens_per_block``, gamma 2): equal to the official
  ``models/mvp.py`` + ``methods/mvp.py`` update at every step of a 6-step online case on the
  ViT-Tiny/8 (selection exact; logits, key loss, loss, gradients, parameters to <= 3e-6),
  ``tests/test_reference_mvp.py`` (golden from ``tools/reference/mvp.py``); on in
  ``configs/repro/si_blurry_mvp_tiny_imagenet100.yaml``.
* Initialisation: prompts and keys ``N(0, 1)`` (the code's ``torch.randn``), masks -1.
* ``gamma`` is 2 as in the paper (spec §8) and in the released code: at the official commit
  ``61bd5eb`` (and at ``c90d6d7``) the argparse default is ``--gamma 2.`` in
  ``configuration/config.py`` and ``methods/mvp.py`` takes it unchanged
  (``self.gamma = kwargs.get("gamma")``, no override).  The earlier commit ``2bb41d5`` had the
  default 1.0, also without an override.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

import torch
from torch import nn
from torch.nn import functional as F

from clbench.prompts import (LayerPrompts, PromptConfig, PromptOutput, PromptPool, PromptStrategy, cosine_to_keys,
                             merge_prompts, pool_features, prompted_forward)
from clbench.registry import ClbenchError, register_strategy
from clbench.strategy import Batch, Context
from clbench.validation import bounded, choice


@dataclass
class MVPConfig(PromptConfig):
    name: str = "mvp"
    mask_past_logits: bool = False  # online Si-Blurry: only not-yet-exposed classes are masked (ctx.class_mask)
    g_length: int = bounded(5, ge=1)
    g_layers: List[int] = bounded(default_factory=lambda: [0, 1], ge=0)
    e_length: int = bounded(20, ge=1)
    e_layers: List[int] = bounded(default_factory=lambda: [2, 3, 4], ge=0)
    e_pool_size: int = bounded(10, ge=1)
    mode: str = choice("tokens_per_block", "tokens_per_block", "tokens", "prefix")  # tokens_per_block (code) | tokens | prefix
    query: str = choice("cls", "cls", "penultimate")  # cls (final pooled [CLS]) | penultimate (released script: [CLS] before the last block, no norm)
    use_mask: bool = True  # instance-wise logit masking
    mask_init: float = -1.0
    use_contrastive: bool = True  # usage-scaled selection + contrastive key loss (false: nearest key, mean distance)
    contrastive_broadcast: bool = False  # parity: the code's [B,B,M] mass broadcast in the key loss
    key_loss_weight: float = bounded(1.0, ge=0)
    use_gsf: bool = True  # gradient-similarity focal loss
    alpha: float = bounded(0.5, ge=0)
    gamma: float = bounded(2.0, ge=0)
    focal_batch_mean: bool = False  # parity: released loss_fn weights the batch-mean CE
    use_afs: bool = True  # adaptive feature scaling
    margin: float = bounded(0.5, ge=0)


# ---------------------------------------------------------------------------- components
def usage_scaled_selection(q: torch.Tensor, keys: torch.Tensor, count: torch.Tensor | None) -> torch.Tensor:
    """``[B]`` indices ``argmin_m (1 - cos(q_b, k_m)) * (count_m + 1)`` (MVP Sec. 4.1; ``models/mvp.py``
    ``scaled_distance``); ``count=None``: plain nearest key."""
    dist = 1 - cosine_to_keys(q.float(), keys.float())
    if count is not None:
        dist = dist * (count.to(dist) + 1)
    return dist.argmin(1)


def contrastive_key_loss(q: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor, mass: torch.Tensor,
                         broadcast: bool = False) -> torch.Tensor:
    """MVP's contrastive key loss ``-log(A / (P + A) + 1e-6)`` (module docstring, item 1).

    ``q`` ``[B, D]`` (detached), ``keys`` ``[M, D]``, ``idx`` ``[B]`` selected keys, ``mass``
    ``[M]`` = count + 1.  ``broadcast``: the released code's ``[B, B(, M)]`` broadcast of the mass.
    """
    q, keys = q.float(), keys.float()
    d_q = 1 - F.cosine_similarity(q, keys[idx], dim=-1)  # [B]
    d_k = 1 - cosine_to_keys(keys[idx], keys)  # [B, M]
    mu = mass.to(d_q)[idx]  # [B]
    if broadcast:
        pos = (d_q[None, :] / mu[:, None]).exp().mean()
        neg = (d_k[None, :, :] / mu[:, None, None]).exp().mean()
    else:
        pos = (d_q / mu).exp().mean()
        neg = (d_k / mu[:, None]).exp().mean()
    return -torch.log(neg / (pos + neg) + 1e-6)


@torch.no_grad()
def gradient_similarity_ignore(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               y: torch.Tensor, allowed: torch.Tensor | None = None,
                               scale: torch.Tensor | None = None) -> torch.Tensor:
    """``[B]`` ``ign_i = 1 - cos(dl_i/dW_{y_i}, dl_mean/dW_{y_i})`` in closed form (MVP Sec. 4.3).

    Logits ``z = scale * (f W^T + b)`` with not-allowed classes at -inf; CE ``l_i``, ``l = mean_i l_i``.
    ``e_ic = dl_i/dz_ic * dz_ic/d(W_c f_i) = (p_ic - [c = y_i]) * scale_ic``, hence
    ``dl_i/dW_{y_i} = e_{i y_i} f_i`` and ``dl/dW_c = 1/B sum_j e_jc f_j``.
    """
    f, w = feats.float(), weight.float()
    z = f @ w.t()
    if bias is not None:
        z = z + bias.float()
    s = torch.ones_like(z) if scale is None else scale.float()
    z = z * s
    if allowed is not None:
        z = z.masked_fill(~allowed, float("-inf"))
    e = (z.softmax(1) - F.one_hot(y, z.shape[1]).to(z)) * s  # [B, C]
    sample = e.gather(1, y[:, None]) * f  # [B, D]
    batch = (e.t() @ f / f.shape[0])[y]  # [B, D]
    return 1 - F.cosine_similarity(sample, batch, dim=1)


def focal_weights(ign: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """``(1 - alpha) + alpha * ign^gamma``: the per-sample factor of the CE (MVP Sec. 4.3)."""
    return (1 - alpha) + alpha * ign.clamp_min(0) ** gamma


@torch.no_grad()
def afs_factor(feats: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """``[B]`` ``1 - cos(W_{y_i}, f_i) + margin``; AFS divides the features by it (MVP Sec. 4.3,
    ``methods/mvp.py`` ``_get_compensation``)."""
    return 1 - F.cosine_similarity(weight.float()[y], feats.float(), dim=1) + margin


# ---------------------------------------------------------------------------- prompt module
class MVPModule(nn.Module):
    """G-prompt, the E-prompt pool with keys, the per-prompt logit masks and the usage counts."""

    def __init__(self, cfg: MVPConfig, dim: int, num_classes: int):
        super().__init__()
        self.g = PromptPool(cfg.g_layers, 1, cfg.g_length, dim) if cfg.g_layers and cfg.g_length else None
        self.e = PromptPool(cfg.e_layers, cfg.e_pool_size, cfg.e_length, dim, key_dim=dim)
        for p in self.parameters():  # the code's torch.randn initialisation
            nn.init.normal_(p)
        self.mask = nn.Parameter(torch.full((cfg.e_pool_size, num_classes), float(cfg.mask_init)))
        self.register_buffer("count", torch.zeros(cfg.e_pool_size))


@dataclass
class MVPOutput(PromptOutput):
    """:class:`PromptOutput` plus what the MVP loss needs."""

    features: torch.Tensor | None = None  # prompted [CLS] features [B, D]
    scale: torch.Tensor | None = None  # 2*sigmoid(mask_s) [B, C] (None without use_mask)


@register_strategy("mvp", config=MVPConfig,
                   description="MVP (Si-Blurry): usage-scaled E-prompts, instance-wise logit masks, "
                               "gradient-similarity focal loss, adaptive feature scaling (frozen ViT)")
class MVP(PromptStrategy):
    """Mask and Visual Prompt tuning; see the module docstring."""

    cfg: MVPConfig
    prompt: MVPModule

    def setup(self, model: nn.Module, ctx: Context) -> None:
        c = self.cfg
        self.mode = c.mode
        if c.query not in ("cls", "penultimate"):
            raise ClbenchError(f"strategy.query must be 'cls' or 'penultimate', got '{c.query}'")
        if c.vor:
            raise ClbenchError("strategy.vor is not supported by mvp (set strategy.vor=false)")
        if c.e_pool_size < 1:
            raise ClbenchError(f"strategy.e_pool_size must be >= 1, got {c.e_pool_size}")
        super().setup(model, ctx)

    def build_prompt(self, dim: int, n_tasks: int) -> nn.Module:
        return MVPModule(self.cfg, dim, self.num_classes)

    # ------------------------------------------------------------------ selection and prompts
    def query(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.query == "cls":
            return super().query(x)
        vit = self.vit
        with torch.no_grad():  # the released query: [CLS] before the last block, no final norm
            h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
            for blk in vit.blocks[:-1]:
                h = blk(h)
            return h[:, 0].detach()

    def select(self, q: torch.Tensor) -> torch.Tensor:
        """``[B]`` E-prompt indices (usage-scaled when ``use_contrastive``)."""
        return usage_scaled_selection(q, self.prompt.e.all_keys()[0],
                                      self.prompt.count if self.cfg.use_contrastive else None)

    def key_loss(self, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        keys = self.prompt.e.all_keys()[0]
        if self.cfg.use_contrastive:
            loss = contrastive_key_loss(q, keys, idx, self.prompt.count + 1, self.cfg.contrastive_broadcast)
        else:
            loss = (1 - F.cosine_similarity(q.float(), keys[idx].float(), dim=-1)).mean()
        return self.cfg.key_loss_weight * loss

    def prompts_for(self, q, batch_size, task, train) -> tuple[LayerPrompts, torch.Tensor | None]:
        idx = self.select(q)
        return self._prompts(idx, batch_size), (self.key_loss(q, idx) if train else None)

    def _prompts(self, idx: torch.Tensor, batch_size: int) -> LayerPrompts:
        parts = [self.prompt.e.select(idx[:, None])]
        if self.prompt.g is not None:
            parts.insert(0, self.prompt.g.broadcast(batch_size))
        return merge_prompts(*parts)

    def _run(self, x: torch.Tensor, train: bool) -> MVPOutput:
        """Query, selection, prompted features, masked logits (and the key loss / count update in training)."""
        q = self.query(x)
        idx = self.select(q)
        aux = self.key_loss(q, idx) if train else None
        out = prompted_forward(self.vit, x, self._prompts(idx, x.shape[0]), self.mode)
        feats = pool_features(self.vit, out, "cls")
        logits = self.model.head(feats)
        scale = 2 * torch.sigmoid(self.prompt.mask[idx]) if self.cfg.use_mask else None
        if scale is not None:
            logits = logits * scale.to(logits.dtype)
        if train:  # after the loss used the old counts (code: count += bincount(topk))
            with torch.no_grad():
                self.prompt.count += torch.bincount(idx, minlength=self.cfg.e_pool_size).to(self.prompt.count)
        return MVPOutput(logits, aux, None, feats, scale)

    # ------------------------------------------------------------------ hooks
    def forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> MVPOutput:
        return self._run(x, train=True)

    def loss(self, output: MVPOutput, batch: Batch, ctx: Context) -> torch.Tensor:
        c, head = self.cfg, self.model.head
        allowed = ctx.class_mask[batch.task]
        if c.mask_past_logits:
            allowed = allowed & self.current
        f, y = output.features, batch.y
        logits = output.logits
        if c.use_afs:
            cps = afs_factor(f.detach(), head.weight.detach(), y, c.margin)
            logits = head(f / cps[:, None].to(f.dtype))
            if output.scale is not None:
                logits = logits * output.scale.to(logits.dtype)
        ce = F.cross_entropy(logits.float().masked_fill(~allowed, float("-inf")), y, reduction="none")
        if c.use_gsf:
            ign = gradient_similarity_ignore(f.detach(), head.weight.detach(),
                                             None if head.bias is None else head.bias.detach(), y, allowed,
                                             None if output.scale is None else output.scale.detach())
            w = focal_weights(ign, c.alpha, c.gamma)
            loss = (w * ce.mean()).mean() if c.focal_batch_mean else (w * ce).mean()
        else:
            loss = ce.mean()
        if output.aux_loss is not None:
            loss = loss + output.aux_loss
        return loss

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(x, train=False).logits

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "count": self.prompt.count.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("count") is not None:
            self.prompt.count.copy_(state["count"].to(self.prompt.count))
