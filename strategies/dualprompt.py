"""DualPrompt (Wang et al., ECCV 2022, "DualPrompt: Complementary Prompting for Rehearsal-free
Continual Learning").

A G(eneral)-prompt shared by all tasks in the first blocks and an E(xpert)-prompt pool with one
prompt and one key per task in the next blocks, given to a frozen ViT by prefix-tuning
(DualPrompt Eq. 2).  Query q(x) = [CLS] of the frozen ViT without prompts (first forward).

* Training (DualPrompt Sec. 4.3 and Eq. 4): the **task id** picks E-prompt e_t, and its key is
  pulled towards the (detached) query, loss CE + lambda * mean(1 - cos(q(x), k_t)).
  ``train_task_id: false`` selects by the key at training time too (a protocol switch).
* Inference: the E-prompt of the key most similar to the query (top-1 cosine).

Defaults as in the CODA-Prompt code (``models/zoo.py`` ``DualPrompt``, ``prompt_param 10 20 6``):
G length 6 (3 key + 3 value tokens) in blocks 0-1, E pool = number of tasks (``e_pool_size``
0), E length 20 in blocks 2-4.  The official JAX configs (``configs/cifar100_dualprompt.py``,
``imr_dualprompt.py``): G length 5, E length 5 (CIFAR) / 20 (ImageNet-R), pool 10, where a prefix
of length L is L key + L value tokens: ``g_length: 10, e_length: 10 | 40`` here (our length counts
both halves, like the CODA code's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from clbench.prompts import LayerPrompts, PromptConfig, PromptPool, PromptStrategy, cosine_to_keys, merge_prompts
from clbench.registry import ClbenchError, register_strategy
from clbench.validation import bounded


@dataclass
class DualPromptConfig(PromptConfig):
    name: str = "dualprompt"
    g_length: int = bounded(6, ge=1)
    g_layers: List[int] = bounded(default_factory=lambda: [0, 1], ge=0)
    e_length: int = bounded(20, ge=1)
    e_layers: List[int] = bounded(default_factory=lambda: [2, 3, 4], ge=0)
    e_pool_size: int = bounded(0, ge=0)  # 0: one E-prompt per task (the stream's number of experiences)
    train_task_id: bool = True  # training picks the task's E-prompt (paper and code); false: by key
    key_loss_weight: float = bounded(1.0, ge=0)


class DualPromptModule(nn.Module):
    """G-prompt (one prompt, no key) and the E-prompt pool (one key per prompt)."""

    def __init__(self, cfg: DualPromptConfig, dim: int, e_pool: int):
        super().__init__()
        self.g = PromptPool(cfg.g_layers, 1, cfg.g_length, dim) if cfg.g_layers and cfg.g_length else None
        self.e = PromptPool(cfg.e_layers, e_pool, cfg.e_length, dim, key_dim=dim)


@register_strategy("dualprompt", config=DualPromptConfig,
                   description="DualPrompt: shared G-prompt + task-keyed E-prompts (prefix-tuning, frozen ViT)")
class DualPrompt(PromptStrategy):
    """G-prompt + per-task E-prompts with keys; see the module docstring."""

    cfg: DualPromptConfig

    def build_prompt(self, dim: int, n_tasks: int) -> nn.Module:
        pool = self.cfg.e_pool_size or n_tasks
        if pool < n_tasks and self.cfg.train_task_id:
            raise ClbenchError(f"strategy.e_pool_size={pool} is smaller than the {n_tasks} tasks while "
                               "train_task_id=true picks E-prompt t for task t")
        return DualPromptModule(self.cfg, dim, pool)

    def prompts_for(self, q, batch_size, task, train) -> tuple[LayerPrompts, torch.Tensor | None]:
        cos = cosine_to_keys(q, self.prompt.e.all_keys()[0])
        if train and self.cfg.train_task_id:
            idx = torch.full((batch_size, 1), self.task, dtype=torch.long, device=cos.device)
        else:
            idx = cos.argmax(1, keepdim=True)
        aux = self.cfg.key_loss_weight * (1 - cos.gather(1, idx)).mean() if train else None
        parts = [self.prompt.e.select(idx)]
        if self.prompt.g is not None:
            parts.insert(0, self.prompt.g.broadcast(batch_size))
        return merge_prompts(*parts), aux
