"""Discrete key-value bottleneck (KVB) on a frozen pretrained encoder.

Träuble, Goyal, Rahaman, Mozer, Kawaguchi, Bengio & Schölkopf, "Discrete Key-Value Bottleneck",
ICML 2023 (arXiv:2207.11240), Sec. 3 (Eq. 1-3); official code ``ftraeuble/discrete_key_value_bottleneck``
@ 1987958 (``core.py``, ``splitters.py``) and ``ftraeuble/experiments_discrete_key_value_bottleneck``
@ abd0c7a (``utils/model.py::CodebookVotingLogitsDecoder``, ``sweeps/icml2023``).

1. Frozen encoder (``model.backbone``, eval mode, no gradient) -> pooled feature ``z in R^D``.
2. Splitter (``RandomDownProjection``): ``C`` fixed random projections ``R_c in R^{D x d_k}`` with
   L2-normalised columns, heads ``h_c = z R_c``.
3. ``C`` codebooks of ``J`` keys ``k_cj in R^{d_k}`` (buffers, never trained by gradient).  Keys
   start as ``randn`` and are fitted by **EMA k-means** (VQ-VAE EMA, van den Oord et al. 2017,
   App. A.1) for ``init_epochs`` epochs on an *unlabelled pretraining set that differs from the
   continual data* (``pretrain_*``; default: the stream's dataset minus the stream's classes, e.g.
   Tiny-ImageNet's 100 pretraining classes of the ViT-Tiny when the stream uses the other 100):
   nearest key per head (Euclidean), ``N <- g N + (1-g) n``, ``m <- g m + (1-g) sum h``,
   ``k = m / N~`` with Laplace-smoothed ``N~`` (eps 1e-5), keys whose EMA count falls below
   ``0.1 * batch / J`` re-drawn from the batch's heads (``dead_key_reset``, below).  Then they are frozen.
4. Values ``v_cj in R^{d_v}``, ``d_v = #classes``, **initialised to zeros**: the only trained
   parameters.  Each input selects one key per codebook (``argmin_j ||h_c - k_cj||``); since the
   selection does not depend on the values, a gradient step changes only the selected values.
5. Decoder ``codebook-voting-logits`` (non-parametric): logits = mean over codebooks of the
   selected values (top-1 key, weight 1).  Loss: cross-entropy with label smoothing 0.1 over all
   ``d_v`` logits (the code's single head; ``mask_unseen: true`` restricts it to the seen classes).
6. Selection counts are accumulated during training; at evaluation keys never selected are
   masked out of the nearest-key search (the code's ``deactivate_counts``; ``mask_unused``).

Paper's training recipe (set in ``train.*``): SGD lr 0.3, batch 256, gradient clipping 1.0,
no weight decay (weight decay would move every value, not only the selected ones).

Parity with the released code (``core.py`` @ 1987958, ``scripts/train.py`` @ abd0c7a):

* ``dead_key_reset``: ``released`` (default, the code's ``expire_codes_``): the threshold is
  ``threshold_factor * batch_size * h * w / J`` with the *nominal* batch size (``get_threshold_ema_dead_code``),
  a dead key is replaced by a random head of the batch only in ``keys`` -- its EMA count and sum are left as
  they are, so the next step recomputes it from them, and the sample serves for the next step's selection
  (and stays if the fitting ends there).  ``persistent`` (clbench's earlier behaviour, as later
  vector-quantisation code, e.g. lucidrains' ``vector-quantize-pytorch``, does): threshold from the actual
  batch size, and the key's EMA count/sum restart at ``threshold`` / ``sample * threshold``, so the
  replacement persists.  The paper does not specify this detail.
* EMA updates use the code's ``ema_inplace`` arithmetic (``x.mul_(decay).add_(new, alpha=1 - decay)``).
* ``cl_epochs`` (``scripts/train.py``: ``for class_list in class_splits: for epoch in range(cl_epochs): for
  batch in DataLoader(task's training split, batch_size=256, shuffle=True)``) is the number of full shuffled
  passes over the *current task's* training data, the last partial batch included: clbench's
  ``train.epochs`` (passes over each experience's data, ``ceil(n / batch_size)`` iterations each) with
  ``train.batch_size: 256``.  Argparse default 2000 (the CIFAR-10 sweeps do not set it: 5 tasks x 40
  iterations x 2000 = 80,000 SGD steps per task); the CIFAR-100 sweep sets 500 (50 tasks of 2 classes,
  1,000 images: 4 x 500 = 2,000 steps per task).  ``epoch_factor`` only scales a logged counter.
  ``configs/repro/kv_bottleneck_cifar10.yaml`` / ``kv_bottleneck_cifar100.yaml``.
* ``mask_unused``: the code gives never-selected keys the batch's largest distance (``dist[unused] = min(-dist)``)
  rather than removing them; the same choice unless a codebook has no selected key at all (the code then takes
  key 0, clbench the nearest key) -- only before any training.
* Class order: seeds 0 and 42 use the fixed order [[0, 1], [2, 3], ...]; the sweeps' seeds 1-5 shuffle
  the classes with Python's ``random`` (not reproducible here: clbench's scenario draws its own order).

Reference test: ``tests/test_reference_kv_bottleneck.py`` against the golden ``kv_bottleneck`` written by
``tools/reference/kv_bottleneck.py`` from the two official repositories: key fitting with dead-key expiry
(6 EMA steps; selected keys exact, keys equal), value training (8 SGD steps over 2 tasks with clipping;
selections, logits, losses, gradient norms and values equal), selection counters and the masked
evaluation -- bit-exact in that case, held to 1e-5 (keys) / 1e-6 (values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from clbench.registry import ClbenchError, register_strategy
from clbench.strategy import Batch, Context, Strategy, StrategyConfig, no_progress
from clbench.scenarios.base import seeded_generator
from clbench.validation import bounded, choice, path


@dataclass
class KVBottleneckConfig(StrategyConfig):
    name: str = "kv_bottleneck"
    codebooks: int = bounded(256, ge=1)  # C
    keys_per_codebook: int = bounded(4096, ge=1)  # J
    key_dim: int = bounded(14, ge=1)  # d_k
    init_epochs: int = bounded(10, ge=0)  # EMA k-means epochs over the pretraining set
    init_batch_size: int = bounded(256, ge=1)
    ema_decay: float = bounded(0.95, ge=0, le=1)
    ema_eps: float = bounded(1e-5, gt=0)  # Laplace smoothing of the EMA cluster sizes
    dead_key_fraction: float = bounded(0.1, ge=0, le=1)  # keys with EMA count < fraction * batch / J are re-drawn
    dead_key_reset: str = choice("released", "released", "persistent")  # released (core.py: redrawn for one selection) | persistent
    pretrain_dataset: Optional[str] = None  # unlabelled key-init data (null: the stream's dataset)
    pretrain_data_root: Optional[str] = path(None)  # its folder (null: the dataset's default lookup)
    pretrain_classes: Optional[List[int]] = bounded(None, ge=0)  # original labels used (null: all not in the stream)
    pretrain_images: Optional[int] = bounded(None, ge=1)  # at most this many images (seeded subset; null: all)
    label_smoothing: float = bounded(0.1, ge=0, le=1)
    mask_unseen: bool = False  # CE over seen classes only (code: all d_v logits)
    mask_unused: bool = True  # at evaluation, never-selected keys are out of the nearest-key search
    feature_batch_size: int = bounded(256, ge=1)


class KeyValueBottleneck(nn.Module):
    """Projections, keys and selection counts (buffers) and values (the only parameter)."""

    def __init__(self, in_dim: int, codebooks: int, keys: int, key_dim: int, value_dim: int, generator: torch.Generator):
        super().__init__()
        proj = torch.randn(codebooks, in_dim, key_dim, generator=generator)
        self.register_buffer("proj", F.normalize(proj, dim=1))  # columns of each R_c unit-norm
        self.register_buffer("keys", torch.randn(codebooks, keys, key_dim, generator=generator))
        self.register_buffer("counts", torch.zeros(codebooks, keys, dtype=torch.long))
        self.values = nn.Parameter(torch.zeros(codebooks, keys, value_dim))

    def heads(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, C, d_k]``: ``h_c = z R_c``."""
        return torch.einsum("bd,cdk->bck", z.float(), self.proj)

    def select(self, h: torch.Tensor, mask: torch.Tensor | None = None, max_elements: int = 1 << 27) -> torch.Tensor:
        """Nearest key per codebook, ``[B, C]``; keys where ``mask`` (``[C, J]``) is False are skipped.
        The ``[C, b, J]`` distance block is computed ``b`` samples at a time so that it holds at most
        ``max_elements`` values (512 MB in fp32): at the paper's size (C=256, J=4096) an evaluation
        batch of 2048 would otherwise need 8.6 GB."""
        c, j, _ = self.keys.shape
        key_norms = self.keys.pow(2).sum(-1).unsqueeze(1)  # [C, 1, J]
        step = max(1, max_elements // (c * j))
        out = []
        for s in range(0, h.shape[0], step):
            hc = h[s:s + step].transpose(0, 1)  # [C, b, dk]
            dist = key_norms - 2 * torch.bmm(hc, self.keys.transpose(1, 2))  # [C, b, J]; ||h||^2 is constant per row
            if mask is not None:
                dist = dist.masked_fill(~mask.unsqueeze(1), float("inf"))
            out.append(dist.argmin(-1).transpose(0, 1))
        return torch.cat(out) if out else torch.zeros(0, c, dtype=torch.long, device=h.device)

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        """Codebook-voting logits: mean over codebooks of the selected values, ``[B, d_v]``."""
        c = torch.arange(self.values.shape[0], device=idx.device)
        return self.values[c.unsqueeze(0), idx].mean(1)

    def used_mask(self) -> torch.Tensor:
        used = self.counts > 0
        return used | ~used.any(-1, keepdim=True)  # a codebook never used yet keeps all its keys

    @torch.no_grad()
    def fit_keys(self, z: torch.Tensor, epochs: int, batch_size: int, decay: float, eps: float,
                 dead_fraction: float, generator: torch.Generator,
                 progress: Callable[..., Iterable[Any]] = no_progress, dead_reset: str = "released") -> None:
        """EMA k-means of the keys on features ``z [N, D]`` (see the module docstring, step 3);
        each mini-batch step is reported to ``progress`` (``Context.progress``).  ``dead_reset``:
        ``released`` or ``persistent``, see ``KVBottleneckConfig.dead_key_reset`` (module docstring)."""
        if dead_reset not in ("released", "persistent"):
            raise ClbenchError(f"kv_bottleneck: dead_key_reset must be released or persistent, got '{dead_reset}'")
        c, j, dk = self.keys.shape
        cluster = torch.zeros(c, j, device=z.device)
        key_sum = self.keys.clone()
        n = z.shape[0]

        def batches() -> Iterator[torch.Tensor]:  # a fresh permutation per epoch, drawn as before
            for _ in range(epochs):
                perm = torch.randperm(n, generator=generator).to(z.device)
                for s in range(0, n, batch_size):
                    yield perm[s:s + batch_size]

        for sel in progress(batches(), total=epochs * -(-n // batch_size), description="key fitting"):
            h = self.heads(z[sel])  # [B, C, dk]
            b = h.shape[0]
            flat = (self.select(h) + torch.arange(c, device=h.device) * j).flatten()  # [B*C] in C*J
            counts = torch.bincount(flat, minlength=c * j).view(c, j).to(h.dtype)
            sums = torch.zeros(c * j, dk, device=h.device).index_add_(0, flat, h.reshape(-1, dk)).view(c, j, dk)
            cluster.mul_(decay).add_(counts, alpha=1 - decay)  # the code's ema_inplace, same rounding
            key_sum.mul_(decay).add_(sums, alpha=1 - decay)
            total = cluster.sum(-1, keepdim=True)
            smoothed = (cluster + eps) / (total + j * eps) * total
            self.keys.copy_(key_sum / smoothed.unsqueeze(-1))
            # released: the code's constant threshold from the nominal batch size; persistent: this batch's size
            threshold = dead_fraction * (batch_size if dead_reset == "released" else b) / j
            dead = cluster < threshold  # [C, J]
            if bool(dead.any()):
                pick = torch.randint(0, b, (c, j), generator=generator).to(z.device)
                samples = h.transpose(0, 1).gather(1, pick.unsqueeze(-1).expand(c, j, dk))  # [C, J, dk]
                self.keys.copy_(torch.where(dead.unsqueeze(-1), samples, self.keys))
                if dead_reset == "persistent":  # also restart the key's EMA statistics at the sample
                    cluster.masked_fill_(dead, threshold)
                    key_sum.copy_(torch.where(dead.unsqueeze(-1), samples * threshold, key_sum))


@register_strategy("kv_bottleneck", config=KVBottleneckConfig,
                   description="Discrete key-value bottleneck: frozen encoder, EMA k-means keys, zero-init values")
class KVBottleneck(Strategy):
    cfg: KVBottleneckConfig

    def setup(self, model: nn.Module, ctx: Context) -> None:
        super().setup(model, ctx)
        cfg = self.cfg
        model.requires_grad_(False)
        gen = seeded_generator(ctx.seed, 401)
        model.kv = KeyValueBottleneck(model.feature_dim, cfg.codebooks, cfg.keys_per_codebook, cfg.key_dim,
                                      ctx.stream.num_classes, gen).to(ctx.device)
        feats = self._pretrain_features(ctx)
        model.kv.fit_keys(feats, cfg.init_epochs, cfg.init_batch_size, cfg.ema_decay, cfg.ema_eps,
                          cfg.dead_key_fraction, gen, ctx.progress, dead_reset=cfg.dead_key_reset)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.model.kv.values]}]

    def forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        kv = self.model.kv
        with torch.no_grad():
            idx = kv.select(kv.heads(self._features(x)))
            kv.counts.scatter_add_(1, idx.T, torch.ones_like(idx.T))
        return kv.decode(idx)

    def loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        allowed = ctx.class_mask[batch.task] if self.cfg.mask_unseen else torch.ones_like(output, dtype=torch.bool)
        return smoothed_cross_entropy(output.float(), batch.y, allowed, self.cfg.label_smoothing)

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        kv = self.model.kv
        mask = kv.used_mask() if self.cfg.mask_unused else None
        return kv.decode(kv.select(kv.heads(self._features(x)), mask))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        self.model.backbone.eval()  # frozen encoder: no BN-statistics updates, no dropout
        with torch.no_grad():
            return self.model.features(x).float()

    @torch.no_grad()
    def _pretrain_features(self, ctx: Context) -> torch.Tensor:
        """Frozen-encoder features of the unlabelled pretraining images (no augmentation)."""
        from clbench.data import load_dataset

        cfg = self.cfg
        name = cfg.pretrain_dataset or ctx.stream.info.get("dataset")
        if name is None:
            raise ClbenchError("kv_bottleneck: set strategy.pretrain_dataset (the stream does not name its dataset)")
        data = load_dataset(name, cfg.pretrain_data_root)
        y = data.train.y
        if cfg.pretrain_classes is not None:
            keep = torch.isin(y, torch.tensor(list(cfg.pretrain_classes), dtype=y.dtype))
        elif cfg.pretrain_dataset is None or cfg.pretrain_dataset == ctx.stream.info.get("dataset"):
            keep = ~torch.isin(y, torch.tensor(ctx.stream.class_order, dtype=y.dtype))
        else:
            keep = torch.ones_like(y, dtype=torch.bool)
        idx = keep.nonzero().flatten()
        if idx.numel() == 0:
            raise ClbenchError(f"kv_bottleneck: no pretraining images in '{name}' (the key-init data must differ "
                               "from the continual data: set strategy.pretrain_dataset / pretrain_classes)")
        if cfg.pretrain_images is not None and cfg.pretrain_images < idx.numel():
            idx = idx[torch.randperm(idx.numel(), generator=seeded_generator(ctx.seed, 402))[:cfg.pretrain_images]].sort().values
        x = data.train.x
        if tuple(x.shape[1:]) != tuple(ctx.stream.train.x.shape[1:]):
            raise ClbenchError(f"kv_bottleneck: pretraining images {tuple(x.shape[1:])} differ from the stream's "
                               f"{tuple(ctx.stream.train.x.shape[1:])}")
        out = []
        starts = range(0, idx.numel(), cfg.feature_batch_size)
        for s in ctx.progress(starts, total=len(starts), description="key-init features"):
            xb = x[idx[s:s + cfg.feature_batch_size]].to(ctx.device)
            out.append(self._features(ctx.inputs(xb)))
        self.pretrain_count = int(idx.numel())
        return torch.cat(out)


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label-smoothed cross-entropy over the ``allowed`` logits only: ``(1 - e) * NLL + e * mean over
    allowed classes of -log p`` (``F.cross_entropy(label_smoothing=e)`` when everything is allowed)."""
    logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
    uniform = -(logp.masked_fill(~allowed, 0.0)).sum(1) / allowed.sum(1)
    return ((1 - smoothing) * nll + smoothing * uniform).mean()
