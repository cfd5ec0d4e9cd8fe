"""Console output: live progress bars on a terminal, plain lines elsewhere, a results table at the end."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator, TypeVar

from clbench.logging.base import RunLogger
from clbench.logging.serialize import as_scalar
from clbench.logging.summary import GAP_COLUMNS, MISSING, gap_rows, metric_rows

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")

#: The running progress display of the active :class:`ConsoleLogger` (at most one): long passes
#: reported through :class:`PassProgress` add their bar to it rather than start a second display.
_LIVE: list[Any] = []

#: (metric name, label) of the live metrics shown next to the progress, in display order.
#: ``acc(new)`` is the accuracy on the task being learned, ``acc(old)`` the mean over the
#: previously learned tasks (both from ``eval/acc/task_<i>``, see ``ConsoleLogger._live_values``).
LIVE_METRICS: tuple[tuple[str, str], ...] = (
    ("train/loss", "loss"), ("acc(new)", "acc(new)"), ("acc(old)", "acc(old)"), ("eval/min_acc", "min-acc"))
_TASK_ACC = "eval/acc/task_"


class ConsoleLogger(RunLogger):
    """Shows the run's progress on ``console`` (default: a rich Console on stdout; ``rich``
    is imported on construction).

    On an interactive terminal with ``progress``, two bars (experiences k/N and the
    iterations of the current experience, described by the live metrics) refresh a few
    times per second from rich's own thread, so :meth:`on_iteration` only updates a
    counter. Otherwise (pipes, CI, ``progress=False``) plain lines are printed: one per
    experience start and end, and a status line with the live metrics on training/eval
    logs, at most one per ``plain_interval`` seconds. Both modes print one line of the
    experience's accuracies at its end and a results table at the end of the run.
    """

    def __init__(self, progress: bool = True, console: Console | None = None, plain_interval: float = 2.0):
        from rich.console import Console

        self.console = console if console is not None else Console()
        self.interactive = progress and self.console.is_interactive
        self.plain_interval = plain_interval
        self._progress: Any = None
        self._experience_bar: Any = None
        self._iteration_bar: Any = None
        self._live: dict[str, float] = {}
        self._run_dir = ""
        self._experience = 0
        self._n_experiences = 0
        self._n_iterations = 0
        self._experience_iteration = 0
        self._experience_t0 = time.monotonic()
        self._last_status = -math.inf

    def on_run_start(self, info: dict[str, Any]) -> None:
        self._run_dir = str(info.get("run_dir", ""))
        self._n_experiences = int(info.get("n_experiences") or 0)
        resumed = " (resumed)" if info.get("resumed") else ""
        self._print(f"run {self._run_dir}{resumed} | seed {info.get('seed')} | {self._n_experiences} experiences")
        if self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                refresh_per_second=4,
            )
            self._progress.start()
            _LIVE.append(self._progress)
            self._experience_bar = self._progress.add_task("experiences", total=self._n_experiences)
            self._iteration_bar = self._progress.add_task("", total=None)

    def on_experience_start(self, experience: int, n_experiences: int, n_iterations: int, classes: list[int]) -> None:
        self._experience, self._n_experiences, self._n_iterations = experience, n_experiences, n_iterations
        self._live.clear()  # no loss or accuracy of the previous experience next to the new one's progress
        self._experience_iteration = 0
        self._experience_t0 = time.monotonic()
        self._last_status = -math.inf
        if self._progress is not None:
            self._progress.update(self._experience_bar, completed=experience, total=n_experiences)
            self._progress.reset(self._iteration_bar, total=n_iterations, description=self._description())
        else:
            self._print(f"{self._experience_name()}: {len(classes)} classes {_short_list(classes)}, {n_iterations} iterations")

    def on_iteration(self, iteration: int, experience_iteration: int) -> None:
        self._experience_iteration = experience_iteration
        if self._progress is not None:
            self._progress.update(self._iteration_bar, completed=experience_iteration)

    def log_metrics(self, metrics: dict[str, float | int], step: int, kind: str) -> None:
        if kind not in ("train", "eval"):
            return
        self._live.update(self._live_values(metrics))
        if self._progress is not None:
            self._progress.update(self._iteration_bar, description=self._description())
        elif time.monotonic() - self._last_status >= self.plain_interval:
            self._last_status = time.monotonic()
            live = self._live_text()
            status = f"  iteration {self._experience_iteration}/{self._n_iterations} (step {step})"
            self._print(f"{status} | {live}" if live else status)

    def on_experience_end(self, experience: int, metrics: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.update(self._experience_bar, completed=experience + 1)
            self._progress.update(self._iteration_bar, completed=self._n_iterations)
        line = f"{self._experience_name()} done in {time.monotonic() - self._experience_t0:.1f}s"
        avg = as_scalar(metrics.get("exp/avg_acc"))
        if avg is not None:
            line += f" | avg acc {avg:.3f}"
        prefix = "exp/acc/task_"
        tasks = sorted((int(k[len(prefix) :]), v) for k, v in metrics.items() if k.startswith(prefix) and k[len(prefix) :].isdigit())
        if tasks:
            line += " | per task " + " ".join(_fmt3(v) for _, v in tasks)
        self._print(line)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        from rich.table import Table

        self._stop()
        results = Table(title="Results", title_justify="left")
        results.add_column("metric")
        results.add_column("value", justify="right")
        for label, value in metric_rows(summary):
            results.add_row(label, value)
        self.console.print(results)
        gaps = gap_rows(summary)
        if gaps:
            table = Table(title="Stability gaps", title_justify="left")
            for header, _ in GAP_COLUMNS:
                table.add_column(header, justify="right")
            for row in gaps:
                table.add_row(*row)
            self.console.print(table)
        self._print(f"run directory: {self._run_dir}")

    def close(self) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            if self._progress in _LIVE:
                _LIVE.remove(self._progress)
            self._progress = None

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _experience_name(self) -> str:
        return f"experience {self._experience} ({self._experience + 1}/{self._n_experiences})"

    def _live_values(self, metrics: dict[str, float | int]) -> dict[str, float]:
        """The live metrics in one record: ``train/loss``, ``eval/min_acc`` as they are, and from
        the per-task accuracies ``acc(new)`` (the current experience's task) and ``acc(old)``
        (mean over the earlier experiences' tasks; the untrained future ones never count)."""
        out = {name: value for name in ("train/loss", "eval/min_acc") if (value := as_scalar(metrics.get(name))) is not None}
        tasks = {int(k[len(_TASK_ACC):]): as_scalar(v) for k, v in metrics.items()
                 if k.startswith(_TASK_ACC) and k[len(_TASK_ACC):].isdigit()}
        if tasks.get(self._experience) is not None:
            out["acc(new)"] = tasks[self._experience]
        old = [v for i, v in tasks.items() if i < self._experience and v is not None]
        if old:
            out["acc(old)"] = sum(old) / len(old)
        return out

    def _live_text(self) -> str:
        return " | ".join(f"{label} {self._live[name]:.3f}" for name, label in LIVE_METRICS if name in self._live)

    def _description(self) -> str:
        live = self._live_text()
        name = f"experience {self._experience + 1}/{self._n_experiences}"
        return f"{name}  {live}" if live else name


class PassProgress:
    """``Context.progress`` on the console (see :mod:`clbench.strategy`): reports a long pass
    (``items`` of known ``total``) while yielding ``items`` unchanged.

    On an interactive terminal with ``progress``: a transient bar, added to the running
    :class:`ConsoleLogger`'s display (or a display of its own before the run starts, e.g. in
    ``setup``), removed when the pass ends.  Otherwise plain lines: ``description k/total`` at
    most once per ``plain_interval`` seconds, and one ``done`` line for a pass that took longer.
    """

    def __init__(self, progress: bool = True, console: Console | None = None, plain_interval: float = 10.0):
        from rich.console import Console

        self.console = console if console is not None else Console()
        self.interactive = progress and self.console.is_interactive
        self.plain_interval = plain_interval

    def __call__(self, items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
        if self.interactive:
            return self._bar(items, total, description)
        return self._plain(items, total, description)

    def _bar(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        own = None if _LIVE else Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True)
        display = _LIVE[-1] if own is None else own
        if own is not None:
            own.start()
        task = display.add_task(f"  {description}", total=total)
        try:
            for item in items:
                yield item
                display.advance(task)
        finally:
            display.remove_task(task)
            if own is not None:
                own.stop()

    def _plain(self, items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
        start = last = time.monotonic()
        done = 0
        of = f"/{total}" if total is not None else ""
        for item in items:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= self.plain_interval:
                last = now
                self.console.print(f"  {description} {done}{of}", markup=False, highlight=False, soft_wrap=True)
        if last > start:
            self.console.print(f"  {description} done: {done}{of} in {time.monotonic() - start:.1f}s",
                               markup=False, highlight=False, soft_wrap=True)


def _fmt3(value: Any) -> str:
    """A number with 3 decimals, ``–`` when it is not one."""
    scalar = as_scalar(value)
    return MISSING if scalar is None else f"{scalar:.3f}"


def _short_list(values: list[int], limit: int = 8) -> str:
    """``values`` as a list literal, elided after ``limit`` items."""
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}, ...]" if len(values) > limit else f"[{shown}]"
