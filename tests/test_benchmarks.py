"""The benchmark scripts run end to end (``--quick``: digits + MLP on CPU) and print one JSON
line with the documented keys and sane values.  Not timed tests: the figures are not checked.

Both scripts run concurrently as subprocesses (single-threaded each) to keep this under a
minute on 2 cores; vs_avalanche is skipped when avalanche-lib is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HAS_AVALANCHE = importlib.util.find_spec("avalanche") is not None
TIMEOUT = 300


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    env = {**os.environ, "WANDB_MODE": "disabled", "CLBENCH_CACHE": str(tmp_path_factory.mktemp("cache")),
           "PYTHONWARNINGS": "ignore"}
    commands = {"eval_overhead": [sys.executable, str(REPO / "benchmarks" / "eval_overhead.py"), "--quick"]}
    if HAS_AVALANCHE:
        commands["vs_avalanche"] = [sys.executable, str(REPO / "benchmarks" / "vs_avalanche.py"), "--quick",
                                    "--check-order", "--eval-overlap"]  # the overlapped evaluator vs Avalanche's
    commands["si_blurry_mvp"] = [sys.executable, str(REPO / "benchmarks" / "si_blurry_mvp.py"), "--quick",
                                "--datasets", "cifar10"]  # the upsampled-input row; one dataset keeps this file fast
    commands["fisher_cost"] = [sys.executable, str(REPO / "benchmarks" / "fisher_cost.py"), "--quick"]
    procs = {name: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in commands.items()}
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        results[name] = (proc.returncode, out, err)
    return results


def _result(outputs, name: str) -> dict:
    rc, out, err = outputs[name]
    assert rc == 0, f"{name} failed (rc {rc}):\n{err[-3000:]}"
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"{name} must print exactly one line on stdout, got {len(lines)}:\n{out[-2000:]}"
    return json.loads(lines[0])


def test_eval_overhead_quick(outputs):
    r = _result(outputs, "eval_overhead")
    assert r["benchmark"] == "eval_overhead"
    for key in ("train_only_s", "with_eval_s", "ratio", "eval_images_per_s", "inference_ceiling_images_per_s",
                "eval_vs_ceiling", "train_only_excluding_eval_s"):
        assert _positive(r[key]), (key, r[key])
    assert math.isclose(r["ratio"], r["with_eval_s"] / r["train_only_s"], rel_tol=0.01, abs_tol=0.002)
    w = r["workload"]
    assert w["quick"] is True and w["dataset"] == "digits" and w["model"].startswith("mlp")
    assert w["experiences"] == 5 and w["eval_tasks"] == "seen" and _positive(w["iterations"])
    p = r["periodic_eval"]
    assert p["calls"] == w["iterations"]  # eval.every=1: once per iteration
    assert _positive(p["images"]) and _positive(p["seconds"])
    assert r["train_only_evaluator"]["periodic"]["calls"] == 5  # eval.every=0: at each experience's end only
    assert r["train_only_evaluator"]["full_test"]["calls"] == 6  # baseline + 5 experience ends
    assert r["ceiling_batch_size"] in [int(b) for b in r["ceiling_per_batch_size"]]


@pytest.mark.skipif(not HAS_AVALANCHE, reason="avalanche-lib not installed")
def test_vs_avalanche_quick(outputs):
    r = _result(outputs, "vs_avalanche")
    assert r["benchmark"] == "vs_avalanche"
    for key in ("clbench_s", "avalanche_s", "speedup"):
        assert _positive(r[key]), (key, r[key])
    assert math.isclose(r["speedup"], r["avalanche_s"] / r["clbench_s"], rel_tol=0.01, abs_tol=0.01)
    w = r["workload"]
    assert w["quick"] is True and w["same_sample_order"] and w["same_initial_weights"]
    assert sorted(w["class_order"]) == list(range(10))
    assert r["order_check"] == "passed"
    assert w["clbench_settings"]["eval_overlap"] is True
    cl, av = r["clbench_matrix"], r["avalanche_matrix"]
    assert [len(row) for row in cl] == [len(row) for row in av] == [1, 2, 3, 4, 5]
    # same weights, batches, objective and eval images: equal up to float non-associativity
    diff = max(abs(a - b) for row_c, row_a in zip(cl, av) for a, b in zip(row_c, row_a))
    assert r["max_abs_diff"] == pytest.approx(diff, abs=1e-6) and diff <= 0.05
    assert r["clbench_eval"]["periodic"]["calls"] == w["iterations"]
    assert r["avalanche_eval"]["calls"] == w["iterations"] + 2 * w["experiences"]  # + before/after each experience
    assert _positive(r["avalanche_eval"]["images"]) and _positive(r["clbench_eval"]["periodic"]["images"])
    # third column: Avalanche's loop + clbench.avalanche.ContinualEvaluationPlugin on the same subsets
    assert _positive(r["avalanche_plugin_s"]) and r["plugin_order_check"] == "passed"
    assert math.isclose(r["plugin_speedup"], r["avalanche_s"] / r["avalanche_plugin_s"], rel_tol=0.01, abs_tol=0.01)
    assert [len(row) for row in r["avalanche_plugin_matrix"]] == [1, 2, 3, 4, 5] and r["plugin_max_abs_diff"] <= 0.05
    assert r["avalanche_plugin_eval"]["periodic_evaluations"] == w["iterations"]


def test_si_blurry_mvp_quick(outputs):
    rc, out, err = outputs["si_blurry_mvp"]
    assert rc == 0, f"si_blurry_mvp failed (rc {rc}):\n{err[-3000:]}"
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert [r["dataset"] for r in lines] == ["cifar10"]  # one JSON line per dataset
    for r in lines:
        assert r["benchmark"] == "si_blurry_mvp" and r["quick"] is True and r["skipped"] == {}, r["skipped"]
        assert list(r["results"]) == ["finetune", "replay", "ewc", "l2p", "dualprompt", "mvp"]
        for row in r["results"].values():
            assert [s["seed"] for s in row["per_seed"]] == r["seeds"] == [1]
            for m in ("a_auc", "a_last", "a_avg", "f_last"):  # one seed: the mean is that seed's value
                assert row[m]["mean"] == pytest.approx(row["per_seed"][0][m], abs=5e-5), (m, row[m])  # 4 decimals
        auc = {k: r["results"][k]["a_auc"]["mean"] for k in ("mvp", "l2p", "dualprompt")}
        assert r["mvp_above_l2p_and_dualprompt_on_a_auc"] is (auc["mvp"] > max(auc["l2p"], auc["dualprompt"]))


def test_fisher_cost_quick(outputs):
    r = _result(outputs, "fisher_cost")
    assert r["benchmark"] == "fisher_cost" and r["workload"]["quick"] is True
    assert r["workload"]["samples"] > 0 and r["workload"]["regularised_params"] > 0
    assert _positive(r["epoch_s"]) and _positive(r["fisher_s"]) and _positive(r["ratio"])
    assert r["fisher_has_grad_fn"] is False
