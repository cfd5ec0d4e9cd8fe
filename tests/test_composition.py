"""Strategy composition (``strategy=[replay,ewc]``, :mod:`clbench.composite`): equals a
hand-written replay+EWC class (same per-iteration losses, bit-identical weights), is
order-independent where the semantics promise it, refuses undefinable compositions naming both
components, validates each component's sub-section, runs from the CLI and resumes from a
checkpoint loaded with ``weights_only=True``.  Built-in digits, tiny MLP, CPU, seeded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from clbench.buffers import ReservoirBuffer
from clbench.cli import main
from clbench.composite import Composite, EXCLUSIVE_HOOKS, check_composition
from clbench.config import load_config
from clbench.engine import Engine, run
from clbench.logging import read_metrics
from clbench.registry import ClbenchError, register_strategy
from clbench.rundir import CHECKPOINT
from clbench.strategies.ewc import EWC, EWCConfig
from clbench.strategy import Batch, Strategy, StrategyConfig

QUIET = ["logging.console=false", "logging.tensorboard=false", "logging.progress=false"]
SMALL = [*QUIET, "scenario.n_tasks=2", "train.iterations=6", "train.batch_size=16", "logging.log_every=1",
         "eval.every=0", "eval.subset_size=50", "eval.baseline=false", "checkpoint.enabled=false",
         "model.hidden=[32]", "train.lr=0.1"]
COMPONENTS = ["strategy.replay.buffer_size=40", "strategy.ewc.lambda_=100", "strategy.ewc.fisher_batch_size=128"]


@dataclass
class HandReplayEWCConfig(EWCConfig):
    name: str = "test_hand_replay_ewc"
    buffer_size: int = 40
    replay_batch_size: int | None = None


@register_strategy("test_hand_replay_ewc", config=HandReplayEWCConfig, description="test: replay + EWC written by hand")
class HandReplayEWC(EWC):
    """What a user writes without composition: EWC's loss (CE + penalty) on [batch ; buffer batch]."""

    def setup(self, model, ctx) -> None:
        super().setup(model, ctx)
        self.buffer = ReservoirBuffer(self.cfg.buffer_size, seed=ctx.seed)

    def prepare_batch(self, batch, ctx):
        if len(self.buffer) == 0:
            return batch
        stored = self.buffer.sample(self.cfg.replay_batch_size or len(batch))
        return batch.cat(Batch(stored["x"], stored["y"], stored["task"]))

    def after_step(self, batch, ctx) -> None:
        self.buffer.add(x=batch.x, y=batch.y, task=batch.task)


@register_strategy("test_predict_a", config=StrategyConfig, description="test: replaces predict")
class PredictA(Strategy):
    def predict(self, x, task_id=None):
        return self.model(x)


@register_strategy("test_predict_b", config=StrategyConfig, description="test: replaces predict too")
class PredictB(Strategy):
    def predict(self, x, task_id=None):
        return -self.model(x)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train(out: Path, name: str, *overrides: str) -> tuple[Engine, dict]:
    engine = Engine(load_config(None, [f"output_dir={out}", f"name={name}", *SMALL, *overrides]))
    summary = engine.run()
    return engine, summary


def losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]


def assert_same_weights(a: Engine, b: Engine) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_replay_ewc_equals_hand_written_and_is_order_independent(tmp_path):
    hand, hand_summary = train(tmp_path, "hand", "strategy=test_hand_replay_ewc", "strategy.lambda_=100",
                               "strategy.fisher_batch_size=128")
    comp, comp_summary = train(tmp_path, "comp", "strategy=[replay,ewc]", *COMPONENTS)
    rev, _ = train(tmp_path, "rev", "strategy=[ewc,replay]", *COMPONENTS)
    assert isinstance(comp.strategy, Composite)
    assert comp.cfg.strategy.name == "replay+ewc"
    assert comp.strategy.components["ewc"].reg.active  # the penalty was on from the second experience
    expected = losses(tmp_path / "hand")
    assert len(expected) == 12
    assert losses(tmp_path / "comp") == expected
    assert losses(tmp_path / "rev") == expected
    assert_same_weights(comp, hand)
    assert_same_weights(rev, hand)
    assert comp_summary["matrix"] == hand_summary["matrix"]
    # the penalty matters: without it (lambda 0) the weights differ
    off, _ = train(tmp_path, "off", "strategy=[replay,ewc]", *COMPONENTS, "strategy.ewc.lambda_=0")
    assert not torch.equal(off.model.state_dict()["head.weight"], comp.model.state_dict()["head.weight"])


def test_ewc_alone_loss_is_task_loss_plus_penalty(tmp_path):
    engine = Engine(load_config(None, [f"output_dir={tmp_path}", "name=e", *SMALL, "strategy=ewc",
                                       "strategy.lambda_=100", "strategy.fisher_batch_size=128"]))
    engine.run()
    ewc, ctx = engine.strategy, engine.ctx
    batch = next(ctx.batches([engine.stream[0]], 16))
    with torch.no_grad():  # away from the anchor (the last consolidation put it at the current weights)
        for p in engine.model.parameters():
            p.add_(0.05)
    out = engine.model(ctx.inputs(batch.x))
    task = torch.nn.functional.cross_entropy(out.masked_fill(~ctx.class_mask[batch.task], float("-inf")), batch.y)
    pen = ewc.penalty(out, batch, ctx)
    assert float(pen.detach()) > 0
    assert torch.allclose(ewc.loss(out, batch, ctx), task + 50 * ewc.reg.penalty())


def test_composite_config_sections_and_refusals(tmp_path):
    cfg = load_config("configs/split_mnist.yaml", ["strategy=[replay,ewc]", "strategy.ewc.lambda_=10"])
    assert cfg.strategy.name == "replay+ewc"
    assert cfg.strategy.replay.buffer_size == 500  # the YAML's replay keys carried into strategy.replay
    assert cfg.strategy.ewc.lambda_ == 10
    (tmp_path / "c.yaml").write_text("strategy: [ewc, replay]\n")
    assert load_config(tmp_path / "c.yaml").strategy.name == "ewc+replay"
    single = load_config("configs/split_mnist.yaml", ["strategy=ewc", "strategy.lambda_=3"])  # flat form unchanged
    assert single.strategy.name == "ewc" and single.strategy.lambda_ == 3
    with pytest.raises(ClbenchError, match=r"strategy\.replay\.bufer_size.*Did you mean 'strategy\.replay\.buffer_size'.*"
                                           r"Valid keys in strategy\.replay: buffer_size, name, replay_batch_size"):
        load_config(None, ["strategy=[replay,ewc]", "strategy.replay.bufer_size=3"])
    with pytest.raises(ClbenchError, match=r"unknown config key 'strategy\.lambda_'.*Valid keys in strategy: ewc, name, replay"):
        load_config(None, ["strategy=[replay,ewc]", "strategy.lambda_=3"])
    with pytest.raises(ClbenchError, match=r"strategy\.ewc\.lambda_ must be >= 0"):
        load_config(None, ["strategy=[replay,ewc]", "strategy.ewc.lambda_=-1"])
    with pytest.raises(ClbenchError, match=r"strategy\.ewc\.gamma must be >= 0 and <= 1, got 2"):
        load_config(None, ["strategy=[replay,ewc]", "strategy.ewc.gamma=2"])
    with pytest.raises(ClbenchError, match="unknown strategy 'ewcc'. Did you mean 'ewc'"):
        load_config(None, ["strategy=[replay,ewcc]"])
    with pytest.raises(ClbenchError, match="replay named twice"):
        load_config(None, ["strategy=[replay,replay]"])
    with pytest.raises(ClbenchError, match="'test_predict_a' overrides predict.*'test_predict_b' overrides predict"):
        load_config(None, ["strategy=[test_predict_a,replay,test_predict_b]"])
    with pytest.raises(ClbenchError, match="'derpp' and 'er_ace' both override forward"):
        load_config(None, ["strategy=[derpp,er_ace]"])
    with pytest.raises(ClbenchError, match="'joint' and 'fetril' both override training_experiences"):
        check_composition(["joint", "fetril"])
    load_config(None, ["strategy=[test_predict_a,ewc,l2]"])  # one owner, two penalties: defined


def test_composite_forwards_every_hook():
    """A hook added to Strategy must be given composition semantics in Composite too."""
    hooks = [n for n in vars(Strategy) if not n.startswith("_") and callable(getattr(Strategy, n))]
    missing = [h for h in hooks if h not in vars(Composite)]
    assert not missing, f"Composite does not define {missing} (add it and its rule to clbench/strategy.py's docs)"
    assert set(EXCLUSIVE_HOOKS) <= set(hooks)


def test_cli_run_and_resume_with_weights_only_checkpoint(tmp_path, monkeypatch, capsys):
    args = ["run", f"output_dir={tmp_path}", "name=cli", *SMALL, "checkpoint.enabled=true",
            "strategy=[replay,ewc]", "strategy.replay.buffer_size=100", "strategy.ewc.lambda_=10", "train.iterations=5"]
    assert main(args) == 0
    run_dir = tmp_path / "cli"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["iterations"] == 10
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["strategy"]
    assert saved["name"] == "replay+ewc" and saved["replay"]["buffer_size"] == 100 and saved["ewc"]["lambda_"] == 10
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert set(state["strategy"]) == {"replay", "ewc"}
    assert state["strategy"]["ewc"]["reg"]["importance"]  # the Fisher of the finished experiences

    # stopped after experience 1's checkpoint, then resumed: the uninterrupted run's result
    real_after_step = Composite.after_step

    def stop_at_7(self, batch, ctx):
        real_after_step(self, batch, ctx)
        if ctx.iteration == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(Composite, "after_step", stop_at_7)
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=stopped", *args[3:]])
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(Composite, "after_step", real_after_step)
    resumed = run(resume=tmp_path / "stopped")
    assert resumed["status"] == "finished" and resumed["iterations"] == 10
    assert resumed["matrix"] == summary["matrix"]
    assert losses(tmp_path / "stopped") == losses(run_dir)
