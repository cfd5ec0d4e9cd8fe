"""The rows of the end-of-run results table, shared by the console and TensorBoard."""

from __future__ import annotations

import numbers
from typing import Any

from clbench.logging.serialize import as_scalar

MISSING = "–"
NO_GAP = "none"  # a boundary without a stability gap (clbench.metrics.ContinualTracker.stability_gaps)

#: (label, summary key) of the headline metrics, in display order.
METRIC_ROWS: tuple[tuple[str, str], ...] = (
    ("Final accuracy", "acc"),
    ("Avg incremental accuracy", "avg_inc_acc"),
    ("Forgetting", "forgetting"),
    ("BWT", "bwt"),
    ("FWT", "fwt"),
    ("min-ACC", "min_acc"),
    ("WC-ACC", "wc_acc"),
    ("WF10", "wf10"),  # windows in training iterations; None when eval.every >= 10
    ("WF100", "wf100"),
)

#: (column header, key) of the ``summary["stability_gaps"]`` entries.
GAP_COLUMNS: tuple[tuple[str, str], ...] = (
    ("experience", "experience"),
    ("pre-acc", "pre_acc"),
    ("min", "min_acc"),
    ("gap", "gap"),
    ("iters to min", "iters_to_min"),
    ("recovery", "recovery_iters"),
)


def format_value(value: Any) -> str:
    """Integers as they are, other numbers with 4 decimals, None/non-numbers as ``–``."""
    scalar = as_scalar(value)
    if scalar is None:
        return MISSING
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return f"{scalar:.4f}"


def metric_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """``(label, formatted value)`` for every headline metric, missing ones as ``–``."""
    return [(label, format_value(summary.get(key))) for label, key in METRIC_ROWS]


def gap_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One formatted row per boundary (empty when the summary has none); a boundary without a
    gap (``has_gap`` False) shows ``none`` as its gap and no time to the minimum or recovery."""
    rows = []
    for gap in summary.get("stability_gaps") or []:
        row = [format_value(gap.get(key)) for _, key in GAP_COLUMNS]
        if gap.get("has_gap") is False:
            row[[key for _, key in GAP_COLUMNS].index("gap")] = NO_GAP
        rows.append(row)
    return rows


def to_markdown(summary: dict[str, Any]) -> str:
    """The results (and stability-gap) tables as Markdown."""
    lines = ["| metric | value |", "|---|---|", *(f"| {label} | {value} |" for label, value in metric_rows(summary))]
    gaps = gap_rows(summary)
    if gaps:
        headers = [header for header, _ in GAP_COLUMNS]
        lines += ["", "**Stability gaps**", "", f"| {' | '.join(headers)} |", "|" + "---|" * len(headers)]
        lines += [f"| {' | '.join(row)} |" for row in gaps]
    return "\n".join(lines)
