"""Composition of strategies: ``strategy: [replay, ewc]`` runs several strategies as one.

The semantics are defined once in :mod:`clbench.strategy`'s docstring ("Composition"); this
module implements them.  A composition is named by its components joined with ``+``
(``strategy.name: replay+ewc``, what ``strategy=[replay,ewc]`` becomes when the config is
loaded), and its config section holds one typed sub-section per component
(``strategy.replay.buffer_size``, ``strategy.ewc.lambda_``), each that component's registered
config dataclass: :func:`composite_config` builds the section's dataclass, named after the
components so that it pickles by reference (the module's ``__getattr__`` rebuilds it in another
process).  :func:`check_composition` refuses, at config time, compositions whose hooks cannot
be combined; :func:`build_strategy` is what the engine calls for any ``strategy`` section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from clbench.registry import STRATEGIES, ClbenchError
from clbench.strategy import Batch, Context, Strategy, StrategyConfig

SEPARATOR = "+"
_PREFIX = "CompositeConfig__"

#: Hooks of which at most one component may have its own version (else: refused).
EXCLUSIVE_HOOKS = ("forward", "param_groups", "training_experiences")
#: Hooks whose overrider owns the task loss and ``predict`` (at most one component).
OWNER_HOOKS = ("loss", "predict")


def is_composite(name: Any) -> bool:
    return isinstance(name, str) and SEPARATOR in name


def component_names(name: str) -> list[str]:
    """``'replay+ewc'`` -> ``['replay', 'ewc']``, each a registered strategy, none twice."""
    names = [n.strip() for n in name.split(SEPARATOR)]
    if any(not n for n in names):
        raise ClbenchError(f"strategy '{name}': empty component name (write e.g. strategy=[replay,ewc])")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ClbenchError(f"strategy '{name}': {', '.join(twice)} named twice in the composition")
    for n in names:
        entry = STRATEGIES.get(n)  # UnknownNameError lists the valid names
        if entry.config is None:
            raise ClbenchError(f"strategy '{n}' has no config dataclass")
        if not n.isidentifier() or n in ("name", "validate"):
            raise ClbenchError(f"strategy '{n}' cannot be a component (its name is not a config key)")
    return names


def overrides(cls: type, hook: str) -> bool:
    """Whether strategy class ``cls`` has its own ``hook`` (not the base :class:`Strategy`'s)."""
    return getattr(cls, hook, None) is not getattr(Strategy, hook, None)


def check_composition(names: Sequence[str]) -> None:
    """Refuse a composition that cannot be defined, naming the two components in conflict:
    two that replace the same exclusive hook (``forward``, ``param_groups``,
    ``training_experiences``), or two that own the task loss / ``predict``."""
    classes = {n: STRATEGIES.get(n).obj for n in names}
    for hook in EXCLUSIVE_HOOKS:
        owners = [n for n in names if overrides(classes[n], hook)]
        if len(owners) > 1:
            raise ClbenchError(f"strategy composition {SEPARATOR.join(names)}: '{owners[0]}' and '{owners[1]}' "
                               f"both override {hook}(); at most one component may")
    owners = [(n, h) for n in names for h in OWNER_HOOKS if overrides(classes[n], h)]
    distinct = list(dict.fromkeys(n for n, _ in owners))
    if len(distinct) > 1:
        (a, ha), (b, hb) = owners[0], next(o for o in owners if o[0] != owners[0][0])
        raise ClbenchError(f"strategy composition {SEPARATOR.join(names)}: '{a}' overrides {ha}() and '{b}' "
                           f"overrides {hb}(); exactly one component may own the task loss and predict "
                           "(the others add theirs through penalty())")


def loss_owner(names: Sequence[str]) -> str:
    """The component that owns the task loss and ``predict``: the one overriding ``loss`` or
    ``predict``, else the first."""
    for n in names:
        if any(overrides(STRATEGIES.get(n).obj, h) for h in OWNER_HOOKS):
            return n
    return names[0]


@dataclass
class CompositeConfig(StrategyConfig):
    """Base of the per-composition config dataclasses that :func:`composite_config` builds."""

    name: str = "composite"

    def validate(self) -> None:
        for n in component_names(self.name):
            sub = getattr(self, n)
            if getattr(sub, "name", n) != n:
                raise ClbenchError(f"strategy.{n}.name must be '{n}' (switch components in strategy=[...]), got '{sub.name}'")


_CLASSES: dict[str, type] = {}


def composite_config(names: Sequence[str]) -> type:
    """The config dataclass of the composition ``names``: ``name`` plus one field per component
    typed by its registered config dataclass (defaults: that component's defaults)."""
    cls_name = _PREFIX + "__".join(names)
    if cls_name not in _CLASSES:
        fields = []
        for n in names:
            config = STRATEGIES.get(n).config
            fields.append((n, config, dataclasses.field(default_factory=_default_factory(config, n))))
        cls = dataclasses.make_dataclass(cls_name, fields, bases=(CompositeConfig,),
                                         namespace={"__module__": __name__})
        cls.__qualname__ = cls_name
        _CLASSES[cls_name] = cls
    return _CLASSES[cls_name]


def _default_factory(config: type, name: str):
    def make():
        cfg = config()
        if hasattr(cfg, "name"):
            cfg.name = name
        return cfg
    return make


def __getattr__(attr: str) -> Any:  # unpickling a composite config in another process
    if attr.startswith(_PREFIX):
        return composite_config(attr[len(_PREFIX):].split("__"))
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def build_strategy(cfg: Any) -> Strategy:
    """The strategy a loaded ``strategy`` section describes (a :class:`Composite` for ``a+b``)."""
    if is_composite(cfg.name):
        return Composite(cfg)
    return STRATEGIES.get(cfg.name).obj(cfg)


class Composite(Strategy):
    """Several strategies run as one, with the semantics of :mod:`clbench.strategy` ("Composition")."""

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.names = component_names(cfg.name)
        check_composition(self.names)
        self.components: dict[str, Strategy] = {n: STRATEGIES.get(n).obj(getattr(cfg, n)) for n in self.names}
        self.owner = self.components[loss_owner(self.names)]
        for n, c in self.components.items():  # only the owner's task loss is used: refuse a choice that would be ignored
            choice = getattr(c.cfg, "task_loss", "ce")
            if c is not self.owner and choice != "ce":
                raise ClbenchError(f"strategy.{n}.task_loss={choice}: in {cfg.name} the task loss is "
                                   f"'{loss_owner(self.names)}''s; leave strategy.{n}.task_loss=ce (or put {n} first)")
        parts = list(self.components.values())
        self._forward = next((c for c in parts if overrides(type(c), "forward")), self.owner)
        self._groups = next((c for c in parts if overrides(type(c), "param_groups")), None)
        self._experiences = next((c for c in parts if overrides(type(c), "training_experiences")), self.owner)
        self.component_modules: list[nn.Module] = []

    def _refresh_modules(self) -> None:
        """The components' ``nn.Module`` attributes, one level down, where :mod:`clbench.snapshot` finds them."""
        from clbench.snapshot import strategy_modules

        self.component_modules = [m for c in self.components.values() for m in strategy_modules(c)]

    def setup(self, model: nn.Module, ctx: Context) -> None:
        super().setup(model, ctx)
        for c in self.components.values():
            c.setup(model, ctx)
        self._refresh_modules()

    def param_groups(self) -> list[dict[str, Any]]:
        """The owning component's groups first (their options win), then the others' new parameters."""
        parts = list(self.components.values())
        if self._groups is not None:
            parts.remove(self._groups)
            parts.insert(0, self._groups)
        seen: set[int] = set()
        merged = []
        for c in parts:
            for group in c.param_groups():
                params = [p for p in group["params"] if id(p) not in seen]
                seen.update(id(p) for p in params)
                if params:
                    merged.append({**group, "params": params})
        return merged

    def training_experiences(self, exp, ctx: Context) -> list:
        return self._experiences.training_experiences(exp, ctx)

    def before_experience(self, exp, ctx: Context) -> None:
        for c in self.components.values():
            c.before_experience(exp, ctx)
        self._refresh_modules()

    def prepare_batch(self, batch: Batch, ctx: Context) -> Batch:
        for c in self.components.values():
            batch = c.prepare_batch(batch, ctx)
        return batch

    def forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        return self._forward.forward(x, batch, ctx)

    def loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        total = self.owner.loss(output, batch, ctx)
        for c in self.components.values():
            if c is not self.owner:
                total = total + c.penalty(output, batch, ctx)
        return total

    def task_loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        return self.owner.task_loss(output, batch, ctx)

    def penalty(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor | float:
        return sum((c.penalty(output, batch, ctx) for c in self.components.values()), 0.0)

    def before_optimizer_step(self, ctx: Context) -> None:
        for c in self.components.values():
            c.before_optimizer_step(ctx)

    def after_step(self, batch: Batch, ctx: Context) -> None:
        for c in self.components.values():
            c.after_step(batch, ctx)

    def after_experience(self, exp, ctx: Context) -> None:
        for c in self.components.values():
            c.after_experience(exp, ctx)
        self._refresh_modules()

    def predict(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        return self.owner.predict(x, task_id)

    def state_dict(self) -> dict[str, Any]:
        return {n: c.state_dict() for n, c in self.components.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ClbenchError(f"checkpoint has no state for strategy component(s) {', '.join(missing)} "
                               f"(it holds {', '.join(map(str, state)) or 'none'})")
        for n, c in self.components.items():
            c.load_state_dict(state[n])

