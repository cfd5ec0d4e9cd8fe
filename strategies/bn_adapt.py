"""Test-time BN adaptation ("BN adapt"; Schneider et al., NeurIPS 2020, "Improving robustness
against common corruptions by covariate shift adaptation"; Nado et al. 2020), the ``norm``
baseline of TENT and CoTTA (``norm.py``): every BatchNorm layer normalises with the statistics
of the current test batch; nothing is trained.

The official ``Norm`` puts BN layers in train mode, so each batch is normalised with its own
statistics (the running averages it also updates are never used while in train mode).  We
remove the running statistics instead (``track_running_stats=False``, as TENT and CoTTA do),
which gives the same predictions in train and eval mode, independent of any running state.
Reference test: ``tests/test_reference_tta.py`` (golden ``bn_adapt``, written by
``tools/reference/cotta.py`` from ``qinenergy/cotta`` @ c212a20 ``cifar/norm.py``): equal predictions.
"""

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from clbench.registry import register_strategy
from clbench.strategy import Batch, Context, Strategy, StrategyConfig

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def use_batch_statistics(model: nn.Module) -> list[nn.Module]:
    """Make every BatchNorm layer of ``model`` normalise with the current batch's statistics in
    train and eval mode alike (running statistics removed); returns those layers."""
    layers = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    for m in layers:
        m.track_running_stats = False
        m.running_mean = None
        m.running_var = None
    return layers


@dataclass
class BNAdaptConfig(StrategyConfig):
    name: str = "bn_adapt"


@register_strategy("bn_adapt", config=BNAdaptConfig,
                   description="Test-time BN adaptation: normalise with each test batch's statistics, no training")
class BNAdapt(Strategy):
    """The source model with BatchNorm on test-batch statistics; no gradient, no update."""

    cfg: BNAdaptConfig

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        model.requires_grad_(False)
        use_batch_statistics(model)
        model.train()  # as the official Norm; BN ignores the mode once running stats are gone

    def param_groups(self) -> list[dict[str, Any]]:
        return []

    def forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)

    def loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> Optional[torch.Tensor]:
        return None
