"""The run-logger interface and :class:`MultiLogger`, which fans calls out to several loggers."""

from __future__ import annotations

import warnings
from typing import Any


class LoggerWarning(RuntimeWarning):
    """A non-fatal logger failed and was dropped for the rest of the run."""


class RunLogger:
    """Receives the events of one run; every method is a no-op by default.

    ``fatal_errors``: whether an exception raised by this logger must stop the run
    (True only for the logger that owns the run directory's records). Other loggers are
    dropped by :class:`MultiLogger` with a warning when they fail.
    """

    fatal_errors: bool = False

    def on_run_start(self, info: dict[str, Any]) -> None:
        """Start of the run. ``info``: ``run_dir``, ``config`` (resolved plain dict), ``seed``,
        ``class_order``, ``n_experiences``, ``versions`` and ``resumed``."""

    def on_experience_start(self, experience: int, n_experiences: int, n_iterations: int, classes: list[int]) -> None:
        """Start of training on ``experience`` (0-based) of ``n_experiences``."""

    def on_iteration(self, iteration: int, experience_iteration: int) -> None:
        """Called after every training iteration with the iterations done so far, in the run and
        in the current experience (the first call of a fresh experience gets 1): must stay cheap."""

    def log_metrics(self, metrics: dict[str, float | int], step: int, kind: str) -> None:
        """Flat metrics (``train/loss``, ``eval/acc/task_0``, ``exp/avg_acc``...) at ``step``, the
        run's iteration count; ``kind`` is ``train``, ``eval`` or ``experience``."""

    def on_experience_end(self, experience: int, metrics: dict[str, Any]) -> None:
        """End of ``experience``; ``metrics`` are its ``exp/...`` metrics."""

    def on_run_end(self, summary: dict[str, Any]) -> None:
        """End of the run; ``summary`` is a nested JSON-serialisable dict of the final metrics."""

    def close(self) -> None:
        """Release files, writers and displays; safe to call more than once."""

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MultiLogger(RunLogger):
    """Forwards every call to each of ``loggers`` in order.

    When a logger with ``fatal_errors = False`` raises, one :class:`LoggerWarning` names it
    and the error, the logger is dropped (and closed, quietly) and the run goes on. The
    error of a fatal logger propagates once the other loggers have received the call.
    """

    fatal_errors = True

    def __init__(self, loggers: list[RunLogger]):
        self.loggers = list(loggers)

    def _call(self, method: str, *args: Any) -> None:
        fatal: Exception | None = None
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as err:  # noqa: BLE001 - any logger failure is handled here
                if logger.fatal_errors:
                    fatal = fatal or err
                else:
                    self._drop(logger, method, err)
        if fatal is not None:
            raise fatal

    def _drop(self, logger: RunLogger, method: str, err: Exception) -> None:
        self.loggers.remove(logger)
        warnings.warn(
            f"{type(logger).__name__} failed in {method}() and is disabled for the rest of the run: "
            f"{type(err).__name__}: {err}",
            LoggerWarning,
            stacklevel=4,
        )
        if method != "close":
            try:
                logger.close()
            except Exception:  # noqa: BLE001 - already reported; closing is best effort
                pass

    def on_run_start(self, info: dict[str, Any]) -> None:
        self._call("on_run_start", info)

    def on_experience_start(self, experience: int, n_experiences: int, n_iterations: int, classes: list[int]) -> None:
        self._call("on_experience_start", experience, n_experiences, n_iterations, classes)

    def on_iteration(self, iteration: int, experience_iteration: int) -> None:
        self._call("on_iteration", iteration, experience_iteration)

    def log_metrics(self, metrics: dict[str, float | int], step: int, kind: str) -> None:
        self._call("log_metrics", metrics, step, kind)

    def on_experience_end(self, experience: int, metrics: dict[str, Any]) -> None:
        self._call("on_experience_end", experience, metrics)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        self._call("on_run_end", summary)

    def close(self) -> None:
        self._call("close")
