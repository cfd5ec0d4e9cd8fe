"""Weights & Biases logging (``wandb`` is imported only when a run starts)."""

from __future__ import annotations

import netrc
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

from clbench.logging.base import LoggerWarning, RunLogger
from clbench.logging.config import WandbConfig
from clbench.logging.serialize import flatten, to_jsonable

RUN_ID_FILE = "wandb_run_id.txt"


class WandbLogger(RunLogger):
    """Logs the metrics (same names, ``step`` = global iteration) and the flattened summary
    to a W&B run whose files live under ``run_dir/wandb``.

    The W&B run id is kept in ``run_dir/wandb_run_id.txt`` so that a resumed run continues
    the same W&B run; steps W&B already has (logged after the last checkpoint by the run that
    died) are skipped rather than rejected one warning at a time. W&B's console capture is
    off: the console logger owns the terminal. An online start that fails or takes longer than
    ``init_timeout`` (no network, an invalid key) falls back to offline with one warning. Every failure (no network, bad credentials...)
    is non-fatal.
    """

    def __init__(self, run_dir: str | os.PathLike[str], cfg: WandbConfig, config_dict: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.config_dict = config_dict
        self._run: Any = None
        self._first_step = 0

    def on_run_start(self, info: dict[str, Any]) -> None:
        import wandb

        id_file = self.run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        mode = resolve_mode(self.cfg.mode, self.run_dir)
        try:
            self._run = self._init(wandb, run_id, mode)
        except (wandb.errors.Error, TimeoutError) as err:
            if mode != "online":
                raise
            warnings.warn(f"wandb: could not start online within logging.wandb.init_timeout="
                          f"{self.cfg.init_timeout:g} s ({type(err).__name__}: {err}); logging offline under "
                          f"{self.run_dir / 'wandb'} (upload later with `wandb sync`)", LoggerWarning, stacklevel=2)
            self._run = self._init(wandb, run_id, "offline")
        id_file.write_text(run_id + "\n")
        self._first_step = self._run.step if info.get("resumed") else 0

    def _init(self, wandb: Any, run_id: str, mode: str) -> Any:
        """``wandb.init`` in ``mode``, its start bounded by ``init_timeout`` seconds."""
        return wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=self.cfg.name,
            tags=list(self.cfg.tags),
            config=to_jsonable(self.config_dict),
            dir=str(self.run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(console="off", init_timeout=float(self.cfg.init_timeout)),
        )

    def log_metrics(self, metrics: dict[str, float | int], step: int, kind: str) -> None:
        if step >= self._first_step:
            self._run.log(dict(metrics), step=step)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        self._run.summary.update(flatten(to_jsonable(summary)))

    def close(self) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.finish()


def resolve_mode(mode: str, run_dir: Path) -> str:
    """The W&B mode to use: ``auto`` follows ``WANDB_MODE`` when set, else is ``online``
    with credentials (``WANDB_API_KEY`` or an ``api.wandb.ai`` entry in ``~/.netrc``) and
    ``offline`` without (saying so in one line)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if has_credentials():
        return "online"
    print(f"wandb: no credentials found, logging offline under {run_dir / 'wandb'} (upload later with `wandb sync`)")
    return "offline"


def has_credentials() -> bool:
    """Whether W&B credentials exist: ``WANDB_API_KEY`` or an ``api.wandb.ai`` entry in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False
