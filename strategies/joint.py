"""Joint (cumulative) training: at experience k train on the union of experiences 0..k (upper bound)."""

from dataclasses import dataclass

from clbench.registry import register_strategy
from clbench.strategy import Context, Strategy, StrategyConfig


@dataclass
class JointConfig(StrategyConfig):
    name: str = "joint"


@register_strategy("joint", config=JointConfig, description="Cumulative training on all data seen so far (upper bound)")
class Joint(Strategy):
    """Upper bound: each experience iterates over all training data seen so far, so with
    ``train.epochs`` fixed, later experiences take more iterations."""

    def training_experiences(self, exp, ctx: Context):
        return list(ctx.stream.experiences[: exp.index + 1])
