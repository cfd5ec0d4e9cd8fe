"""End-to-end behaviour of the engine on the built-in digits data: run directory, resume,
NaN handling, plug-ins.  Small and fast (each run is a couple of seconds on 2 CPU cores)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from clbench.config import load_config
from clbench.engine import NonFiniteLossError, run
from clbench.logging import read_metrics
from clbench.registry import register_strategy
from clbench.strategies.replay import Replay, ReplayConfig

FAST = ["logging.console=false", "logging.tensorboard=false", "train.epochs=2", "eval.every=3"]


def make_cfg(tmp_path: Path, *overrides: str, name: str = "run"):
    return load_config(None, [f"output_dir={tmp_path}", f"name={name}", *FAST, *overrides])


@dataclass
class NaNConfig(ReplayConfig):
    name: str = "nan_at_5"


@register_strategy("nan_at_5", config=NaNConfig, description="test: loss becomes NaN at global iteration 5")
class NaNStrategy(Replay):
    def loss(self, output, batch, ctx):
        loss = super().loss(output, batch, ctx)
        return loss * float("nan") if ctx.iteration == 4 else loss  # ctx.iteration counts finished steps


def test_default_run_writes_a_complete_run_directory(tmp_path):
    summary = run(make_cfg(tmp_path, "logging.tensorboard=true"))
    d = tmp_path / "run"
    for f in ("config.yaml", "run_info.json", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (d / f).is_file(), f
    assert list((d / "tensorboard").glob("events.out.tfevents.*"))
    info = json.loads((d / "run_info.json").read_text())
    assert sorted(info["class_order"]) == list(range(10)) and info["seed"] == 0
    assert info["versions"]["torch"] == torch.__version__
    records = read_metrics(d)
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and all(r["eval/period"] == 3 for r in evals)
    # evaluated every 3 iterations and at each experience's last iteration
    steps = [r["step"] for r in evals]
    assert steps == sorted(steps) and all(s % 3 == 0 for s in steps[:3])
    exp_records = [r for r in records if r["kind"] == "experience"]
    assert len(exp_records) == 5
    on_disk = json.loads((d / "summary.json").read_text())
    assert on_disk["status"] == "finished" and on_disk["acc"] == pytest.approx(summary["acc"])
    assert len(on_disk["matrix"]) == 5 and len(on_disk["stability_gaps"]) == 4
    # replay on digits learns: final average accuracy well above the 1/10 chance level
    assert summary["acc"] > 0.6


def test_same_seed_same_numbers_different_seed_different_order(tmp_path):
    a = run(make_cfg(tmp_path, name="a"))
    b = run(make_cfg(tmp_path, name="b"))
    run(make_cfg(tmp_path, "seed=1", name="c"))
    assert a["matrix"] == b["matrix"] and a["min_acc"] == b["min_acc"]
    order = lambda n: json.loads((tmp_path / n / "run_info.json").read_text())["class_order"]  # noqa: E731
    assert order("a") == order("b") != order("c")


# Resume (kills at several points, SIGTERM, locks, config changes, damaged checkpoints): tests/test_resume.py


def test_non_finite_loss_stops_with_where_and_keeps_the_records(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"experience 0, iteration 5 .*global iteration 5"):
        run(make_cfg(tmp_path, "strategy=nan_at_5", "eval.every=1"))
    d = tmp_path / "run"
    summary = json.loads((d / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["error"]
    assert [r["step"] for r in read_metrics(d) if r["kind"] == "eval"] == [1, 2, 3, 4]  # stops before evaluating the broken model


def test_joint_trains_on_all_data_seen(tmp_path):
    summary = run(make_cfg(tmp_path, "strategy=joint"))
    # with the union of all seen data nothing is forgotten the way fine-tuning forgets
    finetune = run(make_cfg(tmp_path, "strategy=finetune", name="ft"))
    assert summary["acc"] > finetune["acc"] + 0.4
    iters = [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "experience"]
    per_exp = [b - a for a, b in zip([0] + iters, iters)]
    assert per_exp == sorted(per_exp) and per_exp[-1] > 3 * per_exp[0]


def test_domain_incremental_transforms_reach_training_and_evaluation(tmp_path):
    summary = run(make_cfg(tmp_path, "scenario=domain_incremental", "scenario.n_tasks=3", "strategy=finetune"))
    assert len(summary["matrix"]) == 3 and summary["fwt"] is not None


PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass
    import torch
    from clbench.registry import register_strategy
    from clbench.strategy import Strategy, StrategyConfig

    @dataclass
    class HalfLRConfig(StrategyConfig):
        name: str = "{name}"
        scale: float = 0.5

    @register_strategy("{name}", config=HalfLRConfig, description="test plug-in")
    class HalfLR(Strategy):
        def loss(self, output, batch, ctx):
            return self.cfg.scale * super().loss(output, batch, ctx)
''')


def test_strategy_plugin_from_a_file_runs_from_the_cli(tmp_path):
    plugin = tmp_path / "my_strategy.py"
    plugin.write_text(PLUGIN.format(name="file_plugin"))
    out = subprocess.run(
        [sys.executable, "-m", "clbench.cli", "run", f"plugins=[{plugin}]", "strategy=file_plugin",
         "strategy.scale=0.25", f"output_dir={tmp_path}", "name=p", *FAST],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    cfg = (tmp_path / "p" / "config.yaml").read_text()
    assert "file_plugin" in cfg and "scale: 0.25" in cfg
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["status"] == "finished"


def test_strategy_plugin_from_an_entry_point_runs_from_the_cli(tmp_path):
    """A third-party distribution (here a bare .dist-info on PYTHONPATH) registers through the
    ``clbench.strategies`` entry-point group, exactly as a pip-installed package would."""
    site = tmp_path / "site"
    (site / "thirdparty_cl").mkdir(parents=True)
    (site / "thirdparty_cl" / "__init__.py").write_text(PLUGIN.format(name="ep_plugin"))
    dist = site / "thirdparty_cl-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-cl\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[clbench.strategies]\nhalf_lr = thirdparty_cl\n")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    listed = subprocess.run([sys.executable, "-m", "clbench.cli", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert "ep_plugin" in listed.stdout
    out = subprocess.run([sys.executable, "-m", "clbench.cli", "run", "strategy=ep_plugin", f"output_dir={tmp_path}",
                          "name=q", *FAST], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "q" / "summary.json").read_text())["status"] == "finished"


def test_example_lwf_plugin_from_readme_runs(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "lwf.py"
    summary = run(make_cfg(tmp_path, f"plugins=[{example}]", "strategy=lwf"))
    assert summary["status"] == "finished" and math.isfinite(summary["acc"])
