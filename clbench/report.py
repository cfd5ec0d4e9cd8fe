"""``clbench report RUN_OR_SWEEP_DIR [more ...] [-o report/]``: a self-contained HTML page
(figures embedded as base64 PNG, no network needed) plus every figure as PNG, PDF and a JSON
sidecar holding exactly the data it plots (``figures/<name>.{png,pdf,json}``).

Per run: the accuracy of every task over iterations with experience ends and stability gaps,
the average accuracy, the accuracy matrix, the training loss, Si-Blurry's online accuracy
(A_auc) and TTA's error per corruption domain when present, the config and run info.
For several runs: each group's (strategy's) average-accuracy curve with a mean ± std band over
seeds, the ``clbench compare`` table, min-ACC vs final ACC, and the online / TTA curves per
group.  Reads only what is on disk, so it works on runs in progress (partial last line of
``metrics.jsonl``, no ``summary.json``) and on killed runs.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clbench import results
from clbench.registry import ClbenchError

TASK_KEY = re.compile(r"^eval/acc/task_(\d+)$")
EXP_KEY = re.compile(r"^exp/acc/task_(\d+)$")
TTA_KEY = re.compile(r"^tta/error/domain_(\d+)$")


@dataclass
class Run:
    """What a run directory holds (each part may be missing)."""

    run_dir: Path
    status: str
    group: str
    config: dict[str, Any]
    info: dict[str, Any]
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str, kind: str | None = None, x_key: str = "step") -> tuple[list[float], list[float]]:
        """(x, y) of every record holding a number under ``key`` (optionally of one ``kind``)."""
        xs, ys = [], []
        for r in self.records:
            if (kind is None or r.get("kind") == kind) and _num(r.get(key)) and _num(r.get(x_key)):
                xs.append(r[x_key])
                ys.append(r[key])
        return xs, ys

    def task_curves(self) -> dict[str, tuple[list[float], list[float]]]:
        """``task_<i>`` -> the per-iteration accuracy curve of task i (``eval/acc/task_<i>``)."""
        tasks = sorted({int(m.group(1)) for r in self.records for k in r if (m := TASK_KEY.match(k))})
        return {f"task_{i}": self.series(f"eval/acc/task_{i}", "eval") for i in tasks}

    def boundaries(self) -> list[float]:
        """Iterations at which experiences ended (from the ``experience`` records)."""
        return [r["step"] for r in self.records if r.get("kind") == "experience" and _num(r.get("step"))]

    def matrix(self) -> list[list[float | None]] | None:
        """The accuracy matrix: summary.json's, else rebuilt from the experience records so far."""
        m = self.summary.get("matrix")
        if isinstance(m, list) and m and any(v is not None for row in m for v in row):
            return m
        rows = [r for r in self.records if r.get("kind") == "experience" and any(EXP_KEY.match(k) for k in r)]
        if not rows:
            return None
        n = max(int(m.group(1)) for r in rows for k in r if (m := EXP_KEY.match(k))) + 1
        n = max(n, int(self.info.get("n_experiences") or 0))
        return [[r.get(f"exp/acc/task_{i}") for i in range(n)] for r in rows]

    def online(self) -> tuple[list[float], list[float]]:
        """Si-Blurry's periodic (samples, exposed-class accuracy): summary.json's or the metrics'."""
        s, a = self.summary.get("online_samples"), self.summary.get("online_acc")
        if isinstance(s, list) and isinstance(a, list) and s and len(s) == len(a):
            return s, a
        return self.series("eval/acc/exposed", "eval", x_key="eval/samples")

    def tta(self) -> tuple[list[str], list[float]]:
        """TTA: (domain names, online error per domain): summary.json's or the metrics'."""
        errors = self.summary.get("online_error")
        if isinstance(errors, list) and errors:
            names = self.summary.get("domains") or [str(i) for i in range(len(errors))]
            return [str(n) for n in names], errors
        found = {int(m.group(1)): r[k] for r in self.records for k in r if (m := TTA_KEY.match(k)) and _num(r[k])}
        domains = (self.info.get("scenario_info") or {}).get("domains") or {}
        name = (lambda k: domains.get(str(k), domains.get(k, str(k)))) if isinstance(domains, dict) else \
            (lambda k: domains[k] if k < len(domains) else str(k))
        return [str(name(k)) for k in sorted(found)], [found[k] for k in sorted(found)]


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[-80:] or "run"


# ---------------------------------------------------------------------- loading
def load_runs(paths: list[str]) -> tuple[list[Run], Any, list[str]]:
    """The runs under ``paths``, the :func:`clbench.results.load` frame and the group keys."""
    df = results.load(*paths)
    group_by = results.default_group_by(df)
    runs = []
    for _, row in df.iterrows():
        run_dir = Path(row["run_dir"])
        if not results.is_run_dir(run_dir):
            continue  # a sweep point that never made its run directory (named in the table)
        label = ", ".join(results._key_str(row.get(k)) if len(group_by) == 1 else f"{k}={results._key_str(row.get(k))}"
                          for k in group_by) or run_dir.name
        runs.append(Run(run_dir, row["status"], label, results.read_config(run_dir),
                        results.read_json(run_dir / results.RUN_INFO) or {},
                        results.read_json(run_dir / results.SUMMARY) or {}, results.read_metrics(run_dir)))
    return runs, df, group_by


# ---------------------------------------------------------------------- figures
class FigureWriter:
    """Saves each figure as PNG, PDF and JSON sidecar under ``out/figures`` and returns its
    HTML (the PNG embedded as base64)."""

    def __init__(self, out_dir: Path) -> None:
        self.dir = out_dir / "figures"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []

    def __call__(self, fig: Any, data: dict[str, Any], name: str, caption: str) -> str:
        import io

        stem = _slug(name)
        fig.savefig(self.dir / f"{stem}.pdf")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        (self.dir / f"{stem}.png").write_bytes(buf.getvalue())
        (self.dir / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
        self.names.append(stem)
        b64 = base64.b64encode(buf.getvalue()).decode()
        return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{b64}">'
                f'<figcaption>{html.escape(caption)} · <a href="figures/{stem}.pdf">PDF</a> · '
                f'<a href="figures/{stem}.json">data</a></figcaption></figure>')


def run_section(run: Run, save: FigureWriter, key: str) -> str:
    """The figures, config and run info of one run."""
    from clbench import plots

    parts = []
    boundaries = run.boundaries()
    curves = {k: v for k, v in run.task_curves().items() if v[0]}
    gaps = [g for g in run.summary.get("stability_gaps") or [] if isinstance(g, dict)]
    if curves:
        parts.append(save(*plots.task_curves(curves, boundaries, gaps), f"{key}_task_accuracy",
                          "accuracy of every task per iteration; dotted: experience ends; red: stability gap"))
    avg = run.series("eval/acc/avg", "eval")
    if avg[0]:
        parts.append(save(*plots.line({"average accuracy (seen tasks)": avg}, "iteration", "accuracy",
                                      "average accuracy", boundaries, (-0.02, 1.02)), f"{key}_avg_accuracy", "average accuracy"))
    matrix = run.matrix()
    if matrix:
        parts.append(save(*plots.heatmap(matrix), f"{key}_accuracy_matrix", "accuracy matrix R[j][i]"))
    loss = run.series("train/loss", "train")
    if loss[0]:
        parts.append(save(*plots.line({"training loss": loss}, "iteration", "loss", "training loss", boundaries),
                          f"{key}_loss", "training loss"))
    samples, accs = run.online()
    if samples:
        parts.append(save(*plots.online_curve(samples, accs), f"{key}_online", "Si-Blurry: accuracy vs samples, anytime A_auc"))
    domains, errors = run.tta()
    if domains:
        parts.append(save(*plots.bars({run.group: errors}, domains, "online error", "error per corruption domain"),
                          f"{key}_tta_error", "TTA: online error per domain"))
    if not parts:
        parts.append("<p>No metrics recorded yet.</p>")
    info = {k: v for k, v in run.info.items() if k != "config"}
    scalars = {k: v for k, v in run.summary.items() if not isinstance(v, (list, dict))}
    head = (f'<h3 id="{key}">{html.escape(str(run.run_dir))}</h3>'
            f'<p>status: <b>{html.escape(run.status)}</b> · group: {html.escape(run.group)}</p>')
    details = "".join(f"<details><summary>{t}</summary><pre>{html.escape(body)}</pre></details>" for t, body in (
        ("summary", json.dumps(scalars, indent=1, default=str)),
        ("config", json.dumps(run.config, indent=1, default=str)),
        ("run info", json.dumps(info, indent=1, default=str))))
    return f"<section>{head}{''.join(parts)}{details}</section>"


def _chosen(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by group: the finished ones, or all of a group when none of it finished."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    return {g: [r for r in rs if r.status == "finished"] or rs for g, rs in sorted(groups.items())}


def comparison_section(runs: list[Run], df: Any, group_by: list[str], save: FigureWriter) -> str:
    """Groups side by side: average-accuracy bands, the compare table, min-ACC vs ACC, online and TTA."""
    from clbench import plots

    groups = _chosen(runs)
    label = lambda g, rs: g if any(r.status == "finished" for r in rs) else f"{g} (unfinished)"  # noqa: E731
    parts = []
    avg = {label(g, rs): [s for r in rs if (s := r.series("eval/acc/avg", "eval"))[0]] for g, rs in groups.items()}
    avg = {g: s for g, s in avg.items() if s}
    if avg:
        parts.append(save(*plots.band_curves(avg, "iteration", "average accuracy", "average accuracy (mean ± std over seeds)"),
                          "compare_avg_accuracy", "average accuracy per group, mean ± std over runs"))
    metrics = list(results.DEFAULT_METRICS)
    table = results.aggregate(df, group_by, metrics)
    parts.append(results.render(df, table, metrics, "html"))
    points = {label(g, rs): [(r.summary.get("acc"), r.summary.get("min_acc")) for r in rs] for g, rs in groups.items()}
    if any(_num(a) and _num(m) for pts in points.values() for a, m in pts):
        parts.append(save(*plots.scatter(points, "final ACC", "min-ACC", "min-ACC vs final ACC (star: group mean)"),
                          "compare_min_vs_final", "min-ACC vs final accuracy per run"))
    online = {label(g, rs): [s for r in rs if (s := r.online())[0]] for g, rs in groups.items()}
    online = {g: s for g, s in online.items() if s}
    if online:
        parts.append(save(*plots.band_curves(online, "training samples seen", "accuracy on exposed classes",
                                             "Si-Blurry online accuracy (mean ± std)"), "compare_online", "online accuracy per group"))
    tta = {label(g, rs): [r.tta() for r in rs if r.tta()[0]] for g, rs in groups.items()}
    tta = {g: v for g, v in tta.items() if v}
    if tta:
        domains = max((d for v in tta.values() for d, _ in v), key=len)
        means, stds = {}, {}
        for g, v in tta.items():
            cols = [[e[i] for _, e in v if i < len(e)] for i in range(len(domains))]
            means[g] = [sum(c) / len(c) if c else None for c in cols]
            stds[g] = [math.sqrt(sum((x - sum(c) / len(c)) ** 2 for x in c) / (len(c) - 1)) if len(c) > 1 else None for c in cols]
        parts.append(save(*plots.bars(means, domains, "online error", "TTA error per corruption domain (mean ± std)", stds),
                          "compare_tta_error", "TTA error per domain and group"))
    return "<section><h2>Comparison</h2>" + "".join(parts) + "</section>"


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>clbench report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; max-width: 1100px; color: #222; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ font-size: 0.85em; color: #555; }} pre {{ background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }}
table {{ border-collapse: collapse; font-size: 0.85em; }} th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; }}
section {{ border-top: 2px solid #eee; margin-top: 1.5em; }}
</style></head>
<body data-images="{n_images}">
<h1>clbench report</h1>
<p>{n_runs} run(s) from {sources}.</p>
{body}
<script>
window.addEventListener("load", function () {{
  var imgs = document.images, broken = 0;
  for (var i = 0; i < imgs.length; i++) if (!imgs[i].complete || imgs[i].naturalWidth === 0) broken++;
  document.body.setAttribute("data-broken-images", String(broken));
  var rects = [];
  for (var j = 0; j < imgs.length; j++) {{
    var r = imgs[j].getBoundingClientRect();
    rects.push([Math.round(r.left + window.scrollX), Math.round(r.top + window.scrollY), Math.round(r.width), Math.round(r.height)]);
  }}
  document.body.setAttribute("data-image-rects", JSON.stringify(rects));
  document.body.setAttribute("data-loaded", "1");
}});
</script>
</body></html>
"""


def build(paths: list[str], out_dir: str | Path = "report") -> Path:
    """Write ``out_dir/index.html`` and ``out_dir/figures/*``; returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    runs, df, group_by = load_runs(paths)
    save = FigureWriter(out)
    body = []
    if len(runs) > 1 or len(df) > len(runs):
        body.append(comparison_section(runs, df, group_by, save))
    body.append("<h2>Runs</h2>")
    common = Path(os.path.commonpath([r.run_dir.resolve() for r in runs])) if len(runs) > 1 else None
    for run in runs:
        key = _slug(str(run.run_dir.resolve().relative_to(common)) if common else run.run_dir.resolve().name)
        while any(n.startswith(key + "_") for n in save.names):
            key += "_"
        body.append(run_section(run, save, key))
    page = PAGE.format(n_images=len(save.names), n_runs=len(runs),
                       sources=html.escape(", ".join(map(str, paths))), body="\n".join(body))
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``clbench report``."""
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR", help="run directories, sweep directories, or folders of runs")
    parser.add_argument("-o", "--output", default="report", help="output folder (default: report/)")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``clbench report``."""
    try:
        path = build(args.paths, args.output)
    except OSError as err:
        raise ClbenchError(f"cannot write the report to {args.output}: {err}") from None
    print(f"report written to {path}", file=sys.stderr)
    return 0
