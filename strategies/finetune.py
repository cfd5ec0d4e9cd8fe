"""Fine-tuning: train on each experience in turn with nothing against forgetting (lower bound)."""

from dataclasses import dataclass

from clbench.registry import register_strategy
from clbench.strategy import Strategy, StrategyConfig


@dataclass
class FinetuneConfig(StrategyConfig):
    name: str = "finetune"


@register_strategy("finetune", config=FinetuneConfig, description="Plain sequential training (lower bound)")
class Finetune(Strategy):
    """Plain sequential training: cross-entropy on the current experience only."""
