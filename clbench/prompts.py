"""Prompts for a frozen timm ViT: one prompt module, one prompted forward, one strategy base.

Two ways of giving a prompt ``p`` (``[L, D]``) to a transformer block:

* **prefix-tuning** (``mode="prefix"``; Li & Liang 2021; DualPrompt Eq. 2, CODA-Prompt Sec. 3,
  ``GT-RIPL/CODA-Prompt`` ``models/vit.py`` ``Attention.forward``): ``p`` is split into
  ``p_k = p[:L/2]`` and ``p_v = p[L/2:]``, which are concatenated in front of that block's
  keys and values, ``Attn(x W_q, [p_k; x W_k], [p_v; x W_v])``.  The sequence length is
  unchanged (the prefixes are attended to, never output).
* **prompt-tuning** (``mode="tokens"``; Lester et al. 2021, L2P Sec. 4.1, VPT): the ``L`` prompt
  tokens are inserted into the sequence before block ``i``, right after [CLS] (so [CLS] stays
  at position 0), and travel through every later block.
* **per-block prompt-tuning** (``mode="tokens_per_block"``; VPT-Deep, MVP / Si-Blurry code
  ``models/mvp.py`` ``prompt_tuning``: ``x = block(cat(x, p_i)); x = x[:, :N]``): block ``i``'s
  tokens are attended to in block ``i`` only and dropped after it.

A selection of ``n`` prompts of length ``L`` for a batch is a ``[B, n, L, D]`` tensor per block
(:data:`LayerPrompts`); in prefix mode each prompt is split into its own key/value halves before
the ``n`` are concatenated (CODA code: ``Ek = P_[:, :, :L/2].reshape(B, -1, D)``).

:func:`prompted_forward` runs timm's ``VisionTransformer`` module by module (``patch_embed``,
``_pos_embed``, ``norm_pre``, each block's ``norm1``/``attn.qkv``/``attn.proj``/``mlp`` ...) with
a clean re-implementation of the attention that accepts prefixes; without prompts it equals
``vit.forward_features`` (tested).  :class:`PromptPool` holds prompts (optionally in per-task
chunks), keys and CODA's attention vectors.  :class:`PromptStrategy` is the base of L2P,
DualPrompt, CODA-Prompt and OnePrompt: frozen backbone, optional query pass, training-time
masking of past logits (spec §0) and VOR (:mod:`clbench.vor`) as an option on all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from clbench.registry import ClbenchError
from clbench.strategy import Batch, Context, Strategy, StrategyConfig, masked_cross_entropy
from clbench.validation import bounded, choice

LayerPrompts = dict[int, torch.Tensor]  # block index -> [B, n, L, D] prompts for that block


# ---------------------------------------------------------------------------- prompted forward
def check_vit(vit: nn.Module) -> None:
    """Raise unless ``vit`` is a timm VisionTransformer whose blocks this module can run."""
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise ClbenchError(f"prompt methods need a timm VisionTransformer backbone, got {type(vit).__name__} "
                           "(model: {name: timm, arch: vit_...})")
    for i, blk in enumerate(vit.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise ClbenchError(f"block {i} of the ViT is a {type(blk).__name__}/{type(blk.attn).__name__}; "
                               "prompted forward supports timm's plain Block/Attention only")


def attention(attn: nn.Module, x: torch.Tensor, prefix_k: torch.Tensor | None = None,
              prefix_v: torch.Tensor | None = None) -> torch.Tensor:
    """timm ``Attention`` on ``x`` ``[B, N, C]`` with optional prefix keys/values ``[B, P, C]``.

    softmax(q [p_k; k]^T / sqrt(d)) [p_v; v] per head (prefix-tuning), then timm's output norm
    and projection.  The prefixes are split into heads like the tokens' keys and values and are
    not passed through ``k_norm`` (raw parameters, as in the CODA/OVOR code).
    """
    B, N, C = x.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, h, N, d]
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix_k is not None:
        heads = lambda t: t.reshape(B, t.shape[1], h, d).transpose(1, 2).to(k.dtype)  # noqa: E731
        k = torch.cat([heads(prefix_k), k], dim=2)
        v = torch.cat([heads(prefix_v), v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(B, N, h * d)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    norm = getattr(attn, "norm", None)  # timm >= 1.0: optional norm before the projection
    out = norm(out) if norm is not None else out
    return attn.proj_drop(attn.proj(out))


def block_forward(blk: nn.Module, x: torch.Tensor, prefix_k: torch.Tensor | None = None,
                  prefix_v: torch.Tensor | None = None) -> torch.Tensor:
    """timm ``Block.forward`` (pre-norm residual attention + MLP) with optional attention prefixes."""
    x = x + blk.drop_path1(blk.ls1(attention(blk.attn, blk.norm1(x), prefix_k, prefix_v)))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def split_prefix(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, n, L, D]`` prompts -> prefix keys and values ``[B, n*L/2, D]`` each (each prompt split in half)."""
    B, n, L, D = p.shape
    if L % 2:
        raise ClbenchError(f"prefix-tuning needs an even prompt length (L/2 keys + L/2 values), got {L}")
    return p[:, :, : L // 2].reshape(B, -1, D), p[:, :, L // 2:].reshape(B, -1, D)


@dataclass
class PromptedOutput:
    """Result of :func:`prompted_forward`: final normed tokens and where the prompt tokens are."""

    tokens: torch.Tensor  # [B, N + n_prompt, D] after ``vit.norm``
    n_prompt: int  # prompt tokens inserted after the prefix tokens ([CLS]) (0 in prefix mode)
    n_prefix: int  # [CLS] (+ register) tokens at the front


def prompted_forward(vit: nn.Module, x: torch.Tensor, prompts: LayerPrompts | None = None,
                     mode: str = "prefix") -> PromptedOutput:
    """timm ``forward_features`` with prompts in the blocks named by ``prompts`` (see module doc)."""
    if mode not in ("prefix", "tokens", "tokens_per_block"):
        raise ClbenchError(f"prompt mode must be 'prefix', 'tokens' or 'tokens_per_block', got '{mode}'")
    prompts = prompts or {}
    bad = [i for i in prompts if not 0 <= i < len(vit.blocks)]
    if bad:
        raise ClbenchError(f"prompt layers {bad} do not exist: the ViT has {len(vit.blocks)} blocks (0..{len(vit.blocks) - 1})")
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    n_prefix, n_prompt = int(vit.num_prefix_tokens), 0
    for i, blk in enumerate(vit.blocks):
        p = prompts.get(i)
        if p is None:
            h = block_forward(blk, h)
        elif mode == "prefix":
            h = block_forward(blk, h, *split_prefix(p.to(h.dtype)))
        else:
            tok = p.reshape(p.shape[0], -1, p.shape[-1]).to(h.dtype)
            h = torch.cat([h[:, :n_prefix], tok, h[:, n_prefix:]], dim=1)
            h = block_forward(blk, h)
            if mode == "tokens":
                n_prompt += tok.shape[1]
            else:  # tokens_per_block: this block's prompt tokens are dropped after it
                h = torch.cat([h[:, :n_prefix], h[:, n_prefix + tok.shape[1]:]], dim=1)
    return PromptedOutput(vit.norm(h), n_prompt, n_prefix)


def pool_features(vit: nn.Module, out: PromptedOutput, pool: str = "cls") -> torch.Tensor:
    """``[B, D]`` features: timm's own pooling over the non-prompt tokens (``cls``: the [CLS]
    token for a ViT), or the mean of the prompt tokens' outputs (``prompt``, L2P's head input)."""
    t, a, b = out.tokens, out.n_prefix, out.n_prefix + out.n_prompt
    if pool == "prompt":
        if out.n_prompt == 0:
            raise ClbenchError("pool 'prompt' needs prompt-tuning tokens (mode: tokens)")
        return vit.fc_norm(t[:, a:b].mean(1))
    if pool != "cls":
        raise ClbenchError(f"prompt feature pooling must be 'cls' or 'prompt', got '{pool}'")
    if out.n_prompt:
        t = torch.cat([t[:, :a], t[:, b:]], dim=1)
    return vit.forward_head(t, pre_logits=True)


def merge_prompts(*parts: LayerPrompts) -> LayerPrompts:
    """Union of per-block prompts; prompts for the same block are concatenated (same length only)."""
    out: LayerPrompts = {}
    for part in parts:
        for i, p in part.items():
            out[i] = torch.cat([out[i], p], dim=1) if i in out else p
    return out


# ---------------------------------------------------------------------------- the prompt module
def uniform_(t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """U(0, scale): 1 is the CODA/OVOR code's ``tensor_prompt`` initialisation (``nn.init.uniform_``),
    0.01 the JAX L2P/DualPrompt code's (flax ``nn.initializers.uniform()``, prompts and keys)."""
    return nn.init.uniform_(t, 0.0, scale)


def zero_head_(head: nn.Module) -> None:
    """Zero the linear head's weight and bias (JAX L2P/DualPrompt code: ``kernel_init=zeros``)."""
    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


class PromptPool(nn.Module):
    """``size`` prompts of length ``length`` in each of ``layers``, with optional keys and
    attention vectors, stored in ``chunks`` equal per-task chunks (CODA-Prompt; one chunk for
    the other methods).

    Parameters (chunk c): ``prompts_c`` ``[n_layers, size/chunks, length, dim]``;
    ``keys_c`` ``[n_key_layers, size/chunks, key_dim]`` where ``n_key_layers`` is 1 for keys shared
    by all layers (L2P, DualPrompt) or ``n_layers`` (CODA-Prompt); ``attn_c`` like the keys.
    """

    def __init__(self, layers: Sequence[int], size: int, length: int, dim: int, key_dim: int | None = None,
                 key_per_layer: bool = False, attention: bool = False, chunks: int = 1, init_scale: float = 1.0):
        super().__init__()
        if size < 1 or length < 1 or chunks < 1 or size % chunks:
            raise ClbenchError(f"prompt pool size {size} must be a positive multiple of its {chunks} chunks "
                               f"(and length {length} positive)")
        self.layers = [int(i) for i in layers]
        self.size, self.length, self.dim, self.chunks = size, length, dim, chunks
        self.chunk = size // chunks
        n_key = len(self.layers) if key_per_layer else 1
        self.prompts = nn.ParameterList(
            [nn.Parameter(uniform_(torch.empty(len(self.layers), self.chunk, length, dim), init_scale))
             for _ in range(chunks)])
        self.keys = nn.ParameterList(
            [nn.Parameter(uniform_(torch.empty(n_key, self.chunk, key_dim), init_scale)) for _ in range(chunks)]
        ) if key_dim else None
        self.attn = nn.ParameterList(
            [nn.Parameter(uniform_(torch.empty(n_key, self.chunk, key_dim))) for _ in range(chunks)]
        ) if attention and key_dim else None

    def _gather(self, plist: nn.ParameterList, upto: int, detach_before: int) -> torch.Tensor:
        parts = [p.detach() if c < detach_before else p for c, p in enumerate(list(plist)[:upto])]
        return torch.cat(parts, dim=1)

    def all_prompts(self, upto: int | None = None, detach_before: int = 0) -> torch.Tensor:
        """``[n_layers, M', L, D]``: the prompts of chunks ``< upto``, those ``< detach_before`` detached."""
        return self._gather(self.prompts, upto or self.chunks, detach_before)

    def all_keys(self, upto: int | None = None, detach_before: int = 0) -> torch.Tensor:
        return self._gather(self.keys, upto or self.chunks, detach_before)

    def all_attention(self, upto: int | None = None, detach_before: int = 0) -> torch.Tensor:
        return self._gather(self.attn, upto or self.chunks, detach_before)

    def select(self, idx: torch.Tensor) -> LayerPrompts:
        """Prompts ``idx`` (``[B, k]`` indices into the pool) for every layer: ``{layer: [B, k, L, D]}``."""
        p = self.all_prompts()
        return {layer: p[j][idx] for j, layer in enumerate(self.layers)}

    def broadcast(self, batch: int, index: int = 0) -> LayerPrompts:
        """Prompt ``index`` for every sample (a prompt without selection: G-prompt, OnePrompt)."""
        p = self.all_prompts()
        return {layer: p[j, index][None, None].expand(batch, 1, -1, -1) for j, layer in enumerate(self.layers)}

    def chunk_parameters(self, chunk: int) -> list[nn.Parameter]:
        """The parameters of one chunk (prompts, keys, attention vectors)."""
        out = [self.prompts[chunk]]
        out += [self.keys[chunk]] if self.keys is not None else []
        out += [self.attn[chunk]] if self.attn is not None else []
        return out


def cosine_to_keys(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` cosine similarity of queries ``[B, D]`` with keys ``[M, D]`` (L2P Eq. 3's gamma = 1 - cos)."""
    return F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).t()


# ---------------------------------------------------------------------------- strategy base
@dataclass
class PromptConfig(StrategyConfig):
    """Fields shared by the prompt strategies (training-time logit masking and VOR)."""

    mask_past_logits: bool = True  # CE over the current experience's classes only (spec §0; CODA/OVOR code)
    vor: bool = False  # OVOR's virtual outlier regularisation in the last vor_fraction of each experience
    vor_fraction: float = bounded(0.2, ge=0, le=1)  # share of iterations in the VOR phase (E2/(E1+E2): 10/50 IN-R, 4/20 CIFAR)
    vor_epochs: int = bounded(4, ge=1)  # outlier regenerations in the VOR phase (E2; 4 on CIFAR, 10 on IN-R)
    vor_lambda: float = bounded(0.1, ge=0)  # weight of the energy terms
    vor_tau_id: float = -15.0  # energy margin of inliers
    vor_tau_ood: float = -3.0  # energy margin of outliers
    vor_k: int = bounded(50, ge=1)  # kNN: the k-th neighbour's distance
    vor_select: int = bounded(50, ge=1)  # boundary samples (largest k-NN distance)
    vor_sample_from: int = bounded(600, ge=1)  # Gaussian candidates drawn per boundary sample
    vor_sigma: float = bounded(0.1, ge=0)  # std of the candidates around a boundary sample (code: cov)
    vor_per_class: int = bounded(40, ge=1)  # outliers kept per class of the experience
    vor_outlier_center: str = choice("boundary", "boundary", "origin")  # boundary (paper) | origin (released code: N(0, sigma^2 I), issue ovor#5)
    vor_ood_batch: str = choice("batch", "batch", "released")  # outliers per VOR step: batch (as many as the batch, random) | released (floor(#outliers / #batches), in order; clbench.vor.outlier_batch)
    feature_batch_size: int = bounded(256, ge=1)  # batch of the VOR feature pass


@dataclass
class PromptOutput:
    """What :meth:`PromptStrategy.forward` hands to :meth:`PromptStrategy.loss`."""

    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None  # key / prompt loss of the method
    ood_logits: torch.Tensor | None = None  # VOR phase: the head's logits on virtual outliers


class PromptStrategy(Strategy):
    """Frozen timm ViT + prompts + a linear head.  Subclasses define the prompt module and
    :meth:`prompts_for`; this base does the rest.

    * ``setup`` freezes the backbone (``requires_grad=False``) and attaches the prompt module to
      the model (``model.prompt``) so checkpoints hold it; ``param_groups`` = head + the prompt
      parameters the method trains now.
    * ``needs_query``: the query q is the pooled [CLS] of a separate forward of the frozen,
      un-prompted ViT (no grad), as in the CODA/OVOR/L2P code: two forwards per image.
    * Training loss: cross-entropy over the logits the protocol allows, restricted to the
      current experience's classes when ``mask_past_logits`` (spec §0), plus the method's
      auxiliary loss.  ``predict``: the prompted forward with the method's inference-time
      selection, logits over every class (the evaluator masks unseen ones).
    * VOR (``vor: true``): see :mod:`clbench.vor`.
    """

    cfg: PromptConfig
    mode: str = "prefix"
    pool: str = "cls"
    needs_query: bool = True

    # ------------------------------------------------------------------ subclass interface
    def build_prompt(self, dim: int, n_tasks: int) -> nn.Module:
        raise NotImplementedError

    def prompts_for(self, q: torch.Tensor | None, batch_size: int, task: torch.Tensor | None,
                    train: bool) -> tuple[LayerPrompts, torch.Tensor | None]:
        """Per-block prompts for a batch and the auxiliary (key) loss (None when not training)."""
        raise NotImplementedError

    def trainable_prompt_parameters(self) -> list[nn.Parameter]:
        return list(self.prompt.parameters())

    # ------------------------------------------------------------------ hooks
    def setup(self, model: nn.Module, ctx: Context) -> None:
        super().setup(model, ctx)
        vit = getattr(getattr(model, "backbone", None), "model", None)
        check_vit(vit)
        self.vit = vit
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        self.n_tasks = len(ctx.stream)
        self.num_classes = int(model.head.out_features)
        self.prompt = self.build_prompt(int(vit.embed_dim), self.n_tasks)
        model.prompt = self.prompt
        self.task = 0
        self.current = torch.zeros(self.num_classes, dtype=torch.bool)
        self.outliers: torch.Tensor | None = None
        self.exp = None
        if self.cfg.vor_outlier_center not in ("boundary", "origin"):
            raise ClbenchError(f"strategy.vor_outlier_center must be 'boundary' or 'origin', got '{self.cfg.vor_outlier_center}'")
        if self.cfg.vor and not 0 < self.cfg.vor_fraction < 1:
            raise ClbenchError(f"strategy.vor_fraction must be in (0, 1), got {self.cfg.vor_fraction}")

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.model.head.parameters()) + self.trainable_prompt_parameters()}]

    def before_experience(self, exp, ctx: Context) -> None:
        self.task = exp.index
        self.exp = exp
        self.current = torch.zeros(self.num_classes, dtype=torch.bool, device=ctx.device)
        self.current[exp.classes.to(ctx.device)] = True
        self.outliers = None

    def query(self, x: torch.Tensor) -> torch.Tensor | None:
        """q(x): pooled features of the frozen ViT without prompts (no grad), or None."""
        if not self.needs_query:
            return None
        with torch.no_grad():
            return self.model.backbone(x).detach()

    def features(self, x: torch.Tensor, task: torch.Tensor | None = None,
                 train: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompted features ``[B, D]`` and the auxiliary loss."""
        prompts, aux = self.prompts_for(self.query(x), x.shape[0], task, train)
        out = prompted_forward(self.vit, x, prompts, self.mode)
        return pool_features(self.vit, out, self.pool), aux

    def in_vor_phase(self, ctx: Context) -> bool:
        return self.cfg.vor and ctx.experience_iteration >= self._vor_start(ctx)

    def _vor_start(self, ctx: Context) -> int:
        return ctx.n_iterations - round(ctx.n_iterations * self.cfg.vor_fraction)

    def forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> PromptOutput:
        if self.in_vor_phase(ctx):
            return self._vor_forward(x, batch, ctx)
        feats, aux = self.features(x, batch.task, train=True)
        return PromptOutput(self.model.head(feats), aux)

    def loss(self, output: PromptOutput, batch: Batch, ctx: Context) -> torch.Tensor:
        allowed = ctx.class_mask[batch.task]
        if self.cfg.mask_past_logits:
            allowed = allowed & self.current
        loss = masked_cross_entropy(output.logits, batch.y, allowed)
        if output.aux_loss is not None:
            loss = loss + output.aux_loss
        if output.ood_logits is not None:
            from clbench.vor import energy_regularizer

            loss = loss + self.cfg.vor_lambda * energy_regularizer(
                output.logits, output.ood_logits, self.current, self.cfg.vor_tau_id, self.cfg.vor_tau_ood)
        return loss

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        feats, _ = self.features(x, task_id, train=False)
        return self.model.head(feats)

    # ------------------------------------------------------------------ VOR
    def _vor_forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> PromptOutput:
        """VOR phase (OVOR Sec. 3; ``ovor/learners/default.py``): prompts frozen, the head
        trains on the batch's prompted features plus virtual outliers: as many as the batch, drawn
        at random (``vor_ood_batch: batch``), or the released code's ``floor(#outliers / #batches)``
        in order (``released``; :func:`clbench.vor.outlier_batch`)."""
        from clbench.vor import outlier_batch, synthesize_outliers
        from clbench.scenarios.base import seeded_generator

        start = self._vor_start(ctx)
        per_round = max(1, math.ceil((ctx.n_iterations - start) / max(1, self.cfg.vor_epochs)))
        done = ctx.experience_iteration - start
        if self.outliers is None or done % per_round == 0:  # the start of each VOR "epoch"
            g = seeded_generator(ctx.seed, 104, ctx.experience, done)
            self.outliers = synthesize_outliers(self._task_features(ctx), self.cfg, int(self.current.sum()), g)
        with torch.no_grad():
            feats, _ = self.features(x, batch.task, train=False)
        g = seeded_generator(ctx.seed, 105, ctx.experience, done)
        pick = outlier_batch(self.outliers.shape[0], done % per_round, per_round, x.shape[0], self.cfg.vor_ood_batch,
                             g).to(self.outliers.device)
        return PromptOutput(self.model.head(feats.detach()), None, self.model.head(self.outliers[pick]))

    @torch.no_grad()
    def _task_features(self, ctx: Context) -> torch.Tensor:
        """Prompted features of every training image of the experience, freshly augmented."""
        feats = [self.features(ctx.inputs(b.x, train=True), b.task, train=False)[0].float()
                 for b in ctx.batches([self.exp], self.cfg.feature_batch_size)]
        return torch.cat(feats)

    def state_dict(self) -> dict[str, Any]:
        return {"outliers": self.outliers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outliers = state.get("outliers")
