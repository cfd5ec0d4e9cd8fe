"""``clbench report``: the figures' plotted data equal the metrics they come from (JSON
sidecars and the matplotlib objects), runs in progress / killed / online / TTA, and the HTML
page rendered by a real headless Chromium (screenshot pixels, no console errors)."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from html import unescape
from pathlib import Path

import pytest

from clbench import plots, report
from clbench.cli import main
from test_results import config, summary, write_run

MATRIX = [[0.9, None, None], [0.5, 0.95, None], [0.6, 0.7, 0.92]]


def records(shift: float = 0.0) -> list[dict]:
    """A 3-experience run: 10 iterations each, evaluated every 2, loss every 5."""
    out = []
    for step in range(2, 31, 2):
        k = (step - 1) // 10
        rec = {"step": step, "kind": "eval", "time": step / 10}
        for i in range(k + 1):
            rec[f"eval/acc/task_{i}"] = round(0.5 + 0.01 * step - 0.1 * i + shift, 4)
        rec["eval/acc/avg"] = sum(rec[f"eval/acc/task_{i}"] for i in range(k + 1)) / (k + 1)
        out.append(rec)
        if step % 10 == 0:
            out.append({"step": step, "kind": "experience", "time": step / 10,
                        **{f"exp/acc/task_{i}": MATRIX[k][i] for i in range(k + 1)}})
        if step % 5 == 0:
            out.append({"step": step, "kind": "train", "time": step / 10, "train/loss": 2.0 / step})
    return out


def full_summary(acc: float) -> dict:
    s = summary(acc, 0.2)
    s["matrix"] = MATRIX
    return s


def sidecar(out: Path, stem: str) -> dict:
    return json.loads((out / "figures" / f"{stem}.json").read_text())


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sw"
    for strategy, shift in (("finetune", -0.2), ("replay", 0.0)):
        for seed in (0, 1):
            write_run(root / f"{strategy}-{seed}", config(strategy, seed), full_summary(0.5 + shift + seed / 10),
                      records(shift + seed / 20))
    (root / "sweep.json").write_text(json.dumps({"points": []}))
    return root


def test_single_run_figures_hold_the_metrics(tmp_path):
    run_dir = write_run(tmp_path / "one", config("replay", 0), full_summary(0.7), records())
    html = report.build([str(run_dir)], tmp_path / "rep")
    out = tmp_path / "rep"
    stem = "one"
    tasks = sidecar(out, f"{stem}_task_accuracy")
    for i in range(3):
        expected = [(r["step"], r[f"eval/acc/task_{i}"]) for r in records() if f"eval/acc/task_{i}" in r]
        got = tasks["series"][f"task_{i}"]
        assert list(zip(got["x"], got["y"])) == expected
    assert tasks["boundaries"] == [10, 20, 30]
    gap = tasks["gaps"][0]  # from summary.json's stability_gaps
    assert gap["boundary"] == 10 and gap["min_iter"] == 13 and gap["gap"] == 0.4 and gap["recovery_iter"] is None
    assert tasks["gaps"][1]["gap"] is None  # the "no gap" form
    assert sidecar(out, f"{stem}_accuracy_matrix")["matrix"] == MATRIX
    loss = sidecar(out, f"{stem}_loss")["series"]["training loss"]
    assert loss == {"x": [10, 20, 30], "y": [0.2, 0.1, 2.0 / 30]}
    avg = sidecar(out, f"{stem}_avg_accuracy")["series"]["average accuracy (seen tasks)"]
    assert avg["y"] == [r["eval/acc/avg"] for r in records() if r["kind"] == "eval"]
    for ext in ("png", "pdf"):
        assert (out / "figures" / f"{stem}_task_accuracy.{ext}").stat().st_size > 1000
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 4 and "http://" not in page and "https://" not in page


def test_plot_objects_hold_the_data():
    curves = {"task_0": ([1, 2, 3], [0.9, 0.4, 0.8])}
    gaps = [{"experience": 1, "iteration": 1, "pre_acc": 0.9, "min_acc": 0.4, "gap": 0.5, "iters_to_min": 1,
             "recovery_iters": 2}]
    fig, data = plots.task_curves(curves, [1, 3], gaps)
    ax = fig.axes[0]
    assert ax.lines[0].get_xydata().tolist() == [[1, 0.9], [2, 0.4], [3, 0.8]]
    assert [a.get_xdata()[0] for a in ax.lines[1:3]] == [1, 3]  # experience ends
    marker = [line for line in ax.lines if line.get_marker() == "v"][0]
    assert marker.get_xydata().tolist() == [[2, 0.4]]
    assert data["gaps"][0]["recovery_iter"] == 3
    runs = [([0, 1, 2], [0.2, 0.4, 0.6]), ([0, 1, 2], [0.4, 0.4, 0.9]), ([0, 1], [0.3, 0.1])]
    fig, data = plots.band_curves({"g": runs}, "x", "y", "t")
    xs, mean = fig.axes[0].lines[0].get_xdata().tolist(), fig.axes[0].lines[0].get_ydata().tolist()
    assert xs == [0, 1] and mean == pytest.approx([0.3, 0.3])  # only the x every run has
    assert data["groups"]["g"]["std"] == pytest.approx([statistics.stdev([0.2, 0.4, 0.3]), statistics.stdev([0.4, 0.4, 0.1])])


def test_sweep_comparison_figures(sweep, tmp_path):
    out = tmp_path / "rep"
    page = report.build([str(sweep)], out).read_text()
    band = sidecar(out, "compare_avg_accuracy")["groups"]
    for strategy, shift in (("finetune", -0.2), ("replay", 0.0)):
        per_run = [[r["eval/acc/avg"] for r in records(shift + seed / 20) if r["kind"] == "eval"] for seed in (0, 1)]
        g = band[f"{strategy}"]
        assert g["n"] == 2 and g["x"] == list(range(2, 31, 2))
        assert g["mean"] == pytest.approx([statistics.mean(v) for v in zip(*per_run)])
        assert g["std"] == pytest.approx([statistics.stdev(v) for v in zip(*per_run)])
    scatter = sidecar(out, "compare_min_vs_final")["groups"]
    assert scatter["replay"]["points"] == [[0.5, 0.25], [0.6, 0.3]]
    assert '<table class="compare">' in page and "<b>55.00 ± 7.07</b>" in page


def test_in_progress_and_killed_runs(tmp_path):
    recs = [r for r in records() if r["step"] <= 14]
    run_dir = write_run(tmp_path / "live", config("replay", 0), None, recs, tail='{"step": 16, "kind": "ev')
    out = tmp_path / "rep"
    report.build([str(run_dir)], out)
    assert sidecar(out, "live_accuracy_matrix")["matrix"] == [[0.9]]  # rebuilt from the experience records so far
    tasks = sidecar(out, "live_task_accuracy")
    assert tasks["series"]["task_1"]["x"] == [12, 14] and tasks["gaps"] == []
    # a directory with only config.yaml (killed before the first record) still gets a section
    write_run(tmp_path / "dead", config("replay", 1), None, [])
    page = report.build([str(tmp_path / "dead")], tmp_path / "rep2").read_text()
    assert "No metrics recorded yet" in page and "incomplete" in page


def test_online_and_tta_runs(tmp_path):
    online = {**full_summary(0.5), "a_auc": 0.5, "online_samples": [100, 200, 300], "online_acc": [0.3, 0.6, 0.6]}
    write_run(tmp_path / "runs" / "blurry", config("replay", 0), online, records())
    tta = {"status": "finished", "online_error": [0.4, 0.2], "mean_error": 0.3, "domains": ["gaussian_noise", "fog"]}
    write_run(tmp_path / "runs" / "tta", config("tent", 0), tta,
              [{"step": 5, "kind": "experience", "tta/error/domain_0": 0.4}])
    out = tmp_path / "rep"
    report.build([str(tmp_path / "runs")], out)
    curve = sidecar(out, "blurry_online")
    assert curve["samples"] == [100, 200, 300] and curve["a_auc"] == pytest.approx([0.3, 0.45, 0.5])
    bars = sidecar(out, "tta_tta_error")
    assert bars["categories"] == ["gaussian_noise", "fog"] and list(bars["values"].values()) == [[0.4, 0.2]]
    assert sidecar(out, "compare_tta_error")["values"]["tent"] == [0.4, 0.2]


def test_cli_report(sweep, tmp_path, capsys):
    assert main(["report", str(sweep), "-o", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "index.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1200, 1600
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--hide-scrollbars"]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(sweep, tmp_path):
    from PIL import Image
    import numpy as np

    html = report.build([str(sweep)], tmp_path / "rep")
    url = html.resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'p1'}", "--enable-logging=stderr", "--v=0",
                          f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=5000", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-loaded="1"' in dom.stdout and 'data-broken-images="0"' in dom.stdout
    n_images = int(dom.stdout.split('data-images="')[1].split('"')[0])
    assert n_images == dom.stdout.count("<img") >= 10
    errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not errors, errors
    rects = json.loads(unescape(dom.stdout.split('data-image-rects="')[1].split('"')[0]))
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'p2'}", f"--screenshot={shot}",
                    f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=5000", url],
                   capture_output=True, text=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    visible = [(x, y, w, h) for x, y, w, h in rects if y + h <= HEIGHT]
    assert len(visible) >= 2 and all(w > 300 and h > 200 for _, _, w, h in visible)
    for x, y, w, h in visible:  # where each image is, a drawn plot: varied pixels, some in colour
        region = pixels[y + 2:y + h - 2, x + 2:x + w - 2]
        assert region.std() > 20, (x, y, w, h)
        assert ((region.max(axis=2) - region.min(axis=2)) > 60).sum() > 500, (x, y, w, h)
    shutil.copy(shot, tmp_path.parent / "clbench_report_screenshot.png")  # to look at by hand
