"""Linear probe: a frozen (pretrained) backbone, only the linear head is trained.

The baseline of the discrete key-value bottleneck paper (Träuble et al., ICML 2023, Sec. 5;
``experiments_discrete_key_value_bottleneck`` sweeps ``*_lp_base.yaml``): the same frozen
encoder and stream, a linear classifier on its pooled features trained with cross-entropy over
the logits the protocol allows.  The backbone's parameters are frozen (``requires_grad=False``)
and it always runs in eval mode, so its BatchNorm statistics (EfficientNet) stay untouched too:
the backbone's state dict is bit-identical before and after training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clbench.registry import register_strategy
from clbench.strategy import Batch, Context, Strategy, StrategyConfig


@dataclass
class LinearProbeConfig(StrategyConfig):
    name: str = "linear_probe"


@register_strategy("linear_probe", config=LinearProbeConfig,
                   description="Linear probe: frozen backbone (eval mode), only the head is trained")
class LinearProbe(Strategy):
    def setup(self, model: nn.Module, ctx: Context) -> None:
        super().setup(model, ctx)
        model.backbone.requires_grad_(False)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.model.head.parameters())}]

    def forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        self.model.backbone.eval()  # the engine puts the model in train mode; keep BN/dropout frozen
        with torch.no_grad():
            feats = self.model.features(x)
        return self.model.head(feats)
