"""Structured (OmegaConf) configuration of the run loggers.

This module deliberately avoids ``from __future__ import annotations`` and PEP 604/585
typing so that every OmegaConf version the project supports can read the annotations.
"""

from dataclasses import dataclass, field
from typing import List, Optional

from clbench.validation import bounded, choice


@dataclass
class WandbConfig:
    """Weights & Biases logging; off unless ``enabled``.

    ``mode``: ``auto`` (online when credentials exist, else offline), ``online``,
    ``offline`` or ``disabled``.  ``init_timeout``: seconds an online start may take (no network,
    a bad key...) before the run logs offline instead, with one warning.
    """

    enabled: bool = False
    project: str = "clbench"
    entity: Optional[str] = None
    mode: str = choice("auto", "auto", "online", "offline", "disabled")
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    init_timeout: float = bounded(5.0, gt=0)


@dataclass
class LoggingConfig:
    """Which loggers a run uses; ``log_every`` is the training-loss logging period in iterations."""

    console: bool = True
    progress: bool = True
    tensorboard: bool = True
    jsonl: bool = True
    log_every: int = bounded(10, ge=0)  # 0: like 1
    wandb: WandbConfig = field(default_factory=WandbConfig)
