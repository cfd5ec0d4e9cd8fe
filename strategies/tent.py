"""TENT: fully test-time adaptation by entropy minimisation (Wang, Shelhamer, Liu, Olshausen
& Darrell, ICLR 2021, "Tent: Fully Test-Time Adaptation by Entropy Minimization"), run
continually as the CoTTA paper's "TENT-continual" baseline.

Following the official code (``DequanWang/tent`` ``tent.py``, reused by CoTTA):

* ``configure_model``: train mode; every parameter frozen except the BatchNorm affine
  parameters (weight, bias); BN normalises with the test batch's statistics (running
  statistics removed).
* per batch (``steps=1``): the prediction is the output of the forward pass *before* the
  update, the loss the mean Shannon entropy of its softmax, one optimiser step.
* optimiser (CIFAR-10 config): Adam, lr 1e-3, betas (0.9, 0.999), no weight decay, batch 200;
  the engine owns it: ``train.optimizer=adam train.lr=0.001 train.batch_size=200
  train.reset_optimizer=false`` (continual: no reset between domains, ``episodic=False``).

Reference test: ``tests/test_reference_tta.py`` (golden ``tent``, written by ``tools/reference/cotta.py``
from ``qinenergy/cotta`` @ c212a20 ``cifar/tent.py``): logits and parameters equal over 4 steps.
"""

from dataclasses import dataclass
from typing import Any

import torch

from clbench.registry import ClbenchError, register_strategy
from clbench.strategy import Batch, Context, Strategy, StrategyConfig
from clbench.strategies.bn_adapt import use_batch_statistics


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy ``-sum_k p_k log p_k`` of ``softmax(logits)``."""
    logits = logits.float()
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


@dataclass
class TentConfig(StrategyConfig):
    name: str = "tent"


@register_strategy("tent", config=TentConfig,
                   description="TENT: entropy minimisation on BN affine parameters with test-batch statistics")
class Tent(Strategy):
    """Entropy minimisation of the model's own predictions, training only BN's scale and shift."""

    cfg: TentConfig

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        model.train()
        model.requires_grad_(False)
        layers = use_batch_statistics(model)
        if not layers:
            raise ClbenchError("strategy tent needs a model with BatchNorm layers (it adapts their affine parameters)")
        self.bn_params = []
        for m in layers:
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(True)
                    self.bn_params.append(p)
        if not self.bn_params:
            raise ClbenchError("strategy tent: the model's BatchNorm layers have no affine parameters")

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.bn_params}]

    def forward(self, x: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        return self.model(x)

    def loss(self, output: torch.Tensor, batch: Batch, ctx: Context) -> torch.Tensor:
        return softmax_entropy(output).mean(0)
