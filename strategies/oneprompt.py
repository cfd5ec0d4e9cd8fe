"""OnePrompt (Huang et al., ICLR 2024, "OVOR: OnePrompt with Virtual Outlier Regularization for
Rehearsal-Free Class-Incremental Learning"; code ``jpmorganchase/ovor`` @ 4f59b75,
``models/zoo.py`` ``OnePrompt``, ``prompt_param 10 40 10``).

DualPrompt's geometry without pools or keys: one prefix of length 10 (5 key + 5 value tokens)
in blocks 0-1 and one of length 40 (20 + 20) in blocks 2-4, shared by all tasks and trained on
every task (never frozen).  There is no query, so one ViT forward per image (the code passes
``q = zeros``).  OVOR = OnePrompt with ``vor: true`` (virtual outlier regularisation,
:mod:`clbench.vor`; the paper's OVOR uses E1 + E2 = 40 + 10 epochs on ImageNet-R, 16 + 4 on
CIFAR-100: ``vor_fraction: 0.2``).

Recipes: ``configs/repro/oneprompt_imagenet_r.yaml`` and ``configs/repro/ovor_imagenet_r.yaml``
(the released ``experiments/imagenet-r.sh``; OVOR with ``vor_outlier_center: origin``, the released
outlier synthesis).  Parity with the released code: ``tests/test_reference_ovor.py`` (4 Adam steps
of ``_train_one_epoch`` on the ViT-Tiny/8: logits to ~1e-6, prompt gradients to 1e-5 of their
scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from clbench.prompts import LayerPrompts, PromptConfig, PromptPool, PromptStrategy, merge_prompts
from clbench.registry import register_strategy
from clbench.validation import bounded


@dataclass
class OnePromptConfig(PromptConfig):
    name: str = "oneprompt"
    g_length: int = bounded(10, ge=1)
    g_layers: List[int] = bounded(default_factory=lambda: [0, 1], ge=0)
    e_length: int = bounded(40, ge=1)
    e_layers: List[int] = bounded(default_factory=lambda: [2, 3, 4], ge=0)


class OnePromptModule(nn.Module):
    """Two keyless prompts: one for the first blocks, one for the next."""

    def __init__(self, cfg: OnePromptConfig, dim: int):
        super().__init__()
        self.g = PromptPool(cfg.g_layers, 1, cfg.g_length, dim)
        self.e = PromptPool(cfg.e_layers, 1, cfg.e_length, dim)


@register_strategy("oneprompt", config=OnePromptConfig,
                   description="OnePrompt (OVOR with vor=true): one shared prefix prompt, no query pass (frozen ViT)")
class OnePrompt(PromptStrategy):
    """One shared prompt, no keys, no query pass; see the module docstring."""

    cfg: OnePromptConfig
    needs_query = False

    def build_prompt(self, dim: int, n_tasks: int) -> nn.Module:
        return OnePromptModule(self.cfg, dim)

    def prompts_for(self, q, batch_size, task, train) -> tuple[LayerPrompts, torch.Tensor | None]:
        return merge_prompts(self.prompt.g.broadcast(batch_size), self.prompt.e.broadcast(batch_size)), None
