"""Run loggers: the run directory's JSONL records, TensorBoard, Weights & Biases and the console.

Importing this package is cheap: ``rich``, ``torch.utils.tensorboard`` and ``wandb`` are
imported only by the logger that needs them, when it is built or the run starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from clbench.logging.base import LoggerWarning, MultiLogger, RunLogger
from clbench.logging.config import LoggingConfig, WandbConfig
from clbench.logging.console import ConsoleLogger
from clbench.logging.jsonl import JsonlLogger, read_metrics
from clbench.logging.tensorboard import TensorBoardLogger
from clbench.logging.wandb import WandbLogger

__all__ = [
    "ConsoleLogger",
    "JsonlLogger",
    "LoggerWarning",
    "LoggingConfig",
    "MultiLogger",
    "RunLogger",
    "TensorBoardLogger",
    "WandbConfig",
    "WandbLogger",
    "build_logger",
    "read_metrics",
]


def build_logger(cfg: LoggingConfig, run_dir: str | os.PathLike[str], config_dict: dict[str, Any]) -> MultiLogger:
    """The loggers ``cfg`` enables, JSONL first, behind one :class:`MultiLogger`."""
    run_dir = Path(run_dir)
    loggers: list[RunLogger] = []
    if cfg.jsonl:
        loggers.append(JsonlLogger(run_dir))
    if cfg.tensorboard:
        loggers.append(TensorBoardLogger(run_dir))
    if cfg.wandb.enabled:
        loggers.append(WandbLogger(run_dir, cfg.wandb, config_dict))
    if cfg.console:
        loggers.append(ConsoleLogger(progress=cfg.progress))
    return MultiLogger(loggers)
