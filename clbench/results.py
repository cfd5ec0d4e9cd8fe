"""Results of many runs as one table: ``clbench compare`` and its Python API.

* :func:`find_runs` -- the run directories under some paths (a sweep directory, a single run
  directory, or any directory holding run directories, searched recursively).
* :func:`load` -- a pandas DataFrame, one row per run: ``run_dir``, ``status``, ``error``,
  ``wall_time_s``, ``trainable_params``, the flattened config (``strategy.name``,
  ``train.lr``, ...), every scalar of ``summary.json`` (``acc``, ``forgetting``, ...) and
  ``gap`` (the mean stability-gap depth over the experience boundaries).  Points of a sweep
  whose run directory was never created appear with their ``sweep.json`` status and error.
* :func:`aggregate` -- mean, std (ddof=1) and n over the *finished* runs of each group;
  :func:`excluded` names the others.  :func:`render` formats the table (md, csv, latex, json).

Only finished runs are averaged: failed, interrupted, incomplete and running ones are listed
below the table, never averaged in.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from clbench.registry import ClbenchError

SUMMARY = "summary.json"
CONFIG = "config.yaml"
RUN_INFO = "run_info.json"
METRICS = "metrics.jsonl"
SWEEP = "sweep.json"

DEFAULT_METRICS = ("acc", "avg_inc_acc", "forgetting", "bwt", "min_acc", "wc_acc", "gap")
ALIASES = {"strategy": "strategy.name", "scenario": "scenario.name", "model": "model.name", "dataset": "scenario.dataset"}
# Config keys that differ between runs without making them different methods.
NOT_GROUP_KEYS = ("seed", "name", "output_dir", "cache_dir", "scenario.data_root", "device")
NOT_GROUP_PREFIXES = ("logging.", "checkpoint.", "sweep.")
LOWER_IS_BETTER = {"forgetting", "f_last", "gap", "mean_gap", "mean_error", "wall_time_s"}
HIGHER_IS_BETTER = {"acc", "avg_inc_acc", "bwt", "fwt", "min_acc", "wc_acc", "a_auc", "a_last", "a_avg"}
FRACTION_METRICS = HIGHER_IS_BETTER | (LOWER_IS_BETTER - {"wall_time_s"})
INFO_COLUMNS = ("run_dir", "status", "error", "wall_time_s", "trainable_params", "sweep")


# ---------------------------------------------------------------------- finding and reading runs
def is_run_dir(path: Path) -> bool:
    """A run directory holds ``summary.json`` or ``config.yaml``."""
    return (path / SUMMARY).is_file() or (path / CONFIG).is_file()


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The run directories at or under ``paths`` (sorted, each once)."""
    found: dict[Path, None] = {}
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ClbenchError(f"{path} does not exist; pass a run directory, a sweep directory or a folder of runs")
        if path.is_file():
            path = path.parent
        if is_run_dir(path):
            found[path] = None
            continue
        for marker in sorted(path.rglob(SUMMARY)) + sorted(path.rglob(CONFIG)):
            if not any(parent in found for parent in marker.parent.parents):
                found[marker.parent] = None
    if not found:
        raise ClbenchError(f"no run directory (summary.json or config.yaml) under {', '.join(map(str, paths))}")
    return sorted(found)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when absent or unreadable (a file cut short)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``, skipping lines that do not parse (a run in progress
    may end in a partial line); [] when there is no file."""
    try:
        text = (run_dir / METRICS).read_text(encoding="utf-8")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def read_config(run_dir: Path) -> dict[str, Any]:
    """``config.yaml`` as plain data ({} when absent or unreadable)."""
    from omegaconf import OmegaConf

    try:
        data = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG), resolve=False)
    except Exception:  # noqa: BLE001 -- a missing or damaged file gives no config, not a crash
        return {}
    return data if isinstance(data, dict) else {}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``; lists become JSON strings (hashable)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple, dict)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def boundary_depth(g: dict[str, Any]) -> float | None:
    """Depth of one boundary's stability gap: its ``gap``; 0 when it says it has none
    (``has_gap`` false); else ``max(0, pre_acc - min_acc)``; None when undefined."""
    gap = _number(g.get("gap"))
    if gap is not None:
        return gap
    if g.get("has_gap") is False:
        return 0.0
    pre, low = _number(g.get("pre_acc")), _number(g.get("min_acc"))
    if g.get("has_gap") is None and pre is not None and low is not None:
        return max(0.0, pre - low)
    return None


def mean_gap(summary: dict[str, Any]) -> float | None:
    """``gap``: the mean stability-gap depth over the boundaries of ``summary["stability_gaps"]``
    (:func:`boundary_depth`; a boundary without a gap counts 0, undefined ones are left out);
    falls back to the summary's ``mean_gap``; None when nothing is defined."""
    gaps = summary.get("stability_gaps")
    values = [d for g in gaps if isinstance(g, dict) and (d := boundary_depth(g)) is not None] if isinstance(gaps, list) else []
    if values:
        return sum(values) / len(values)
    return _number(summary.get("mean_gap"))


def run_status(run_dir: Path, summary: dict[str, Any] | None) -> str:
    """``finished``, ``failed``, ``interrupted`` (as summary.json says), ``running`` (locked by
    a live process) or ``incomplete`` (no final summary: killed, or still being written)."""
    status = (summary or {}).get("status")
    if status in ("finished", "failed", "interrupted"):
        return status
    from clbench.rundir import run_status as directory_status  # the lock test

    return "running" if directory_status(run_dir) == "running" else "incomplete"


def _last_time(run_dir: Path) -> float | None:
    """The ``time`` of the last complete record of metrics.jsonl (seconds since the run began)."""
    path = run_dir / METRICS
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(tail):
        try:
            t = _number(json.loads(line).get("time"))
        except (ValueError, AttributeError):
            continue
        if t is not None:
            return t
    return None


def _sweep_points(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """``sweep.json``'s point records by point (directory) name."""
    data = read_json(sweep_dir / SWEEP) or {}
    points = {}
    for p in data.get("points", []) or []:
        if isinstance(p, dict):
            name = p.get("name") or Path(str(p.get("run_dir", ""))).name
            points[str(name)] = p
    return points


def load_run(run_dir: Path, point: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row of :func:`load`."""
    summary = read_json(run_dir / SUMMARY)
    info = read_json(run_dir / RUN_INFO) or {}
    row: dict[str, Any] = flatten(read_config(run_dir))
    config_columns = list(row)
    for k, v in (summary or {}).items():
        if v is None or isinstance(v, (int, float, str, bool)):
            row[k if k not in row else f"summary.{k}"] = v
    row["gap"] = mean_gap(summary or {})
    row["run_dir"] = str(run_dir)
    row["status"] = run_status(run_dir, summary)
    row["error"] = (summary or {}).get("error") or (point or {}).get("error")
    wall = _number((point or {}).get("wall_time_s"))
    row["wall_time_s"] = wall if wall is not None else _last_time(run_dir)
    params = _number((summary or {}).get("trainable_params"))
    row["trainable_params"] = params if params is not None else _number(info.get("trainable_params"))
    row["sweep"] = run_dir.parent.name if (run_dir.parent / SWEEP).is_file() else None
    row["_config_columns"] = config_columns
    return row


def load(*paths: str | os.PathLike[str]) -> "pd.DataFrame":  # noqa: F821
    """One row per run found under ``paths`` (see the module docstring for the columns)."""
    import pandas as pd

    if len(paths) == 1 and isinstance(paths[0], (list, tuple)):
        paths = tuple(paths[0])
    if not paths:
        raise ClbenchError("no path given; pass run directories or sweep directories")
    rows = []
    config_columns: set[str] = set()
    seen: set[Path] = set()
    for run_dir in find_runs(paths):
        points = _sweep_points(run_dir.parent)
        row = load_run(run_dir, points.get(run_dir.name))
        config_columns.update(row.pop("_config_columns"))
        rows.append(row)
        seen.add(run_dir.resolve())
    # Points of the sweeps given whose run directory does not exist (failed before it was made).
    for p in paths:
        sweep_dir = Path(p)
        for name, point in _sweep_points(sweep_dir).items():
            run_dir = sweep_dir / name
            if run_dir.resolve() not in seen and not is_run_dir(run_dir):
                status = point.get("status") if point.get("status") not in (None, "missing") else "missing"
                row = {"run_dir": str(run_dir), "status": status, "error": point.get("error"),
                       "sweep": sweep_dir.name, "wall_time_s": _number(point.get("wall_time_s"))}
                grid = point.get("grid") if isinstance(point.get("grid"), dict) else {}
                for k, v in grid.items():
                    row[resolve_key(str(k))] = v
                rows.append(row)
                config_columns.update(resolve_key(str(k)) for k in grid)
    df = pd.DataFrame(rows)
    for col in INFO_COLUMNS:
        if col not in df.columns:
            df[col] = None
    df.attrs["config_columns"] = sorted(config_columns)
    return df


# ---------------------------------------------------------------------- aggregation
def resolve_key(key: str) -> str:
    """``strategy`` -> ``strategy.name`` (also ``scenario``, ``model``, ``dataset``)."""
    return ALIASES.get(key, key)


def default_group_by(df: "pd.DataFrame") -> list[str]:  # noqa: F821
    """Every config key whose value varies across the runs, except seeds, names, paths,
    logging and checkpointing; ``strategy.name`` when none varies."""
    config_columns = df.attrs.get("config_columns") or [c for c in df.columns if "." in c and not c.startswith("summary.")]
    keys = []
    for col in config_columns:
        if col not in df.columns or col in NOT_GROUP_KEYS or col.startswith(NOT_GROUP_PREFIXES):
            continue
        if df[col].dropna().astype(str).nunique() > 1:
            keys.append(col)
    return keys or (["strategy.name"] if "strategy.name" in df.columns else [])


def _key_str(v: Any) -> str:
    """A group value as text: integral floats as integers, missing as '–'."""
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when unknown."""
    if metric in LOWER_IS_BETTER or metric.startswith("wf"):
        return -1
    if metric in HIGHER_IS_BETTER or metric.startswith("wp"):
        return 1
    return 0


def excluded(df: "pd.DataFrame") -> "pd.DataFrame":  # noqa: F821
    """The runs that are not finished (never averaged)."""
    return df[df["status"] != "finished"]


def aggregate(df: "pd.DataFrame", group_by: Sequence[str] | None = None,  # noqa: F821
              metrics: Sequence[str] | None = None) -> "pd.DataFrame":  # noqa: F821
    """Mean, std (ddof=1; NaN for one run) and n of each metric over the finished runs of each
    group: columns ``<group keys>``, ``n``, ``<m>_mean``, ``<m>_std``, ``<m>_n`` (runs where
    the metric is defined), ``wall_time_s_mean``, ``trainable_params_mean``."""
    import pandas as pd

    group_by = [resolve_key(k) for k in (default_group_by(df) if group_by is None else group_by)]
    metrics = list(DEFAULT_METRICS if metrics is None else metrics)
    missing = [k for k in group_by if k not in df.columns]
    if missing:
        raise ClbenchError(f"unknown group-by key(s) {', '.join(missing)}; use flattened config keys such as "
                           "strategy.name or train.lr (aliases: strategy, scenario, model, dataset)")
    done = df[df["status"] == "finished"].copy()
    for m in metrics:
        if m not in done.columns:
            done[m] = float("nan")
    extra = [c for c in ("wall_time_s", "trainable_params") if c not in metrics]
    numeric = {c: pd.to_numeric(done[c], errors="coerce") for c in metrics + extra}
    keys = done[group_by].map(_key_str) if group_by else pd.DataFrame(index=done.index)
    out_rows = []
    groups: dict[tuple, list] = {}
    for i, key in zip(done.index, keys.itertuples(index=False, name=None)):
        groups.setdefault(tuple(key), []).append(i)
    for key, idx in sorted(groups.items()):
        row: dict[str, Any] = dict(zip(group_by, key))
        row["n"] = len(idx)
        for c in metrics + extra:
            values = numeric[c].loc[idx].dropna()
            row[f"{c}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{c}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
            row[f"{c}_n"] = len(values)
        out_rows.append(row)
    columns = group_by + ["n"] + [f"{c}_{s}" for c in metrics + extra for s in ("mean", "std", "n")]
    return pd.DataFrame(out_rows, columns=columns)


def best_rows(table: "pd.DataFrame", metric: str) -> set[int]:  # noqa: F821
    """Positions of the groups with the best mean of ``metric`` (ties all best; none if unknown direction)."""
    sign = direction(metric)
    col = table[f"{metric}_mean"]
    if sign == 0 or col.notna().sum() < 2:
        return set()
    best = col.max() if sign > 0 else col.min()
    return {i for i, v in enumerate(col) if v == v and abs(v - best) <= 1e-12}


# ---------------------------------------------------------------------- rendering
def _fmt(mean: float, std: float, metric: str, pm: str) -> str:
    if mean != mean:
        return "–"
    scale, digits = (100.0, 2) if metric in FRACTION_METRICS or metric.startswith(("wf", "wp")) else (1.0, 3)
    text = f"{mean * scale:.{digits}f}"
    return text + (f" {pm} {std * scale:.{digits}f}" if std == std else "")


def _params(v: float) -> str:
    if v != v:
        return "–"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else (f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}")


def _header(metric: str) -> str:
    arrow = {1: " ↑", -1: " ↓"}.get(direction(metric), "")
    unit = " (%)" if metric in FRACTION_METRICS or metric.startswith(("wf", "wp")) else ""
    return f"{metric}{unit}{arrow}"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("$", r"\$"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        text = text.replace(a, b)
    return text


def _excluded_lines(df: "pd.DataFrame") -> list[str]:  # noqa: F821
    lines = []
    for _, r in excluded(df).iterrows():
        err = r.get("error")
        lines.append(f"{r['run_dir']}: {r['status']}" + (f" ({err})" if isinstance(err, str) and err else ""))
    return lines


def render(df: "pd.DataFrame", table: "pd.DataFrame", metrics: Sequence[str], fmt: str = "md") -> str:  # noqa: F821
    """The table in ``fmt`` (md, csv, latex, json): mean ± std (n), best mean per column in
    bold (md, latex), wall time and trainable parameters per group, then the runs left out."""
    group_by = [c for c in table.columns if c != "n" and not c.endswith(("_mean", "_std", "_n"))]
    if fmt == "json":
        return json.dumps({"groups": json.loads(table.to_json(orient="records", double_precision=15)),
                           "excluded": json.loads(excluded(df)[["run_dir", "status", "error"]].to_json(orient="records"))},
                          indent=1)
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt not in ("md", "latex", "html"):
        raise ClbenchError(f"unknown format {fmt!r}; choose md, csv, latex or json")
    latex = fmt == "latex"
    pm = r"$\pm$" if latex else "±"
    best = {m: best_rows(table, m) for m in metrics}
    header = [*group_by, "n", *(_header(m) for m in metrics), "wall time (s)", "params"]
    body = []
    for i, (_, r) in enumerate(table.iterrows()):
        cells = [str(r[k]) for k in group_by] + [str(int(r["n"]))]
        for m in metrics:
            cell = _fmt(r[f"{m}_mean"], r[f"{m}_std"], m, pm)
            if latex:
                cell = cell.replace("–", "--")
            if i in best[m]:
                cell = rf"\textbf{{{cell}}}" if latex else f"**{cell}**"
            cells.append(cell)
        wall = r["wall_time_s_mean"]
        cells.append("–" if wall != wall else f"{wall:.1f}")
        cells.append(_params(r["trainable_params_mean"]))
        body.append(cells)
    notes = _excluded_lines(df)
    if fmt == "html":
        import html

        def cell(c: str) -> str:
            bold = c.startswith("**")
            return f"<td><b>{html.escape(c.strip('*'))}</b></td>" if bold else f"<td>{html.escape(c)}</td>"
        rows = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in body)
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        return (f'<table class="compare"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
                "<p>mean ± std (ddof=1) over the finished runs of each group; best mean per column in bold.</p>"
                + (f"<p>Not averaged ({len(notes)} run(s) not finished):</p><ul>{items}</ul>" if notes else ""))
    if latex:
        def esc(c: str) -> str:
            return c if c.startswith(r"\textbf") or "$" in c else _latex_escape(c)
        head = [_latex_escape(h).replace("↑", r"$\uparrow$").replace("↓", r"$\downarrow$") for h in header]
        lines = [r"\begin{tabular}{" + "l" * len(group_by) + "r" * (len(header) - len(group_by)) + "}", r"\toprule",
                 " & ".join(head) + r" \\", r"\midrule"]
        lines += [" & ".join(esc(c) for c in row) + r" \\" for row in body]
        lines += [r"\bottomrule", r"\end{tabular}"]
        lines += [f"% not averaged: {_latex_escape(n)}" for n in notes]
        return "\n".join(lines) + "\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines.append("")
    lines.append("mean ± std (ddof=1) over the finished runs of each group; best mean per column in bold.")
    if notes:
        lines.append(f"Not averaged ({len(notes)} run(s) not finished):")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def compare(paths: Sequence[str], group_by: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
            fmt: str = "md") -> str:
    """``clbench compare``: load, aggregate and render in one call."""
    df = load(*paths)
    metrics = list(DEFAULT_METRICS if metrics is None else metrics)
    return render(df, aggregate(df, group_by, metrics), metrics, fmt)


def _csv_list(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``clbench compare``."""
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="run directories, sweep directories, or folders of runs")
    parser.add_argument("--group-by", help="comma-separated config keys (default: the keys that vary, except seed)")
    parser.add_argument("--metrics", help=f"comma-separated summary metrics (default: {','.join(DEFAULT_METRICS)})")
    parser.add_argument("--format", default="md", choices=("md", "csv", "latex", "json"))


def main(args: argparse.Namespace) -> int:
    """Entry point of ``clbench compare``."""
    sys.stdout.write(compare(args.paths, _csv_list(args.group_by), _csv_list(args.metrics), args.format))
    return 0
