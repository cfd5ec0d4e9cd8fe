"""End-to-end behaviour of the engine on the built-in digits data: run directory, resume,
NaN handling, plug-ins.  Small and fast (each run is a couple of seconds on 2 CPU cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from clbench.config import load_config
from clbench.engine import Engine, NonFiniteLossError, run
from clbench.logging import read_metrics
from clbench.registry import register_strategy
from clbench.strategies.replay import Replay, ReplayConfig
from clbench.strategy import Strategy, StrategyConfig

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


PROBE: dict = {"train": [], "eval": []}


@dataclass
class TransformProbeConfig(StrategyConfig):
    name: str = "transform_probe"
    joint: bool = False


@register_strategy("transform_probe", config=TransformProbeConfig,
                   description="test: fine-tuning (or joint) that records its training batches and evaluation inputs")
class TransformProbe(Strategy):
    def training_experiences(self, exp, ctx):
        return list(ctx.stream.experiences[: exp.index + 1]) if self.cfg.joint else [exp]

    def prepare_batch(self, batch, ctx):
        PROBE["train"].append((ctx.experience, batch.x.clone(), batch.y.clone(), batch.task.clone()))
        return super().prepare_batch(batch, ctx)

    def predict(self, x, task_id=None):
        PROBE["eval"][-1]["x"].append(x.detach().clone())  # preprocessed inputs of the current evaluation
        return super().predict(x, task_id)


def _record_evaluations(monkeypatch):
    """Mark each evaluation pass (periodic subsets, online subsets, full test sets) so the probe's
    ``predict`` inputs can be grouped by pass."""
    from clbench.evaluation import Evaluator

    def marking(method, phase):
        original = getattr(Evaluator, method)

        def wrapper(self, *args, **kwargs):
            n_seen = args[0] if phase == "subsets" else args[1] if phase == "online" else None
            PROBE["eval"].append({"phase": phase, "n_seen": n_seen, "x": []})
            return original(self, *args, **kwargs)
        monkeypatch.setattr(Evaluator, method, wrapper)

    marking("_subset_accuracies", "subsets")
    marking("online_periodic", "online")
    marking("full_accuracies", "full")
    marking("_full_pass", "full")
    PROBE["train"].clear()
    PROBE["eval"].clear()


def _check_probe(engine, subset_size: int, joint: bool) -> None:
    """Every input the probe saw is ``transform(raw)`` of its experience: training rows (with
    their labels), the seeded evaluation subsets, and the full test sets, row for row."""
    stream, ctx = engine.stream, engine.ctx
    exps = list(stream.experiences)
    assert all(e.transform is not None for e in exps)
    train_rows = []  # per experience: transformed image bytes -> label
    for e in exps:
        xs = e.transform(stream.train.x[e.train_idx])
        train_rows.append({bytes(x.numpy()): int(y) for x, y in zip(xs, stream.train.y[e.train_idx])})
    raw = {bytes(x.numpy()) for x in stream.train.x}
    assert not raw & set(train_rows[1])  # no permuted image is a raw one: membership tells them apart
    domains = set()
    for k, x, y, task in PROBE["train"]:
        for row, label, t in zip(x, y.tolist(), task.tolist()):
            assert t <= k if joint else t == k
            found = train_rows[t].get(bytes(row.numpy()))  # None: not transform_t(raw) of any image
            assert found == label, f"experience {k}: a training row of domain {t} is not its transform of a raw image"
            domains.add((k, t))
    expected_domains = {(k, t) for k in range(len(exps)) for t in range(len(exps)) if (t <= k if joint else t == k)}
    assert domains == expected_domains  # joint: every batch mixes the domains seen so far

    def inputs(e, idx):
        return ctx.inputs(e.transform(stream.test.x[idx]).to(ctx.device))

    subsets = [inputs(e, e.eval_subset(subset_size, ctx.seed)) for e in exps]
    full = torch.cat([inputs(e, e.test_idx) for e in exps])
    assert subset_size <= 0 or all(s.shape[0] == subset_size < e.test_idx.numel() for s, e in zip(subsets, exps))
    phases = {"subsets": 0, "online": 0, "full": 0}
    for record in PROBE["eval"]:
        if not record["x"]:
            continue  # _full_pass's caller's marker: the inner pass holds the inputs
        seen = torch.cat(record["x"])
        expected = full if record["phase"] == "full" else torch.cat(subsets[: record["n_seen"]])
        torch.testing.assert_close(seen, expected, rtol=0, atol=1e-6)
        phases[record["phase"]] += 1
    return phases


@pytest.mark.parametrize("joint", [False, True], ids=["finetune", "joint"])
def test_domain_incremental_transforms_reach_training_and_evaluation(tmp_path, monkeypatch, joint):
    """Permuted digits: the probe's training batches, periodic evaluation subsets and full test
    sets are exactly each experience's permutation of the raw images (finetune: its own domain;
    joint: batches mixing the domains seen so far)."""
    _record_evaluations(monkeypatch)
    cfg = make_cfg(tmp_path, "scenario=domain_incremental", "scenario.n_tasks=3", "strategy=transform_probe",
                   f"strategy.joint={str(joint).lower()}", "train.epochs=0", "train.iterations=6",
                   "eval.subset_size=50")
    engine = Engine(cfg)
    assert engine.run()["status"] == "finished"
    phases = _check_probe(engine, 50, joint)
    assert phases["subsets"] >= 6 and phases["full"] >= 3


def test_domain_incremental_transforms_reach_online_evaluation(tmp_path, monkeypatch):
    """The online protocol's subsets (weighted by full/subset size for A_auc) are the permuted
    images too, as are its training batches and task-end full test passes."""
    _record_evaluations(monkeypatch)
    cfg = make_cfg(tmp_path, "scenario=domain_incremental", "scenario.n_tasks=2", "strategy=transform_probe",
                   "train.online=true", "train.epochs=0", "train.batch_size=64", "eval.every_samples=400",
                   "eval.subset_size=50", "checkpoint.enabled=false")
    engine = Engine(cfg)
    summary = engine.run()
    assert summary["status"] == "finished"
    phases = _check_probe(engine, 50, joint=False)
    assert phases["online"] >= 6 and phases["full"] >= 2
    n_full = [e.test_idx.numel() for e in engine.stream.experiences]
    torch.testing.assert_close(engine.evaluator.weight, torch.tensor([n / 50 for n in n_full]).repeat_interleave(50))


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
    fast = ["scenario=task_incremental", "eval.every=0", "checkpoint.enabled=false"]
    lwf = run(make_cfg(tmp_path, f"plugins=[{example}]", "strategy=lwf_example", *fast))
    finetune = run(make_cfg(tmp_path, "strategy=finetune", *fast, name="ft"))
    # no teacher during the first experience: exactly fine-tuning; then the distillation term
    # changes training (a no-op loss would leave every row equal), and it still learns each
    # 2-way task (chance: 0.5)
    assert lwf["matrix"][0] == finetune["matrix"][0]
    assert lwf["matrix"][1:] != finetune["matrix"][1:]
    assert lwf["acc"] > 0.9
