"""The figures of ``clbench report``: one function per figure, each returning the matplotlib
figure and a JSON-serialisable dict of exactly the data it plots (the report writes it next to
the PNG/PDF as a sidecar).  Figures use matplotlib's object API on the Agg canvas (no pyplot
state, no display needed)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = tuple[list[float], list[float]]


def new_figure(width: float = 8.0, height: float = 4.0) -> tuple[Figure, Any]:
    """A figure with one axes on an Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _boundaries(ax: Any, boundaries: Sequence[float]) -> None:
    for i, b in enumerate(boundaries):
        ax.axvline(b, color="0.6", linestyle=":", linewidth=1, label="experience end" if i == 0 else None)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def task_curves(curves: dict[str, Series], boundaries: Sequence[float], gaps: Sequence[dict[str, Any]],
                title: str = "") -> tuple[Figure, dict[str, Any]]:
    """Per-iteration accuracy of every task on one time axis, experience ends marked, and each
    boundary's stability gap annotated (pre-boundary accuracy of the earlier tasks' mean, its
    minimum, iterations to the minimum and to recovery)."""
    fig, ax = new_figure(9, 4.5)
    for name, (x, y) in curves.items():
        ax.plot(x, y, linewidth=1.2, label=name.replace("_", " "))
    _boundaries(ax, boundaries)
    marks = []
    for g in gaps:
        b, pre, low, to_min = g.get("iteration"), g.get("pre_acc"), g.get("min_acc"), g.get("iters_to_min")
        if not (_finite(b) and _finite(pre)):
            continue
        rec = g.get("recovery_iters")
        depth = g.get("gap")
        if _finite(depth) and _finite(low) and _finite(to_min):
            x_min = b + to_min
            ax.hlines(pre, b, x_min, colors="black", linestyles="--", linewidth=0.8)
            ax.annotate("", xy=(x_min, low), xytext=(x_min, pre),
                        arrowprops={"arrowstyle": "->", "color": "crimson", "linewidth": 1.2})
            ax.plot([x_min], [low], "v", color="crimson", markersize=6,
                    label="gap (mean of earlier tasks)" if not marks else None)
            text = f"gap {depth:.0%}\nmin +{to_min:g} it\nrec {'+' + format(rec, 'g') + ' it' if _finite(rec) else '—'}"
            ax.annotate(text, xy=(x_min, low), xytext=(4, -4), textcoords="offset points", fontsize=7,
                        va="top", color="crimson")
            marks.append({"experience": g.get("experience"), "boundary": b, "pre_acc": pre, "min_acc": low,
                          "min_iter": x_min, "gap": depth,
                          "recovery_iter": b + rec if _finite(rec) else None})
        else:
            ax.annotate("no gap", xy=(b, pre), xytext=(3, 3), textcoords="offset points", fontsize=7, color="0.3")
            marks.append({"experience": g.get("experience"), "boundary": b, "pre_acc": pre, "min_acc": low,
                          "min_iter": None, "gap": None, "recovery_iter": None})
    ax.set(xlabel="iteration", ylabel="accuracy", title=title or "accuracy of every task", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    ax.grid(alpha=0.3)
    data = {"series": {k: {"x": list(x), "y": list(y)} for k, (x, y) in curves.items()},
            "boundaries": list(boundaries), "gaps": marks}
    return fig, data


def line(series: dict[str, Series], xlabel: str, ylabel: str, title: str,
         boundaries: Sequence[float] = (), ylim: tuple[float, float] | None = None) -> tuple[Figure, dict[str, Any]]:
    """One or more plain curves (average accuracy, training loss, ...)."""
    fig, ax = new_figure()
    for name, (x, y) in series.items():
        ax.plot(x, y, linewidth=1.2, label=name)
    _boundaries(ax, boundaries)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig, {"series": {k: {"x": list(x), "y": list(y)} for k, (x, y) in series.items()},
                 "boundaries": list(boundaries)}


def heatmap(matrix: Sequence[Sequence[float | None]], title: str = "accuracy matrix") -> tuple[Figure, dict[str, Any]]:
    """``matrix[j][i]``: accuracy on task i after experience j (blank where undefined)."""
    import numpy as np

    values = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    n_rows, n_cols = values.shape
    fig, ax = new_figure(max(4.5, 1.8 + 0.7 * n_cols), max(3.5, 1.2 + 0.6 * n_rows))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    for j in range(n_rows):
        for i in range(n_cols):
            if not np.isnan(values[j, i]):
                ax.text(i, j, f"{values[j, i]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if values[j, i] < 0.6 else "black")
    ax.set(xlabel="task i", ylabel="after experience j", title=title, xticks=range(n_cols), yticks=range(n_rows))
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig, {"matrix": [[None if np.isnan(v) else float(v) for v in row] for row in values]}


def online_curve(samples: Sequence[float], accs: Sequence[float], title: str = "") -> tuple[Figure, dict[str, Any]]:
    """Si-Blurry: periodic exposed-class accuracy vs samples seen and the anytime A_auc (the
    running mean of the periodic accuracies)."""
    auc = [sum(accs[: i + 1]) / (i + 1) for i in range(len(accs))]
    fig, ax = new_figure()
    ax.plot(samples, accs, marker=".", linewidth=1.2, label="accuracy on exposed classes")
    ax.plot(samples, auc, linewidth=1.6, label="A_auc so far")
    ax.set(xlabel="training samples seen", ylabel="accuracy", title=title or "online accuracy (A_auc)", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig, {"samples": list(samples), "acc": list(accs), "a_auc": auc}


def bars(groups: dict[str, Sequence[float | None]], categories: Sequence[str], ylabel: str, title: str,
         errors: dict[str, Sequence[float | None]] | None = None) -> tuple[Figure, dict[str, Any]]:
    """Grouped bars: one bar per (category, group), e.g. TTA error per corruption domain."""
    fig, ax = new_figure(max(8.0, 0.5 * len(categories) * max(1, len(groups))), 4.2)
    width = 0.8 / max(1, len(groups))
    for g, (name, values) in enumerate(groups.items()):
        xs = [i + (g - (len(groups) - 1) / 2) * width for i in range(len(values))]
        ys = [math.nan if v is None else v for v in values]
        err = None if errors is None else [0 if e is None or e != e else e for e in errors[name]]
        ax.bar(xs, ys, width, yerr=err, label=name, capsize=2 if err else 0)
    ax.set_xticks(range(len(categories)), [c.replace("_", " ") for c in categories], rotation=45, ha="right", fontsize=7)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return fig, {"categories": list(categories), "values": {k: list(v) for k, v in groups.items()},
                 "errors": None if errors is None else {k: list(v) for k, v in errors.items()}}


def mean_band(runs: Sequence[Series]) -> tuple[list[float], list[float], list[float]]:
    """Mean and std (ddof=1; 0 for one run) over runs at each x where every run has a value
    (at every x of any run when they share none)."""
    xs_sets = [set(x) for x, _ in runs]
    common = set.intersection(*xs_sets) if xs_sets else set()
    xs = sorted(common or set.union(*xs_sets)) if xs_sets else []
    lookup = [dict(zip(x, y)) for x, y in runs]
    mean, std = [], []
    for x in xs:
        vals = [d[x] for d in lookup if x in d and d[x] is not None]
        m = sum(vals) / len(vals)
        mean.append(m)
        std.append(math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)
    return xs, mean, std


def band_curves(groups: dict[str, Sequence[Series]], xlabel: str, ylabel: str, title: str) -> tuple[Figure, dict[str, Any]]:
    """Each group's mean curve over its runs (seeds) with a mean ± std band."""
    fig, ax = new_figure()
    data = {}
    for name, runs in groups.items():
        xs, mean, std = mean_band(runs)
        (handle,) = ax.plot(xs, mean, linewidth=1.4, label=f"{name} (n={len(runs)})")
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=handle.get_color(), alpha=0.2, linewidth=0)
        data[name] = {"x": xs, "mean": mean, "std": std, "n": len(runs)}
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig, {"groups": data}


def scatter(groups: dict[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str, title: str) -> tuple[Figure, dict[str, Any]]:
    """One point per run, coloured by group, with the group mean as a large marker."""
    fig, ax = new_figure(6, 5)
    data = {}
    for name, points in groups.items():
        pts = [(x, y) for x, y in points if _finite(x) and _finite(y)]
        if not pts:
            continue
        (handle,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", alpha=0.6, label=name)
        mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
        ax.plot([mx], [my], "*", markersize=14, color=handle.get_color(), markeredgecolor="black")
        data[name] = {"points": [list(p) for p in pts], "mean": [mx, my]}
    ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle="--")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig, {"groups": data}
