"""``clbench.results`` / ``clbench compare``: run directories written synthetically with known
numbers (aggregates checked against hand-computed mean/std), plus one real tiny run on digits."""

from __future__ import annotations

import io
import json
import statistics
from contextlib import redirect_stdout
from pathlib import Path

import pandas as pd
import pytest
import yaml

from clbench import results
from clbench.cli import main
from clbench.registry import ClbenchError

ACC = {"finetune": [0.20, 0.24, 0.19], "replay": [0.61, 0.55, 0.58]}
FORG = {"finetune": [0.90, 0.85, 0.88], "replay": [0.30, 0.35, 0.28]}


def write_run(run_dir: Path, config: dict, summary: dict | None, records: list[dict] | None = None,
              info: dict | None = None, tail: str = "") -> Path:
    """A run directory with the given files (summary None: not written)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "run_info.json").write_text(json.dumps(info or {"trainable_params": 1234}))
    lines = "".join(json.dumps(r) + "\n" for r in records or [])
    (run_dir / "metrics.jsonl").write_text(lines + tail)
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def config(strategy: str, seed: int, lr: float = 0.1) -> dict:
    return {"seed": seed, "name": f"{strategy}-{seed}", "output_dir": "runs",
            "scenario": {"name": "class_incremental", "dataset": "digits", "data_root": f"/data/{seed}"},
            "model": {"name": "mlp", "hidden": [100, 100]}, "strategy": {"name": strategy},
            "train": {"lr": lr, "batch_size": 32}, "logging": {"console": seed == 0}}


def summary(acc: float, forg: float, status: str = "finished", **extra) -> dict:
    gaps = [{"experience": 1, "iteration": 10, "pre_acc": 0.9, "min_acc": 0.5, "gap": 0.4, "has_gap": True,
             "iters_to_min": 3, "recovery_iters": None},
            {"experience": 2, "iteration": 20, "pre_acc": 0.8, "min_acc": 0.8, "gap": None, "has_gap": False,
             "iters_to_min": None, "recovery_iters": None}]
    return {"status": status, "acc": acc, "avg_inc_acc": acc + 0.1, "forgetting": forg, "bwt": -forg,
            "fwt": None, "fwt_note": "class-IL", "min_acc": acc / 2, "wc_acc": acc * 0.8, "stability_gaps": gaps,
            "trainable_params": 1000, "matrix": [[1.0]], **extra}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep: 2 strategies x 3 seeds finished, one failed replay point (acc 0.99, must not be
    averaged), one killed point (no summary), one point that never made its run directory."""
    root = tmp_path / "sw"
    points = []
    for strategy, accs in ACC.items():
        for seed, acc in enumerate(accs):
            name = f"strategy={strategy},seed={seed}"
            write_run(root / name, config(strategy, seed), summary(acc, FORG[strategy][seed]))
            points.append({"name": name, "grid": {"strategy": strategy, "seed": seed}, "status": "finished",
                           "run_dir": str(root / name), "error": None, "wall_time_s": 10.0 * (seed + 1)})
    write_run(root / "strategy=replay,seed=3", config("replay", 3),
              summary(0.99, 0.0, status="failed", error="NonFiniteLossError: loss is nan at experience 1"))
    write_run(root / "strategy=replay,seed=4", config("replay", 4), None,
              [{"step": 1, "kind": "train", "time": 1.0, "train/loss": 2.0}], tail='{"step": 2, "ki')
    points.append({"name": "strategy=ewc,seed=0", "grid": {"strategy": "ewc", "seed": 0}, "status": "failed",
                   "run_dir": str(root / "strategy=ewc,seed=0"), "error": "ClbenchError: bad lambda_", "wall_time_s": None})
    (root / "sweep.json").write_text(json.dumps({"name": "sw", "points": points}))
    return root


def test_load_one_row_per_run_with_flattened_config(sweep):
    df = results.load(sweep)
    assert len(df) == 9  # 6 finished + failed + killed + never started
    row = df[df["run_dir"] == str(sweep / "strategy=replay,seed=1")].iloc[0]
    assert row["strategy.name"] == "replay" and row["train.lr"] == 0.1 and row["seed"] == 1
    assert row["acc"] == ACC["replay"][1] and row["status"] == "finished" and row["wall_time_s"] == 20.0
    assert row["model.hidden"] == "[100, 100]" and row["trainable_params"] == 1000
    assert pd.isna(row["fwt"]) and row["fwt_note"] == "class-IL"
    statuses = dict(zip(df["run_dir"].map(lambda p: Path(p).name), df["status"]))
    assert statuses["strategy=replay,seed=3"] == "failed"
    assert statuses["strategy=replay,seed=4"] == "incomplete"
    assert statuses["strategy=ewc,seed=0"] == "failed"
    # a single run directory and a folder above the sweep find the same runs
    assert len(results.load(sweep / "strategy=replay,seed=1")) == 1
    assert set(results.load(sweep.parent)["run_dir"]) >= set(df["run_dir"]) - {str(sweep / "strategy=ewc,seed=0")}


def test_gap_is_mean_depth_over_boundaries_no_gap_counts_zero():
    assert results.mean_gap(summary(0.5, 0.1)) == pytest.approx((0.4 + 0.0) / 2)
    old_form = {"stability_gaps": [{"pre_acc": 0.9, "min_acc": 0.6, "gap": None}, {"pre_acc": None, "min_acc": 0.2}]}
    assert results.mean_gap(old_form) == pytest.approx(0.3)
    assert results.mean_gap({"stability_gaps": [], "mean_gap": 0.25}) == 0.25
    assert results.mean_gap({}) is None


def test_aggregate_matches_hand_computed_mean_std_and_excludes_unfinished(sweep):
    df = results.load(sweep)
    assert results.default_group_by(df) == ["strategy.name"]  # seed, name, data_root, logging vary but are not methods
    table = results.aggregate(df, ["strategy"], ["acc", "forgetting", "gap", "fwt"]).set_index("strategy.name")
    assert list(table.index) == ["finetune", "replay"]
    for s in ACC:
        assert table.loc[s, "n"] == 3
        assert table.loc[s, "acc_mean"] == pytest.approx(statistics.mean(ACC[s]))
        assert table.loc[s, "acc_std"] == pytest.approx(statistics.stdev(ACC[s]))
        assert table.loc[s, "forgetting_mean"] == pytest.approx(statistics.mean(FORG[s]))
        assert table.loc[s, "gap_mean"] == pytest.approx(0.2) and table.loc[s, "gap_std"] == pytest.approx(0.0)
        assert pd.isna(table.loc[s, "fwt_mean"]) and table.loc[s, "fwt_n"] == 0
    assert table.loc["replay", "wall_time_s_mean"] == pytest.approx(20.0)
    assert set(results.excluded(df)["status"]) == {"failed", "incomplete"}
    with pytest.raises(ClbenchError, match="unknown group-by"):
        results.aggregate(df, ["strategy.nope"], ["acc"])


def test_markdown_marks_best_per_direction_and_names_excluded_runs(sweep):
    text = results.compare([str(sweep)], metrics=["acc", "forgetting"], fmt="md")
    lines = text.splitlines()
    replay = next(line for line in lines if line.startswith("| replay"))
    finetune = next(line for line in lines if line.startswith("| finetune"))
    acc_r = f"{100 * statistics.mean(ACC['replay']):.2f} ± {100 * statistics.stdev(ACC['replay']):.2f}"
    assert f"**{acc_r}**" in replay  # higher accuracy is better
    forg_r = f"{100 * statistics.mean(FORG['replay']):.2f}"
    assert f"**{forg_r}" in replay and "**" not in finetune  # lower forgetting is better
    assert "strategy=replay,seed=3: failed (NonFiniteLossError: loss is nan at experience 1)" in text
    assert "strategy=replay,seed=4: incomplete" in text
    assert "strategy=ewc,seed=0: failed (ClbenchError: bad lambda_)" in text
    assert "99.00" not in text  # the failed run's accuracy is never averaged in


def test_latex_csv_json(sweep):
    latex = results.compare([str(sweep)], metrics=["acc", "avg_inc_acc"], fmt="latex")
    assert r"\toprule" in latex and r"\midrule" in latex and r"\bottomrule" in latex
    assert r"avg\_inc\_acc" in latex and r"strategy.name" in latex and r"$\pm$" in latex
    assert r"\textbf{" + f"{100 * statistics.mean(ACC['replay']):.2f}" in latex
    assert "strategy=replay,seed=3" in latex and latex.count(r"\\") >= 3
    csv = pd.read_csv(io.StringIO(results.compare([str(sweep)], metrics=["acc"], fmt="csv"))).set_index("strategy.name")
    assert csv.loc["finetune", "acc_mean"] == pytest.approx(statistics.mean(ACC["finetune"]))
    assert csv.loc["finetune", "acc_std"] == pytest.approx(statistics.stdev(ACC["finetune"]))
    data = json.loads(results.compare([str(sweep)], metrics=["acc"], fmt="json"))
    groups = {g["strategy.name"]: g for g in data["groups"]}
    assert groups["replay"]["acc_mean"] == pytest.approx(statistics.mean(ACC["replay"])) and groups["replay"]["n"] == 3
    assert {Path(e["run_dir"]).name for e in data["excluded"]} == {"strategy=replay,seed=3", "strategy=replay,seed=4",
                                                                  "strategy=ewc,seed=0"}


def test_group_by_varying_config_keys(tmp_path):
    for lr in (0.1, 0.01):
        for seed in (0, 1):
            write_run(tmp_path / f"lr{lr}-s{seed}", config("replay", seed, lr), summary(lr + seed / 100, 0.1))
    df = results.load(tmp_path)
    assert results.default_group_by(df) == ["train.lr"]
    table = results.aggregate(df).set_index("train.lr")
    assert table.loc["0.1", "acc_mean"] == pytest.approx(0.105) and table.loc["0.01", "n"] == 2


def test_cli_compare_and_errors(sweep, tmp_path, capsys):
    assert main(["compare", str(sweep), "--metrics", "acc,min_acc", "--format", "md"]) == 0
    out = capsys.readouterr().out
    assert "| strategy.name | n | acc (%) ↑ | min_acc (%) ↑ |" in out
    assert main(["compare", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2


def test_real_digits_run(tmp_path):
    from clbench.config import load_config
    from clbench.engine import run

    fast = ["logging.console=false", "logging.tensorboard=false", "train.epochs=1", "eval.every=5",
            f"output_dir={tmp_path}", "name=real"]
    out = run(load_config(None, fast))
    df = results.load(tmp_path)
    assert len(df) == 1 and df.loc[0, "status"] == "finished"
    assert df.loc[0, "acc"] == pytest.approx(out["acc"]) and df.loc[0, "strategy.name"] == "replay"
    table = results.aggregate(df, ["strategy"], ["acc", "gap"])
    assert table.loc[0, "acc_mean"] == pytest.approx(out["acc"]) and table.loc[0, "n"] == 1
    text = results.compare([str(tmp_path)], fmt="md")
    assert f"{100 * out['acc']:.2f}" in text
