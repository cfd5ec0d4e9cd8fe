"""The strategy hook API and the context the engine shares with strategies.

A strategy is a small class whose hooks the engine calls in this order (the engine owns the
optimiser, AMP, clipping, device and checkpoints; a strategy never steps the optimiser)::

    setup(model, ctx)                      once: keep the model, do model surgery
    param_groups()                         at each experience: what the optimiser trains
    training_experiences(exp, ctx)         whose training data this experience iterates over
    before_experience(exp, ctx)
    for each iteration:
        prepare_batch(batch, ctx) -> batch     e.g. replay adds buffer samples
        forward(x, batch, ctx) -> output       default: model(x)
        loss(output, batch, ctx) -> Tensor     task_loss(output, batch, ctx) plus penalty(output, batch, ctx)
        before_optimizer_step(ctx)             after backward, before clipping/step: may edit p.grad (A-GEM)
        after_step(batch, ctx)                 the incoming batch: buffer update, EMA, ...
    after_experience(exp, ctx)             Fisher, prototypes, anchors, ...
    predict(x, task_id) -> scores          the evaluator's only entry point
    state_dict() / load_state_dict()       everything needed to resume

State flows through the :class:`Context` (read-only for strategies), never through
attributes another plug-in mutates, so hook order never matters between strategies.

Composition (``strategy: [replay, ewc]``, ``strategy=[replay,ewc]``; :mod:`clbench.composite`):
the components run as one strategy, each with its own config sub-section (``strategy.replay.*``,
``strategy.ewc.*``) and all set up, in order, on the same model.  ``prepare_batch`` chains in
order; ``before_experience``, ``before_optimizer_step``, ``after_step`` and ``after_experience``
run in order.  Losses add: exactly one component, the *owner* (the one that overrides ``loss`` or
``predict``, else the first), gives ``loss`` (its task loss and penalty) and ``predict``; every
other one adds its ``penalty`` (default 0: a regulariser such as EWC or L2 implements ``penalty``,
not ``loss``); ``task_loss`` is the owner's (a non-owner whose ``task_loss`` option is not ``ce`` is refused).  ``forward``, ``training_experiences`` and ``param_groups`` are the one overriding
component's (else the default); merged groups put its groups first, then the other components'
parameters not yet in a group.  State dicts nest by component name.  Refused when the config is
loaded, naming both: two components that override the same one of ``forward``,
``param_groups``, ``training_experiences``, or two that override ``loss``/``predict``.  With
those rules, components that touch different hooks (e.g. replay and EWC) compose in any order.

Online protocol (``train.online=true``, e.g. Si-Blurry; see :mod:`clbench.engine`): the
"iterations" above are ``train.online_iter`` gradient steps on each incoming batch, in the
stream's order; ``prepare_batch``/``forward``/``loss`` run at every step, ``after_step``
once per incoming batch, after its last step (so a buffer stores each sample once).
``ctx.class_mask`` then allows only the classes *exposed* so far (seen in an incoming batch,
the current one included) and changes from batch to batch; ``ctx.samples_seen`` counts the
training samples received so far.  No new hook.

Progress of long passes: a hook that runs a long per-sample or per-experience pass outside the
training loop (EWC's Fisher, FeTrIL/SLCA feature extraction, key fitting) iterates through
``ctx.progress(items, total=n, description="...")``, which yields ``items`` unchanged.  The
default reports nothing; the engine points it at the console when ``logging.console`` is on (a
transient bar on a terminal, an occasional plain line elsewhere; :mod:`clbench.logging.console`).

Overlapped evaluation (``eval.overlap``, :mod:`clbench.snapshot`): ``predict`` then runs on a
snapshot of the parameters and buffers of every ``nn.Module`` the strategy holds as an
attribute.  A tensor that ``predict`` reads and ``after_step`` changes in place must live in
such a module (a buffer), not in a plain tensor attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from clbench.transforms import Preprocess
    from clbench.scenarios.base import Experience, Stream


@dataclass
class Batch:
    """A training batch: raw uint8 images (after the experience's domain transform), labels, task ids."""

    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def cat(self, other: "Batch") -> "Batch":
        return Batch(torch.cat([self.x, other.x]), torch.cat([self.y, other.y]), torch.cat([self.task, other.task]))


T = TypeVar("T")


def no_progress(items: Iterable[T], total: int | None = None, description: str = "") -> Iterable[T]:
    """The default :attr:`Context.progress`: ``items`` unchanged, nothing reported."""
    return items


@dataclass
class Context:
    """What a strategy may read about the run; the engine updates it, strategies never write it."""

    stream: "Stream"
    device: torch.device
    seed: int
    preprocess: "Preprocess"
    experience: int = 0  # index of the experience being trained
    iteration: int = 0  # global training iterations done so far
    experience_iteration: int = 0  # iterations done in the current experience
    n_iterations: int = 0  # iterations of the current experience
    class_mask: torch.Tensor | None = None  # bool [n_tasks, num_classes] for the current experience (on device)
    samples_seen: int = 0  # online protocol: training samples received so far (after the current batch's steps)
    progress: Callable[..., Iterable[Any]] = no_progress  # progress(items, total, description) -> items; reports a long pass

    def inputs(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Model inputs (normalised floats) for uint8 images; augmented when ``train``."""
        return self.preprocess(x, train=train)

    def batches(self, experiences: Sequence["Experience"], batch_size: int, split: str = "train") -> Iterator[Batch]:
        """The samples of ``experiences`` in dataset order, as raw batches (no augmentation)."""
        data = self.stream.train if split == "train" else self.stream.test
        for exp in experiences:
            idx = exp.train_idx if split == "train" else exp.test_idx
            for start in range(0, idx.numel(), batch_size):
                sel = idx[start:start + batch_size].to(data.x.device)
                x = data.x[sel]
                if exp.transform is not None:
                    x = exp.transform(x)
                yield Batch(x.to(self.device), data.y[sel].to(self.device),
                            torch.full((sel.numel(),), exp.task_id, device=self.device))


@dataclass
class StrategyConfig:
    """Base of every strategy's config dataclass (subclasses add the paper's hyper-parameters)."""

    name: str = "finetune"


class Strategy:
    """Base class: plain fine-tuning with cross-entropy over the logits the protocol allows.

    Subclasses override only the hooks they need (see the module docstring).
    """

    def __init__(self, cfg: StrategyConfig):
        self.cfg = cfg
        self.model: nn.Module

    def setup(self, model: nn.Module, ctx: Context) -> None:
        self.model = model

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def training_experiences(self, exp: "Experience", ctx: Context) -> list["Experience"]:
        return [exp]

    def before_experience(self, exp: "Experience", ctx: Context) -> None:
        pass

    def prepare_batch(self, batch: Batch, ctx: Context) -> Batch:
        return batch

    def forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        return self.model(x)

    def loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        """:meth:`task_loss` plus :meth:`penalty`."""
        task_loss = self.task_loss(output, batch, ctx)
        penalty = self.penalty(output, batch, ctx)
        return task_loss if isinstance(penalty, (int, float)) and penalty == 0 else task_loss + penalty

    def task_loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        """The task loss alone (default: cross-entropy over the allowed logits).  A strategy that
        only changes the task loss (e.g. EWC/L2's ``task_loss: bce``) overrides this, not ``loss``,
        so it still composes with a component that owns ``loss``; in a composition only the loss
        owner's task loss is used (a non-owner that selects another one is refused)."""
        return masked_cross_entropy(output, batch.y, ctx.class_mask[batch.task])

    def penalty(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor | float:
        """A regularisation term added to the task loss (default 0); in a composition each
        component that does not own the task loss contributes only this."""
        return 0.0

    def before_optimizer_step(self, ctx: Context) -> None:
        """Called after ``loss.backward()`` and before gradient clipping and the optimiser step;
        may rewrite ``p.grad`` in place (e.g. A-GEM's projection).  It may run its own extra
        forward/backward passes if it restores the gradients it then edits.  With fp16 AMP the
        gradients are still multiplied by the loss scale here."""

    def after_step(self, batch: Batch, ctx: Context) -> None:
        pass

    def after_experience(self, exp: "Experience", ctx: Context) -> None:
        pass

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``[B, num_classes]`` for model inputs ``x``; the evaluator masks and takes the argmax."""
        return self.model(x)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@torch.no_grad()
def experience_features(model: nn.Module, exp: "Experience", ctx: Context, batch_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.features`` (float32, ``[N, D]``) of the experience's training images without
    augmentation, in eval mode (the model's mode is restored after), and their labels ``[N]``;
    both on the device (FeTrIL's class means, SLCA's class Gaussians)."""
    was_training = model.training
    model.eval()
    try:
        feats, labels = [], []
        n_batches = -(-exp.train_idx.numel() // batch_size)
        for batch in ctx.progress(ctx.batches([exp], batch_size), total=n_batches, description="features"):
            feats.append(model.features(ctx.inputs(batch.x)).float())
            labels.append(batch.y)
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def masked_cross_entropy(logits: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the allowed logits only (``allowed``: bool ``[B, C]``); others get -inf."""
    return F.cross_entropy(logits.float().masked_fill(~allowed, float("-inf")), y)
