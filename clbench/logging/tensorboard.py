"""TensorBoard scalars under ``run_dir/tensorboard``, with the same names as every other logger."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from clbench.logging.base import RunLogger
from clbench.logging.serialize import as_scalar, flatten, to_jsonable
from clbench.logging.summary import METRIC_ROWS, to_markdown


class TensorBoardLogger(RunLogger):
    """One ``add_scalar(name, value, step)`` per numeric metric; at run end, the results as
    text and the flattened config as hyperparameters (run ``hparams``).

    The writer (and the ``torch.utils.tensorboard`` import) is created in
    :meth:`on_run_start`, so a failure there takes the usual non-fatal path.
    """

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.log_dir = Path(run_dir) / "tensorboard"
        self._writer: Any = None
        self._config: dict[str, Any] = {}
        self._last_step = 0

    def on_run_start(self, info: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(self.log_dir))
        self._config = info.get("config") or {}

    def log_metrics(self, metrics: dict[str, float | int], step: int, kind: str) -> None:
        for name, value in metrics.items():
            scalar = as_scalar(value)
            if scalar is not None:
                self._writer.add_scalar(name, scalar, step)
        self._last_step = max(self._last_step, step)

    def on_experience_end(self, experience: int, metrics: dict[str, Any]) -> None:
        self._writer.flush()

    def on_run_end(self, summary: dict[str, Any]) -> None:
        self._writer.add_text("summary", to_markdown(summary), self._last_step)
        hparams = {k: _hparam_value(v) for k, v in flatten(to_jsonable(self._config), sep=".").items()}
        final = {f"hparam/{key}": v for _, key in METRIC_ROWS if (v := as_scalar(summary.get(key))) is not None}
        self._writer.add_hparams(hparams, final, run_name="hparams", global_step=self._last_step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _hparam_value(value: Any) -> bool | int | float | str:
    """A config leaf as a type the hparams plugin accepts (lists and None become text)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)
