"""``clbench sweep``: grid expansion, Ray execution with fault isolation, rerun/resume/retry,
the submitit local executor, one-point sweep == run, and a kill -9 of the sweep driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clbench.registry import ClbenchError
from clbench.sweep import expand, grid_points, plan, point_name, split_values, sweep

ray = pytest.importorskip("ray")

TINY = ["train.iterations=4", "eval.every=2", "logging.tensorboard=false", "logging.console=false",
        "logging.progress=false"]
FLAKY = '''
import os
from dataclasses import dataclass
from clbench.registry import register_strategy
from clbench.strategy import Strategy, StrategyConfig

@dataclass
class FlakyConfig(StrategyConfig):
    name: str = "flaky"

@register_strategy("flaky", config=FlakyConfig, description="fails while CLBENCH_TEST_FLAKY=1 (tests)")
class Flaky(Strategy):
    def before_experience(self, exp, ctx):
        if os.environ.get("CLBENCH_TEST_FLAKY") == "1":
            raise ValueError("bad hyper-parameter")
'''


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module (2 CPUs); the sweeps reuse it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def results(run_dir: Path) -> dict:
    """summary.json without where/when fields."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k != "run_dir" and "time" not in k and "wall" not in k}


def statuses(state: dict) -> dict[str, str]:
    return {p["name"]: p["status"] for p in state["points"]}


# ---------------------------------------------------------------------- expansion (no Ray)
def test_expand_cartesian_and_quoting():
    base, options, grid = expand(["strategy=finetune,replay,ewc", "seed=0,1", "eval.windows=[10,100]",
                                  'logging.wandb.name="a,b"', "sweep.max_concurrent=1", "seed=0,1,2"])
    assert base == ["eval.windows=[10,100]", 'logging.wandb.name="a,b"']
    assert options == ["sweep.max_concurrent=1"]
    assert grid == {"strategy": ["finetune", "replay", "ewc"], "seed": ["0", "1", "2"]}  # the later seed= wins
    points = grid_points(grid)
    assert len(points) == 9 and points[0] == {"strategy": "finetune", "seed": "0"} and points[1]["seed"] == "1"
    assert point_name({"strategy": "ewc", "seed": "1"}) == "strategy=ewc,seed=1"
    assert "/" not in point_name({"plugins": "[a/b.py]"}) and point_name({}) == "default"
    assert split_values("{name: replay, buffer_size: 5},finetune") == ["{name: replay, buffer_size: 5}", "finetune"]


def test_yaml_sweep_section_and_validation(tmp_path):
    cfg = tmp_path / "digits.yaml"
    cfg.write_text("strategy: finetune\ntrain: {iterations: 3}\n"
                   "sweep:\n  max_concurrent: 1\n  grid: {seed: [0, 1, 2], strategy: [finetune, replay]}\n")
    opts, sweep_dir, points = plan(str(cfg), [f"output_dir={tmp_path}/runs", "seed=3,4"])
    assert opts.max_concurrent == 1 and sweep_dir.parent == tmp_path / "runs"
    assert [p.name for p in points] == ["strategy=finetune,seed=3", "strategy=finetune,seed=4",
                                        "strategy=replay,seed=3", "strategy=replay,seed=4"]
    assert "\nsweep:" not in points[0].config_yaml and f"output_dir: {sweep_dir}" in points[0].config_yaml
    assert "name: strategy=replay,seed=4" in points[3].config_yaml and "iterations: 3" in points[3].config_yaml
    for args, needle in ((["strategy=finetune,ewcc"], "ewcc"), (["train.lrr=0.1,0.2"], "train.lrr"),
                         (["sweep.max_concurent=1"], "sweep.max_concurent"), (["sweep.launcher=pbs"], "sweep.launcher")):
        with pytest.raises(ClbenchError, match=needle):
            sweep(str(cfg), [f"output_dir={tmp_path}/bad"] + args)
    assert not (tmp_path / "bad").exists()  # nothing ran, nothing was written


# ---------------------------------------------------------------------- Ray end to end
def test_ray_sweep_isolates_failure_skips_finished_and_retries(ray_address, tmp_path, monkeypatch):
    from clbench.cli import main

    plugin = tmp_path / "flaky.py"
    plugin.write_text(FLAKY)
    argv = ["sweep", *TINY, f"output_dir={tmp_path}", f"plugins=[{plugin}]", "strategy=finetune,replay,flaky",
            "--name", "s", "--max-concurrent", "2"]
    monkeypatch.setenv("CLBENCH_TEST_FLAKY", "1")  # forwarded to the workers
    assert main(argv) == 1
    state = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert statuses(state) == {"strategy=finetune": "finished", "strategy=replay": "finished", "strategy=flaky": "failed"}
    failed = state["points"][2]
    assert "ValueError: bad hyper-parameter" in failed["error"] and failed["wall_time_s"] > 0
    assert all(p["wall_time_s"] > 0 for p in state["points"])
    summaries = {n: tmp_path / "s" / n / "summary.json" for n in statuses(state)}
    mtimes = {n: s.stat().st_mtime_ns for n, s in summaries.items()}

    assert main(argv) == 1  # rerun: nothing executes, the failure stays recorded
    assert {n: s.stat().st_mtime_ns for n, s in summaries.items()} == mtimes
    assert statuses(json.loads((tmp_path / "s" / "sweep.json").read_text()))["strategy=flaky"] == "failed"

    monkeypatch.setenv("CLBENCH_TEST_FLAKY", "0")
    assert main(argv + ["--retry-failed"]) == 0  # only the failed point runs again
    state = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert set(statuses(state).values()) == {"finished"} and state["points"][2]["error"] is None
    assert summaries["strategy=finetune"].stat().st_mtime_ns == mtimes["strategy=finetune"]
    assert summaries["strategy=flaky"].stat().st_mtime_ns != mtimes["strategy=flaky"]


def test_one_point_sweep_equals_run(ray_address, tmp_path):
    from clbench.config import load_config
    from clbench.engine import run

    args = [*TINY, "strategy=finetune", "seed=3"]
    state = sweep(None, args + [f"output_dir={tmp_path}", "sweep.name=one"])
    assert statuses(state) == {"default": "finished"}
    run(load_config(None, args + [f"output_dir={tmp_path}", "name=plain"]))
    assert results(tmp_path / "one" / "default") == results(tmp_path / "plain")


def test_submitit_local_executor(tmp_path):
    state = sweep(None, [*TINY, f"output_dir={tmp_path}", "seed=5", "sweep.name=sl", "sweep.launcher=submitit_local"])
    assert statuses(state) == {"default": "finished"}
    assert results(tmp_path / "sl" / "default")["status"] == "finished"
    assert list((tmp_path / "sl" / ".submitit").glob("*_result.pkl"))  # it ran as a submitit job


def test_kill9_driver_then_rerun_matches_uninterrupted(ray_address, tmp_path):
    """kill -9 of the driver while the second point runs; the same command again finishes both
    points with the metrics of an uninterrupted sweep (the killed point resumes from its checkpoint)."""
    from clbench.cli import main
    from clbench.engine import run_status

    args = ["train.iterations=20", "eval.every=5", "checkpoint.every=5", "logging.tensorboard=false",
            "logging.console=false", "logging.progress=false", f"output_dir={tmp_path}", "seed=0,1"]
    assert main(["sweep", *args, "--name", "ref", "--max-concurrent", "2"]) == 0
    argv = ["sweep", *args, "--name", "killed", "--max-concurrent", "1", "--address", ray_address]
    driver = subprocess.Popen([sys.executable, "-m", "clbench.cli", *argv], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    first, second = tmp_path / "killed" / "seed=0", tmp_path / "killed" / "seed=1"
    deadline = time.time() + 120
    while not (second / "checkpoint.pt").exists() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert run_status(first) == "finished" and run_status(second) in ("running", "incomplete")
    mtime = (first / "summary.json").stat().st_mtime_ns
    while run_status(second) == "running" and time.time() < deadline:  # Ray ends the dead driver's task
        time.sleep(0.2)
    # Ray ends the dead driver's worker with SIGTERM (the engine then stops with a checkpoint:
    # "interrupted") or SIGKILL ("incomplete"), depending on timing; both are resumable
    assert run_status(second) in ("incomplete", "interrupted")

    assert main(argv) == 0
    assert (first / "summary.json").stat().st_mtime_ns == mtime  # not re-executed
    for name in ("seed=0", "seed=1"):
        assert results(tmp_path / "killed" / name) == results(tmp_path / "ref" / name)


def test_sigint_interrupts_running_points_resumably(ray_address, tmp_path):
    """Ctrl-C of the driver: running points stop with a checkpoint (status interrupted), exit 130."""
    from clbench.engine import run_status

    argv = [sys.executable, "-m", "clbench.cli", "sweep", "train.iterations=400", "eval.every=5", "checkpoint.every=20",
            "logging.tensorboard=false", "logging.console=false", "logging.progress=false", f"output_dir={tmp_path}",
            "seed=0,1", "--name", "int", "--address", ray_address]
    driver = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    dirs = [tmp_path / "int" / "seed=0", tmp_path / "int" / "seed=1"]
    deadline = time.time() + 120
    while not all((d / "checkpoint.pt").exists() for d in dirs) and driver.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=60) == 130
    state = json.loads((tmp_path / "int" / "sweep.json").read_text())
    assert statuses(state) == {"seed=0": "interrupted", "seed=1": "interrupted"}
    assert [run_status(d) for d in dirs] == ["interrupted", "interrupted"]  # stopped with a checkpoint, resumable


def test_yaml_with_sweep_section_keeps_paths_relative_to_the_yaml(tmp_path, monkeypatch):
    """The copy of the YAML without its ``sweep:`` section must resolve relative paths (data roots,
    checkpoints, the shipped ``${oc.env:CLBENCH_DATA_ROOT,../../shared/data}`` fallback) against the
    original file's folder, not against a temporary folder."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "configs" / "mine"
    folder.mkdir(parents=True)
    (tmp_path / "configs" / "data").mkdir()
    cfg = folder / "m.yaml"
    cfg.write_text("scenario: {name: class_incremental, dataset: digits, data_root: ../data}\n"
                   "sweep:\n  grid: {seed: [0, 1]}\n")
    _, _, points = plan(str(cfg), [f"output_dir={tmp_path}/runs"])
    assert f"data_root: {(tmp_path / 'configs' / 'data').resolve()}" in points[0].config_yaml
    assert not list(folder.glob(".*")), "no temporary file is left beside the config"
