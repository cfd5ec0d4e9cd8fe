"""Source: the source model without adaptation, the lower bound of test-time adaptation
(``setup_source`` in CoTTA's ``cifar10c.py``): eval mode (BN uses the source running
statistics), no parameter is trained."""

from dataclasses import dataclass
from typing import Any, Optional

import torch

from clbench.registry import register_strategy
from clbench.strategy import Batch, Context, Strategy, StrategyConfig


@dataclass
class SourceConfig(StrategyConfig):
    name: str = "source"


@register_strategy("source", config=SourceConfig, description="No adaptation: the source model in eval mode (TTA baseline)")
class Source(Strategy):
    """Predicts with the frozen source model in eval mode; never updates."""

    cfg: SourceConfig

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        model.requires_grad_(False)
        model.eval()

    def param_groups(self) -> list[dict[str, Any]]:
        return []

    def forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            return self.model(x)

    def loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> Optional[torch.Tensor]:
        return None
