"""Tests of the run loggers (clbench.logging): JSONL records, TensorBoard, W&B, console, MultiLogger."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clbench.logging import (
    ConsoleLogger,
    JsonlLogger,
    LoggerWarning,
    LoggingConfig,
    MultiLogger,
    RunLogger,
    TensorBoardLogger,
    WandbConfig,
    WandbLogger,
    build_logger,
    read_metrics,
)
from clbench.logging.wandb import resolve_mode

CONFIG = {"strategy": {"name": "ewc", "lr": 0.01, "milestones": [2, 4]}, "seed": 3, "device": None}

SUMMARY = {
    "acc": 0.7,
    "avg_inc_acc": 0.8125,
    "forgetting": 0.15,
    "bwt": -0.1,
    "fwt": None,
    "min_acc": 0.3,
    "wc_acc": 0.5,
    "stability_gaps": [
        {"experience": 1, "iteration": 20, "pre_acc": 0.8, "min_acc": 0.3, "gap": 0.5, "iters_to_min": 3, "recovery_iters": None}
    ],
}


def run_info(run_dir: Path, resumed: bool = False) -> dict[str, Any]:
    return {
        "run_dir": run_dir,
        "config": CONFIG,
        "seed": 3,
        "class_order": (0, 1, 2, 3),
        "n_experiences": 2,
        "versions": {"torch": torch.__version__},
        "resumed": resumed,
    }


def drive(logger: RunLogger, run_dir: Path, iterations: int = 20) -> None:
    """A two-experience run called like the engine does: ``step`` counts iterations done,
    train loss (1/step) and eval every 10 iterations, experience metrics at the end."""
    logger.on_run_start(run_info(run_dir))
    step = 0
    for experience in range(2):
        logger.on_experience_start(experience, 2, iterations, [2 * experience, 2 * experience + 1])
        for i in range(1, iterations + 1):
            step += 1
            logger.on_iteration(step, i)
            if i % 10 == 0:
                logger.log_metrics({"train/loss": 1.0 / step}, step, "train")
                logger.log_metrics({"eval/acc/task_0": 0.5, "eval/acc/avg": 0.5, "eval/min_acc": 0.25}, step, "eval")
        metrics = {"exp/acc/task_0": 0.8, "exp/acc/task_1": 0.6, "exp/avg_acc": 0.7}
        logger.log_metrics(metrics, step, "experience")
        logger.on_experience_end(experience, metrics)
    logger.on_run_end(SUMMARY)


class Recorder(RunLogger):
    """Records the calls it receives."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def log_metrics(self, metrics: dict[str, float | int], step: int, kind: str) -> None:
        self.calls.append(("log_metrics", step, kind))

    def on_experience_end(self, experience: int, metrics: dict[str, Any]) -> None:
        self.calls.append(("on_experience_end", experience))

    def on_run_end(self, summary: dict[str, Any]) -> None:
        self.calls.append("on_run_end")

    def close(self) -> None:
        self.calls.append("close")


class Failing(RunLogger):
    """Raises on its first ``log_metrics`` call."""

    def __init__(self, fatal: bool = False) -> None:
        self.fatal_errors = fatal
        self.calls = 0

    def log_metrics(self, metrics: dict[str, float | int], step: int, kind: str) -> None:
        self.calls += 1
        raise RuntimeError("disk on fire")


# --------------------------------------------------------------------------------------------- JSONL


def test_jsonl_records_are_readable_while_open(tmp_path: Path) -> None:
    logger = JsonlLogger(tmp_path)
    logger.on_run_start(run_info(tmp_path))
    logger.log_metrics({"train/loss": 0.5}, 10, "train")
    logger.log_metrics({"eval/acc/task_0": 0.25, "eval/min_acc": 0.25}, 10, "eval")

    records = read_metrics(tmp_path)  # the logger is still open: every line must be flushed
    assert [{k: v for k, v in r.items() if k != "time"} for r in records] == [
        {"step": 10, "kind": "train", "train/loss": 0.5},
        {"step": 10, "kind": "eval", "eval/acc/task_0": 0.25, "eval/min_acc": 0.25},
    ]
    assert all(0 <= r["time"] < 60 for r in records)
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["config"] == CONFIG and info["run_dir"] == str(tmp_path) and info["class_order"] == [0, 1, 2, 3]
    logger.close()


def test_jsonl_resume_appends_and_keeps_first_run_info(tmp_path: Path) -> None:
    with JsonlLogger(tmp_path) as first:
        first.on_run_start(run_info(tmp_path))
        first.log_metrics({"train/loss": 1.0}, 0, "train")
        first.log_metrics({"train/loss": 0.9}, 10, "train")
    with JsonlLogger(tmp_path) as second:
        second.on_run_start(run_info(tmp_path, resumed=True))
        second.log_metrics({"train/loss": 0.8}, 10, "train")

    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [(0, 1.0), (10, 0.9), (10, 0.8)]
    assert json.loads((tmp_path / "run_info.json").read_text())["resumed"] is False
    assert json.loads((tmp_path / "run_info.resume-1.json").read_text())["resumed"] is True


def test_jsonl_summary_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logger = JsonlLogger(tmp_path)
    logger.on_run_end(SUMMARY)
    assert json.loads((tmp_path / "summary.json").read_text()) == SUMMARY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "summary.json"]

    def crash(src: str, dst: str) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr("clbench.logging.jsonl.os.replace", crash)
    with pytest.raises(OSError):
        logger.on_run_end({"acc": 0.0})
    assert json.loads((tmp_path / "summary.json").read_text()) == SUMMARY  # never a half-written file
    logger.close()


def test_jsonl_converts_non_serialisable_values(tmp_path: Path) -> None:
    with JsonlLogger(tmp_path) as logger:
        logger.log_metrics(
            {
                "np": np.float32(0.5),
                "np_int": np.int64(7),
                "torch": torch.tensor(0.25),
                "array": np.arange(3),
                "tuple": (1, 2),
                "path": Path("/a/b"),
                "set": {2, 1},
            },
            np.int64(5),  # type: ignore[arg-type]
            "eval",
        )
        logger.on_run_end({"acc": torch.tensor(0.5), "per_task": {0: np.float64(0.5)}, "dir": tmp_path})
    (record,) = read_metrics(tmp_path)
    assert record["step"] == 5
    assert (record["np"], record["np_int"], record["torch"]) == (0.5, 7, 0.25)
    assert (record["array"], record["tuple"], record["path"], record["set"]) == ([0, 1, 2], [1, 2], "/a/b", [1, 2])
    assert json.loads((tmp_path / "summary.json").read_text()) == {"acc": 0.5, "per_task": {"0": 0.5}, "dir": str(tmp_path)}


def test_read_metrics_skips_truncated_last_line_and_resume_repairs_it(tmp_path: Path) -> None:
    with JsonlLogger(tmp_path) as logger:
        logger.log_metrics({"train/loss": 1.0}, 0, "train")
        logger.log_metrics({"train/loss": 0.5}, 10, "train")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 20, "kind": "tr')  # the process died mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 10]

    with JsonlLogger(tmp_path) as resumed:
        resumed.log_metrics({"train/loss": 0.4}, 20, "train")
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 10, 20]

    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 30, "kind": "train"}')  # complete record, newline lost: kept
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 10, 20, 30]
    with JsonlLogger(tmp_path) as resumed:
        resumed.log_metrics({}, 40, "train")
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 10, 20, 30, 40]


# --------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    drive(logger, tmp_path)
    logger.log_metrics({"eval/acc/task_1": np.float32(0.125), "note": "not a number"}, 99, "eval")
    logger.close()

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for name in ("train/loss", "eval/acc/task_0", "eval/acc/avg", "eval/min_acc", "exp/acc/task_0", "exp/avg_acc"):
        assert name in scalars
    assert "note" not in scalars
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [10, 20, 30, 40]
    assert [e.value for e in loss] == pytest.approx([1 / 10, 1 / 20, 1 / 30, 1 / 40])
    assert [(e.step, e.value) for e in acc.Scalars("exp/avg_acc")] == [(20, pytest.approx(0.7)), (40, pytest.approx(0.7))]
    assert [(e.step, e.value) for e in acc.Scalars("eval/acc/task_1")] == [(99, 0.125)]
    assert any(tag.startswith("summary") for tag in acc.Tags()["tensors"])  # the results table as text
    assert any((tmp_path / "tensorboard" / "hparams").iterdir())


# --------------------------------------------------------------------------------------- MultiLogger


def test_failing_logger_is_dropped_with_one_warning(tmp_path: Path) -> None:
    before, failing, after = Recorder(), Failing(), Recorder()
    logger = MultiLogger([before, failing, after])
    with pytest.warns(LoggerWarning) as record:
        drive(logger, tmp_path)
        logger.close()

    assert len(record) == 1
    message = str(record[0].message)
    assert "Failing" in message and "disk on fire" in message and "log_metrics" in message
    assert failing.calls == 1
    assert logger.loggers == [before, after]
    assert before.calls == after.calls
    assert [c for c in after.calls if c[0] == "log_metrics"][-1] == ("log_metrics", 40, "experience")
    assert len([c for c in after.calls if c[0] == "log_metrics"]) == 10
    assert after.calls[-2:] == ["on_run_end", "close"]


def test_fatal_logger_error_propagates_after_the_others_got_the_call(tmp_path: Path) -> None:
    recorder = Recorder()
    logger = MultiLogger([Failing(fatal=True), recorder])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="disk on fire"):
            logger.log_metrics({"train/loss": 1.0}, 0, "train")
    assert recorder.calls == [("log_metrics", 0, "train")]


# --------------------------------------------------------------------------------------------- W&B


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B confined to ``tmp_path`` and unable to find credentials."""
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return tmp_path / "run"


def test_wandb_disabled(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = MultiLogger([WandbLogger(wandb_env, WandbConfig(enabled=True, mode="disabled"), CONFIG)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoggerWarning)
        drive(logger, wandb_env)
        logger.close()
    assert len(logger.loggers) == 1


def test_wandb_offline_writes_under_run_dir(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb_logger = WandbLogger(wandb_env, WandbConfig(enabled=True, mode="offline", tags=["test"]), CONFIG)
    logger = MultiLogger([wandb_logger])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoggerWarning)
        drive(logger, wandb_env)
        logger.close()
    run_id = (wandb_env / "wandb_run_id.txt").read_text().strip()
    (offline_run,) = (wandb_env / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline_run / f"run-{run_id}.wandb").stat().st_size > 0

    resumed = MultiLogger([WandbLogger(wandb_env, WandbConfig(enabled=True, mode="offline"), CONFIG)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoggerWarning)
        resumed.on_run_start(run_info(wandb_env, resumed=True))
        resumed.log_metrics({"train/loss": 0.1}, 30, "train")
        resumed.close()
    assert (wandb_env / "wandb_run_id.txt").read_text().strip() == run_id  # the same W&B run continues


def test_wandb_init_failure_warns_and_the_run_goes_on(wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    def no_network(**kwargs: Any) -> None:
        raise RuntimeError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", no_network)
    cfg = LoggingConfig(console=False, tensorboard=False, wandb=WandbConfig(enabled=True, mode="online"))
    logger = build_logger(cfg, wandb_env, CONFIG)
    with pytest.warns(LoggerWarning, match="WandbLogger failed in on_run_start.*api.wandb.ai unreachable") as record:
        drive(logger, wandb_env)
        logger.close()
    assert len(record) == 1
    assert [type(lg).__name__ for lg in logger.loggers] == ["JsonlLogger"]
    assert len(read_metrics(wandb_env)) == 10
    assert (wandb_env / "summary.json").exists()


def test_wandb_auto_mode(wandb_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert resolve_mode("offline", wandb_env) == "offline"
    assert resolve_mode("auto", wandb_env) == "offline"
    assert capsys.readouterr().out.count("\n") == 1  # one line saying so

    home = Path.home()
    home.mkdir(parents=True)
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    (home / ".netrc").chmod(0o600)
    assert resolve_mode("auto", wandb_env) == "online"
    (home / ".netrc").unlink()

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto", wandb_env) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto", wandb_env) == "disabled"


# ------------------------------------------------------------------------------------------ console


def test_console_plain_lines_and_final_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    logger = ConsoleLogger(progress=True, plain_interval=3600.0)  # stdout is captured: not a terminal
    assert not logger.interactive
    drive(logger, tmp_path)
    logger.close()
    lines = re.sub(r"done in [0-9.]+s", "done in Xs", capsys.readouterr().out).splitlines()

    assert lines[:7] == [
        f"run {tmp_path} | seed 3 | 2 experiences",
        "experience 0 (1/2): 2 classes [0, 1], 20 iterations",
        "  iteration 10/20 (step 10) | loss 0.100",  # then throttled: one status line per interval
        "experience 0 (1/2) done in Xs | avg acc 0.700 | per task 0.800 0.600",
        "experience 1 (2/2): 2 classes [2, 3], 20 iterations",
        "  iteration 10/20 (step 30) | loss 0.033",  # nothing left over from experience 0's evaluations
        "experience 1 (2/2) done in Xs | avg acc 0.700 | per task 0.800 0.600",
    ]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    assert rows == [
        ["Final accuracy", "0.7000"],
        ["Avg incremental accuracy", "0.8125"],
        ["Forgetting", "0.1500"],
        ["BWT", "-0.1000"],
        ["FWT", "–"],
        ["min-ACC", "0.3000"],
        ["WC-ACC", "0.5000"],
        ["WF10", "–"],
        ["WF100", "–"],
        ["1", "0.8000", "0.3000", "0.5000", "3", "–"],  # experience, pre-acc, min, gap, iters to min, recovery
    ]
    assert any(line.startswith("Results") for line in lines) and any(line.startswith("Stability gaps") for line in lines)
    assert any("iters to min" in line for line in lines)
    assert lines[-1] == f"run directory: {tmp_path}"


def test_console_live_values_are_fresh_and_old_tasks_averaged_apart(tmp_path: Path) -> None:
    """At a new experience the status shows no loss of the previous one, and the accuracy
    is split into the task in training (acc(new)) and the mean over the earlier ones (acc(old))."""
    from rich.console import Console

    buf = io.StringIO()
    logger = ConsoleLogger(progress=False, plain_interval=0.0, console=Console(file=buf, width=200))
    logger.on_run_start(run_info(tmp_path))
    logger.on_experience_start(0, 3, 4, [0, 1])
    logger.log_metrics({"train/loss": 0.25}, 4, "train")
    logger.log_metrics({"eval/acc/task_0": 0.9, "eval/acc/avg": 0.9}, 4, "eval")
    logger.on_experience_start(1, 3, 4, [2, 3])
    # experience 1, first iteration: evaluated before its first loss record
    logger.log_metrics({"eval/acc/task_0": 0.7, "eval/acc/task_1": 0.1, "eval/acc/avg": 0.4}, 5, "eval")
    logger.log_metrics({"train/loss": 2.5}, 5, "train")
    logger.on_experience_start(2, 3, 4, [4, 5])
    logger.log_metrics({"eval/acc/task_0": 0.6, "eval/acc/task_1": 0.8, "eval/acc/task_2": 0.0,
                        "eval/acc/avg": 0.4666, "eval/min_acc": 0.55}, 9, "eval")
    status = [line for line in buf.getvalue().splitlines() if line.startswith("  iteration")]
    assert status == [
        "  iteration 0/4 (step 4) | loss 0.250",
        "  iteration 0/4 (step 4) | loss 0.250 | acc(new) 0.900",
        "  iteration 0/4 (step 5) | acc(new) 0.100 | acc(old) 0.700",  # not loss 0.250, not acc 0.400
        "  iteration 0/4 (step 5) | loss 2.500 | acc(new) 0.100 | acc(old) 0.700",
        "  iteration 0/4 (step 9) | acc(new) 0.000 | acc(old) 0.700 | min-acc 0.550",  # (0.6 + 0.8) / 2
    ]


def test_console_progress_false_prints_lines_even_on_a_terminal(tmp_path: Path) -> None:
    from rich.console import Console

    buf = io.StringIO()
    logger = ConsoleLogger(progress=False, console=Console(file=buf, force_terminal=True, force_interactive=True, width=100))
    assert not logger.interactive
    logger.on_run_start(run_info(tmp_path))
    logger.on_experience_start(0, 2, 10, [0, 1])
    assert "experience 0 (1/2): 2 classes [0, 1], 10 iterations" in buf.getvalue()


def test_console_progress_bars_on_a_terminal(tmp_path: Path) -> None:
    from rich.console import Console

    buf = io.StringIO()
    logger = ConsoleLogger(progress=True, console=Console(file=buf, force_terminal=True, force_interactive=True, width=120))
    assert logger.interactive
    drive(logger, tmp_path)
    logger.close()
    out = buf.getvalue()
    assert "experience 1 (2/2) done" in out and "Final accuracy" in out and "Stability gaps" in out


# ------------------------------------------------------------------------------------ build & config


def test_build_logger_composes_enabled_loggers_jsonl_first(tmp_path: Path) -> None:
    every = LoggingConfig(wandb=WandbConfig(enabled=True, mode="disabled"))
    with build_logger(every, tmp_path, CONFIG) as logger:
        names = [type(lg).__name__ for lg in logger.loggers]
    assert names == ["JsonlLogger", "TensorBoardLogger", "WandbLogger", "ConsoleLogger"]
    with build_logger(LoggingConfig(jsonl=False, tensorboard=False), tmp_path, CONFIG) as logger:
        assert [type(lg).__name__ for lg in logger.loggers] == ["ConsoleLogger"]


def test_logging_config_is_an_omegaconf_structured_config() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(LoggingConfig), {"log_every": 5, "wandb": {"enabled": True, "tags": ["a"], "entity": "me"}})
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, LoggingConfig) and isinstance(obj.wandb, WandbConfig)
    assert (obj.log_every, obj.wandb.tags, obj.wandb.entity, obj.wandb.mode) == (5, ["a"], "me", "auto")


def test_import_is_cheap() -> None:
    code = "import sys, clbench.logging; print(sorted(m for m in ('rich', 'torch', 'wandb', 'tensorboard', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"
