"""Structured (OmegaConf) configuration of the run loggers.

This module deliberately avoids ``from __future__ import annotations`` and PEP 604/585
typing so that every OmegaConf version the project supports can read the annotations.
"""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class WandbConfig:
    """Weights & Biases logging; off unless ``enabled``.

    ``mode``: ``auto`` (online when credentials exist, else offline), ``online``,
    ``offline`` or ``disabled``.
    """

    enabled: bool = False
    project: str = "clbench"
    entity: Optional[str] = None
    mode: str = "auto"
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    """Which loggers a run uses; ``log_every`` is the training-loss logging period in iterations."""

    console: bool = True
    progress: bool = True
    tensorboard: bool = True
    jsonl: bool = True
    log_every: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)
