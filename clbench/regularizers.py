"""Quadratic parameter regularisation: one mechanism for L2 and EWC.

    L_reg = scale * sum_theta  Omega_theta * (theta - theta*)^2

with Omega = 1 for L2, Omega = F (the diagonal Fisher information) for EWC (Kirkpatrick et
al. 2017, Eq. 3), the path integral of SI (Zenke et al. 2017, Eq. 5) and the output-norm
sensitivity of MAS (Aljundi et al. 2018, Eq. 4), and theta* the parameters at the end of the previous task.  Importances
accumulate online across tasks, ``Omega <- gamma * Omega + Omega_new`` (Schwarz et al. 2018;
gamma = 1 as in Smith et al. 2023's released code), and the anchor is overwritten each task.

Parity with Smith et al. 2023's released code (``shaunak27/data-free-continual-learning`` @ 5388102,
``learners/kd.py``; checked against it by tests/test_reference_smith2023.py) is a set of options of
the L2 and EWC strategies, all off by default: ``task_loss`` (``bce``/``bce_new``: ``bce_scale`` x
BCE on the sigmoid of the seen / the current experience's logits, :func:`sigmoid_bce`),
``freeze_bn`` (the model runs in eval mode while training, :meth:`ParameterRegularization.prepare_batch`),
and, for EWC, ``fisher: batch`` with ``fisher_loss: bce_new`` (:func:`batch_fisher`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from clbench.registry import ClbenchError
from clbench.strategy import Batch, Context, Strategy


class QuadraticRegularizer:
    """Holds anchors theta* and importances Omega for a fixed set of named parameters."""

    def __init__(self, params: dict[str, nn.Parameter], gamma: float = 1.0):
        self.params = params
        self.gamma = gamma
        self.anchor: dict[str, torch.Tensor] = {}
        self.importance: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self.anchor)

    def penalty(self) -> torch.Tensor:
        """sum Omega * (theta - theta*)^2 (zero before the first anchor)."""
        if not self.anchor:
            return torch.zeros((), device=next(iter(self.params.values())).device)
        return sum(((self.importance[n] * (p - self.anchor[n]).pow(2)).sum() for n, p in self.params.items()),
                   torch.zeros((), device=next(iter(self.params.values())).device))

    def consolidate(self, new_importance: dict[str, torch.Tensor] | None = None, new_weight: float = 1.0) -> None:
        """Anchor at the current parameters; accumulate ``new_importance`` (EWC, SI, MAS) as
        ``Omega <- gamma * Omega + new_weight * Omega_new`` (the first one as it is), or keep
        Omega = 1 when it is None (L2)."""
        for n, p in self.params.items():
            old = self.importance.get(n)
            if new_importance is None:
                self.importance[n] = torch.ones_like(p, requires_grad=False)
            else:
                new = new_importance[n].detach()
                self.importance[n] = new.clone() if old is None else self.gamma * old + new_weight * new
            self.anchor[n] = p.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor, "importance": self.importance}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = dict(state["anchor"])
        self.importance = dict(state["importance"])


#: Memory budget of the per-sample gradients that :func:`per_sample_fisher` materialises at once
#: (``vmap`` path): a chunk holds ``chunk x n_params x 4`` bytes, e.g. 11M params -> 6 samples.
FISHER_MEMORY_BYTES = 256 * 2**20


def per_sample_fisher(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    memory_bytes: int = FISHER_MEMORY_BYTES,
) -> dict[str, torch.Tensor]:
    """Empirical Fisher, one gradient per sample: F = 1/N sum_n (d/dtheta log p(y_n | x_n))^2
    (Kirkpatrick et al. 2017; the diagonal of the empirical Fisher, Martens 2020 Eq. 11).

    ``batches`` yields ``(inputs, labels, allowed)`` with ``allowed`` the bool ``[B, C]`` mask of
    the logits the model may use (the log-softmax runs over those only).  The model runs in eval
    mode, so samples do not interact (BatchNorm uses its running statistics) and the gradient of
    the summed loss at a layer's output is, row by row, each sample's own gradient.  Two paths:

    * ``nn.Linear`` layers whose parameters are all in ``params`` and which see one input row
      per sample (``[B, in]``), once per forward: closed form, no per-sample gradient is
      materialised.  With ``a_n`` the layer's input and ``g_n = dl_n/dz_n`` at its output, the
      per-sample weight gradient is ``g_n a_n^T``, so ``sum_n (g_n a_n^T)^2 = (g*g)^T (a*a)``
      (Goodfellow 2015, "Efficient per-example gradient computations"; BackPACK's
      ``SumGradSquared``): one forward, one backward and one extra matmul per layer.
    * everything else (convolutions, norms, attention, token inputs ``[B, T, in]``): per-sample
      gradients from ``torch.func.vmap`` over ``grad``, in chunks of at most
      ``memory_bytes // (4 * n_params)`` samples (at least 1), so their memory is bounded by
      ``memory_bytes`` rather than growing as batch x parameters.

    Nothing outside ``params`` is differentiated, and the result carries no autograd graph.
    """
    names = list(params)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32, requires_grad=False) for n, p in params.items()}
    count = 0
    closed: dict[str, nn.Linear] | None = None  # module name -> layer, decided on the first batch
    with _eval_mode(model):
        for x, y, allowed in batches:
            if closed is None:
                closed = _closed_form_linears(model, params, x)
            rest = [n for n in names if n.rsplit(".", 1)[0] not in closed]
            if closed:
                _linear_fisher(model, closed, x, y, allowed, fisher)
            if rest:
                _vmap_fisher(model, params, rest, x, y, allowed, fisher, memory_bytes)
            count += y.numel()
    return {n: f.div_(max(count, 1)).to(params[n].dtype) for n, f in fisher.items()}


def _nll(logits: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Per-sample -log p(y | x) over the allowed logits, ``[B]``."""
    logp = torch.log_softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)
    return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _closed_form_linears(model: nn.Module, params: dict[str, nn.Parameter], x: torch.Tensor) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers eligible for the closed form: all their parameters in ``params``,
    called exactly once per forward, on a ``[B, in]`` input (probed on two samples)."""
    candidates = {mn: m for mn, m in model.named_modules() if isinstance(m, nn.Linear)
                  and f"{mn}.weight" in params and (m.bias is None or f"{mn}.bias" in params)}
    calls: dict[str, list[tuple[int, ...]]] = {mn: [] for mn in candidates}
    probe = x[:2]
    handles = [m.register_forward_hook(lambda _m, inp, _out, mn=mn: calls[mn].append(tuple(inp[0].shape)))
               for mn, m in candidates.items()]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    return {mn: m for mn, m in candidates.items()
            if len(calls[mn]) == 1 and len(calls[mn][0]) == 2 and calls[mn][0][0] == probe.shape[0]}


def _linear_fisher(model: nn.Module, layers: dict[str, nn.Linear], x: torch.Tensor, y: torch.Tensor,
                   allowed: torch.Tensor, fisher: dict[str, torch.Tensor]) -> None:
    """Add sum_n (per-sample gradient)^2 of the ``layers``' weights and biases (closed form)."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(mn: str):
        def capture(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            inputs[mn] = inp[0].detach()
            if not out.requires_grad:  # first layer under frozen inputs: make it a graph leaf
                out = out.detach().requires_grad_()
            outputs[mn] = out
            return out
        return capture

    handles = [m.register_forward_hook(hook(mn)) for mn, m in layers.items()]
    try:
        with torch.enable_grad():
            loss = _nll(model(x), y, allowed).sum()
            order = list(outputs)
            grads = torch.autograd.grad(loss, [outputs[mn] for mn in order], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for mn, g in zip(order, grads):
            if g is None:
                continue
            g2 = g.float().square()
            fisher[f"{mn}.weight"] += g2.T @ inputs[mn].float().square()
            if layers[mn].bias is not None:
                fisher[f"{mn}.bias"] += g2.sum(0)


def _vmap_fisher(model: nn.Module, params: dict[str, nn.Parameter], names: list[str], x: torch.Tensor,
                 y: torch.Tensor, allowed: torch.Tensor, fisher: dict[str, torch.Tensor], memory_bytes: int) -> None:
    """Add sum_n (per-sample gradient)^2 for ``names`` with ``vmap(grad)``, in memory-bounded chunks."""
    from torch.func import functional_call, grad, vmap

    # Everything detached: a parameter that requires grad here would make the result carry an
    # autograd graph across batches (issue 11: +117 MB per batch with the head left out of params).
    frozen = {n: t.detach() for n, t in list(model.named_parameters()) + list(model.named_buffers()) if n not in names}
    diff = {n: params[n].detach() for n in names}

    def nll(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor, ai: torch.Tensor) -> torch.Tensor:
        return _nll(functional_call(model, {**frozen, **p}, (xi.unsqueeze(0),)), yi.view(1), ai.unsqueeze(0)).squeeze(0)

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0, 0))
    step = fisher_chunk_size(sum(diff[n].numel() for n in names), memory_bytes)
    with torch.no_grad():
        for s in range(0, y.numel(), step):
            grads = per_sample(diff, x[s:s + step], y[s:s + step], allowed[s:s + step])
            for n in names:
                fisher[n] += grads[n].float().square().sum(0)  # not in place: a gradient may be an expanded view
            del grads


def fisher_chunk_size(n_params: int, memory_bytes: int = FISHER_MEMORY_BYTES) -> int:
    """Samples per ``vmap`` chunk: their fp32 per-sample gradients fit in ``memory_bytes`` (at least 1)."""
    return max(1, memory_bytes // (4 * max(n_params, 1)))


def batch_fisher(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The released code's estimate (Smith et al. 2023, ``learners/kd.py``): for each mini-batch
    add grad(mean batch loss)^2 * batch_size / n_batches.  A squared *mini-batch* gradient; with
    that x B / n_batches factor it is within a small factor of the per-sample Fisher (0.85x in the issue-13 audit, 1.57x on
    tests/reference/smith2023's tiny case at initialisation: it depends on model and state),
    not B times smaller: the B-times-smaller estimator is Avalanche's and ContinualEvaluation's
    (grad(mean batch loss)^2 averaged over batches, no x B).  Kept for parity only."""
    batches = list(batches)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    with _eval_mode(model):
        for x, y, allowed in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y, allowed).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().pow(2) * y.numel() / len(batches)
    model.zero_grad(set_to_none=True)
    return fisher


def sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale`` x the binary cross-entropy of ``sigmoid(logits)`` against ``targets`` (in [0, 1]),
    averaged over the allowed entries (``allowed``: bool ``[B, C]``) -- with the same allowed classes in
    every row, ``nn.BCELoss()`` (mean) on ``sigmoid(logits[:, classes])``, as in Smith et al.'s
    ``learners/kd.py`` (``self.ce_loss(torch.sigmoid(logits[:, a:b]), target) * self.ce_loss_scale``,
    ``ce_loss_scale = 5``); also LwF.MC / iCaRL's classification-and-distillation loss (Rebuffi et al. 2017)
    with soft targets on the old classes."""
    bce = F.binary_cross_entropy(torch.sigmoid(logits.float()), targets.float(), reduction="none")
    allowed = allowed.expand_as(bce)
    return scale * bce.masked_select(allowed).sum() / allowed.sum().clamp(min=1)


def balanced_bce(logits: torch.Tensor, targets: torch.Tensor, new: torch.Tensor,
                 old: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """``scale`` x Smith et al.'s class-balanced BCE (``--balanced_bce``; ``learners/kd.py`` @ 5388102,
    ``LWF_MC.update_model`` lines 242-266, the same in ``LWF_MC_FEATKD`` / ``EWC_MC``, and the Fisher loss of
    ``EWC_MC.accumulate_block_memory`` lines 528-535).  Per row, with ``n`` current (``new``) and ``m`` old
    (``old``) classes and ``p = sigmoid(logits)``:

        L_new = mean_{c new} w_c BCE(p_c, t_c) * 2n / (1 + 1/n),   w_c = 1 for the label, 1/n for the others
        L     = L_new * n / (n + m) + mean_{c old} BCE(p_c, t_c) * m / (n + m)   (L = L_new without old classes)

    i.e. the n-1 negatives of a sample weigh as much as its positive; ``targets`` are one-hot on the new
    classes and (LwF.MC) sigmoid(teacher logits) on the old ones.  Averaged over the rows (the released
    ``.mean()`` over batch x classes, since every row has the same classes there)."""
    bce = F.binary_cross_entropy(torch.sigmoid(logits.float()), targets.float(), reduction="none")
    new = new.expand_as(bce)
    n = new.sum(1).float().clamp(min=1)
    weight = (targets.float() * (n[:, None] - 1) + 1) / n[:, None]
    loss = (weight * bce).masked_fill(~new, 0).sum(1) / n * (2 * n) / (1 + 1 / n)
    if old is not None:
        old = old.expand_as(bce)
        m = old.sum(1).float()
        old_mean = bce.masked_fill(~old, 0).sum(1) / m.clamp(min=1)
        loss = loss * n / (n + m) + old_mean * m / (n + m)
    return scale * loss.mean()


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(y.long(), num_classes).float()


class _eval_mode:
    def __init__(self, model: nn.Module):
        self.model, self.was = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was)


#: ``task_loss`` choices of the L2 and EWC strategies.
TASK_LOSSES = ("ce", "bce", "bce_new")


class BCETaskLoss:
    """Smith et al.'s task-loss options for a strategy whose config has ``task_loss``, ``bce_scale`` and
    ``freeze_bn`` and which records ``self.old_classes`` (the classes of finished experiences):
    ``task_loss`` ``ce`` (the strategy's cross-entropy), ``bce`` (``bce_scale`` x BCE on the sigmoid of the
    allowed (seen) logits, one-hot targets) or ``bce_new`` (the same on the current experience's classes
    only); ``freeze_bn`` puts the model in eval mode before every training step.  Mixed in before
    :class:`~clbench.strategy.Strategy` by the L2/EWC base and by LwF."""

    def prepare_batch(self, batch: Batch, ctx: Context) -> Batch:
        if getattr(self.cfg, "freeze_bn", False):
            self.model.eval()
        return batch

    def task_loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        choice = getattr(self.cfg, "task_loss", "ce")  # SI and MAS have no task_loss option
        if choice == "ce":
            return super().task_loss(output, batch, ctx)
        allowed = ctx.class_mask[batch.task]
        if choice == "bce_new":
            allowed = allowed & ~self.old_classes
        return sigmoid_bce(output, one_hot(batch.y, output.shape[1]), allowed, self.cfg.bce_scale)


class ParameterRegularization(BCETaskLoss, Strategy):
    """Base of the L2 and EWC strategies: the ``penalty`` (added to the task loss by ``loss``) over the backbone's (or all)
    parameters; subclasses set the scale and consolidate in ``after_experience`` (then call this one's).

    ``task_loss`` (Smith et al.'s released code, ``learners/kd.py``): ``ce`` (default, cross-entropy over
    the allowed logits: their ``--playground_flag --temp -3``), ``bce`` (``bce_scale`` x BCE on the sigmoid of
    all allowed (seen) logits, one-hot targets: their loss without ``--KD``), ``bce_new`` (the same on the
    current experience's classes only: ``--temp -1``, "ewc-mc-nologitkd").  Their LwF.MC loss (with
    ``--KD``) is LwF's ``variant: mc`` composed with this strategy (``strategy: [lwf, ewc]``).
    ``freeze_bn``: the model is put in eval mode before every training step (their ``update_model``
    starts with ``self.model.eval()``, "keep BN layers frozen": BatchNorm normalises with, and never
    updates, its running statistics; Dropout is off)."""

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        if self.cfg.params not in ("backbone", "all"):
            raise ClbenchError(f"strategy.params must be 'backbone' or 'all', got '{self.cfg.params}'")
        named = dict(model.named_parameters())
        if self.cfg.params == "backbone":
            named = {n: p for n, p in named.items() if not n.startswith("head.")}
        self.reg = QuadraticRegularizer({n: p for n, p in named.items() if p.requires_grad},
                                        gamma=getattr(self.cfg, "gamma", 1.0))
        self.setup_task_loss(ctx)

    def setup_task_loss(self, ctx: Context) -> None:
        """Check ``task_loss``; start the record of the classes of finished experiences (``bce_new``)."""
        choice = getattr(self.cfg, "task_loss", "ce")  # SI and MAS have no task_loss option
        if choice not in TASK_LOSSES:
            raise ClbenchError(f"strategy.task_loss must be one of {', '.join(TASK_LOSSES)}, got '{choice}'")
        self.old_classes = torch.zeros(ctx.stream.num_classes, dtype=torch.bool, device=ctx.device)

    def after_experience(self, exp, ctx: Context) -> None:
        self.old_classes[exp.classes.to(self.old_classes.device)] = True

    def penalty_scale(self) -> float:
        raise NotImplementedError

    def penalty(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor | float:
        """scale * sum Omega (theta - theta*)^2, 0 before the first anchor (``loss`` adds it to the task loss)."""
        if not self.reg.active:
            return 0.0
        return self.penalty_scale() * self.reg.penalty()

    def state_dict(self) -> dict[str, Any]:
        return {"reg": self.reg.state_dict(), "old": self.old_classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reg.load_state_dict(state["reg"])
        if "old" in state:  # checkpoints written before task_loss=bce_new existed lack it
            self.old_classes = state["old"].to(self.old_classes.device)
