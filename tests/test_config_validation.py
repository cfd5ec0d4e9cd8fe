"""Every impossible config value is rejected with a one-line ClbenchError before the run
directory exists; values that pass run a tiny job.  Also: device and output_dir checks, the
effective evaluation subset, wandb's bounded start, and paths relative to the config file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import typing
from pathlib import Path
from typing import Any

import pytest

from clbench.cli import main
from clbench.config import RunConfig, load_config
from clbench.registry import MODELS, SCENARIOS, STRATEGIES, ClbenchError
from clbench.validation import validate

REPO = Path(__file__).resolve().parents[1]
QUIET = ["logging.console=false", "logging.progress=false", "logging.tensorboard=false", "checkpoint.enabled=false"]
TINY = [*QUIET, "train.iterations=2", "scenario.n_tasks=2", "eval.subset_size=20", "model.hidden=[8]"]
HUGE_INT, HUGE_FLOAT = 10**9, 1e30


def _numeric_fields(cls: type, prefix: str = "") -> list[tuple[str, str, type]]:
    """(dotted key, field name, int|float) of every numeric scalar field of ``cls``, nested dataclasses included."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _numeric_fields(hint, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is typing.Union else [hint]
        if len(args) == 1 and args[0] in (int, float):
            out.append((prefix + f.name, f.name, args[0]))
    return out


def _registered_configs() -> list[tuple[str, type]]:
    """(section, config class): the core run config and every registered component's config."""
    out: list[tuple[str, type]] = [("", RunConfig)]
    for section, registry in (("strategy", STRATEGIES), ("scenario", SCENARIOS), ("model", MODELS)):
        out += [(section, e.config) for e in registry.entries() if e.config is not None]
    return out


def _with(obj: Any, dotted: str, value: Any) -> Any:
    """A copy of dataclass ``obj`` with the (possibly nested) field ``dotted`` set to ``value``."""
    head, _, rest = dotted.partition(".")
    return dataclasses.replace(obj, **{head: _with(getattr(obj, head), rest, value) if rest else value})


def _values(kind: type) -> list[Any]:
    return [-1, 0, HUGE_INT] if kind is int else [-1.0, 0.0, math.nan, HUGE_FLOAT]


def _check(section: str, cls: type, key: str, value: Any) -> bool:
    """Validate ``cls`` with ``key=value`` as load_config does: True when valid, False on a
    ClbenchError naming the key; any other exception fails the test."""
    try:
        validate(_with(cls(), key, value), f"{section}." if section else "")
    except ClbenchError as err:
        message = str(err)
        assert "\n" not in message and (f"{section}." if section else "") + key.rsplit(".", 1)[-1] in message, message
        return False
    return True


def test_every_numeric_field_of_every_config_is_checked():
    """-1, 0, NaN and a huge value for every numeric field: valid, or a ClbenchError naming the
    key (never another exception); NaN never passes, and the size/rate fields refuse -1."""
    n_fields = 0
    for section, cls in _registered_configs():
        for key, name, kind in _numeric_fields(cls):
            n_fields += 1
            verdicts = {repr(v): _check(section, cls, key, v) for v in _values(kind)}
            if kind is float:
                assert not verdicts["nan"], f"{section}.{key}=nan passed validation"
    assert n_fields > 150
    for key in ("train.lr", "train.batch_size", "eval.every", "eval.subset_size", "checkpoint.every",
                "logging.log_every", "logging.wandb.init_timeout", "train.momentum"):
        kind = dict((k, t) for k, _, t in _numeric_fields(RunConfig))[key]
        assert not _check("", RunConfig, key, kind(-1)), key
    for name in ("replay", "er_ace", "derpp"):
        assert not _check("strategy", STRATEGIES.get(name).config, "buffer_size", -1)


def test_int_field_given_nan_is_a_clbench_error():
    with pytest.raises(ClbenchError, match="train.batch_size"):
        load_config(None, ["train.batch_size=nan"])


def _smallest_valid(section: str, cls: type, skip: set[str]) -> list[str]:
    """``key=value`` overrides setting every numeric field of ``cls`` (not in ``skip``) to the
    smallest of -1, 0 and (for a count) a huge value that passes validation."""
    out = []
    for key, _, kind in _numeric_fields(cls):
        if key in skip:
            continue
        ok = [v for v in (-1, 0, HUGE_INT) if _check(section, cls, key, kind(v))]
        if ok:
            out.append(f"{section + '.' if section else ''}{key}={min(ok)}")
    return out


@pytest.mark.parametrize("strategy", ["replay", "ewc", "derpp"])
def test_boundary_values_that_pass_run_a_tiny_job(tmp_path, strategy):
    """The accepted extremes, all at once per component, run a tiny digits job to the end."""
    skip = {"seed", "train.epochs", "train.iterations", "train.online_iter", "eval.subset_size",
            "train.warmup_iters", "logging.wandb.init_timeout"}
    core = _smallest_valid("", RunConfig, skip) if strategy == "replay" else []
    own = _smallest_valid("strategy", STRATEGIES.get(strategy).config, set())
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "name=r", f"strategy={strategy}", *core, *own])
    from clbench.engine import run

    assert run(cfg)["status"] == "finished"


def test_a_huge_learning_rate_passes_and_stops_with_an_actionable_error(tmp_path):
    from clbench.engine import NonFiniteLossError, run

    with pytest.raises(NonFiniteLossError, match="lower train.lr"):
        run(load_config(None, [*TINY, f"output_dir={tmp_path}", "name=h", f"train.lr={HUGE_FLOAT}"]))


@pytest.mark.parametrize("override,match", [
    ("train.lr=-0.1", "train.lr must be > 0, got -0.1"),
    ("strategy.buffer_size=-5", "strategy.buffer_size must be >= 0, got -5"),
    ("eval.every=-5", "eval.every must be >= 0, got -5"),
    ("eval.subset_size=-1", "eval.subset_size must be >= 0, got -1"),
    ("train.lr=nan", "train.lr must be a finite number"),
    ("device=gpu", "device 'gpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    ("train.optimizer=sgdd", "train.optimizer 'sgdd' is not one of sgd, adam, adamw. Did you mean 'sgd'?"),
])
def test_cli_rejects_before_the_run_directory_exists(tmp_path, capsys, override, match):
    out = tmp_path / "runs"
    assert main(["run", *QUIET, f"output_dir={out}", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clbench: error: ") and match in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert not out.exists()


def test_output_dir_that_is_a_file(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ClbenchError, match=f"output_dir {file} is a file"):
        load_config(None, [f"output_dir={file}"])
    with pytest.raises(ClbenchError, match=f"is under {file}, which is a file"):
        load_config(None, [f"output_dir={file}/runs"])


def test_output_dir_read_only(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(ClbenchError, match=f"output_dir {tmp_path}/runs is not writable .*{tmp_path}"):
        load_config(None, [f"output_dir={tmp_path}/runs"])


def test_subset_larger_than_the_test_set_records_the_effective_size(tmp_path):
    from clbench.engine import run

    summary = run(load_config(None, [*TINY, f"output_dir={tmp_path}", "name=s", "eval.subset_size=100000"]))
    on_disk = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert on_disk["eval_subset_size"] == 100000  # what was asked
    assert len(on_disk["eval_subset_sizes"]) == 2 and all(0 < n < 1000 for n in on_disk["eval_subset_sizes"])
    assert on_disk["eval_subset_sizes"] == summary["eval_subset_sizes"]


# --------------------------------------------------------------------------------------------- wandb


def test_wandb_start_is_bounded_and_falls_back_to_offline(tmp_path, monkeypatch):
    import wandb

    from clbench.logging.base import LoggerWarning
    from clbench.logging.config import WandbConfig
    from clbench.logging.wandb import WandbLogger

    calls: list[tuple[str, float]] = []

    class FakeRun:
        step = 0

        def finish(self) -> None:
            pass

    def fake_init(**kwargs: Any) -> FakeRun:
        calls.append((kwargs["mode"], kwargs["settings"].init_timeout))
        if kwargs["mode"] == "online":  # no network: wandb gives up after init_timeout
            raise wandb.errors.CommError(f"Run initialization has timed out after {kwargs['settings'].init_timeout} sec.")
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    logger = WandbLogger(tmp_path, WandbConfig(enabled=True, mode="online", init_timeout=2.5), {})
    start = time.monotonic()
    with pytest.warns(LoggerWarning, match="init_timeout=2.5 s.*logging offline") as record:
        logger.on_run_start({"resumed": False})
    assert time.monotonic() - start < 2
    assert len(record) == 1
    assert calls == [("online", 2.5), ("offline", 2.5)]
    assert isinstance(logger._run, FakeRun)
    with pytest.raises(ClbenchError, match="logging.wandb.init_timeout must be > 0"):
        load_config(None, ["logging.wandb.init_timeout=0"])


# --------------------------------------------------------------------------------- paths in a YAML


def test_shipped_config_finds_its_data_from_another_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("CLBENCH_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "split_mnist.yaml")
    assert Path(cfg.scenario.data_root) == (REPO.parent / "shared" / "data" / "mnist").resolve()
    cfg = load_config(REPO / "configs" / "repro" / "l2p_original_imagenet_r.yaml")
    assert Path(cfg.scenario.data_root) == (REPO.parent / "shared" / "data" / "imagenet-r-224").resolve()


def test_relative_paths_in_a_yaml_are_relative_to_it(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    (conf / "data").mkdir(parents=True)
    (conf / "plug.py").write_text(
        "from dataclasses import dataclass\n"
        "from clbench.registry import register_strategy\n"
        "from clbench.strategy import Strategy, StrategyConfig\n"
        "@dataclass\nclass PlugConfig(StrategyConfig):\n    name: str = 'plug_rel'\n"
        "@register_strategy('plug_rel', config=PlugConfig)\nclass Plug(Strategy):\n    pass\n")
    (conf / "c.yaml").write_text("plugins: [plug.py]\nstrategy: plug_rel\n"
                                 "scenario: {name: class_incremental, dataset: mnist, data_root: data}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(conf / "c.yaml", ["scenario.n_tasks=2"])
    assert cfg.plugins == [str(conf / "plug.py")]
    assert cfg.scenario.data_root == str(conf / "data")
    assert cfg.strategy.name == "plug_rel"
    cfg = load_config(conf / "c.yaml", ["scenario.data_root=cli_relative"])  # the command line: as typed
    assert cfg.scenario.data_root == "cli_relative"


def test_missing_data_message_names_scenario_data_root(tmp_path):
    from clbench.engine import run

    with pytest.raises(ClbenchError, match="scenario.data_root=") as info:
        run(load_config(None, [*QUIET, f"output_dir={tmp_path}/runs", "scenario.dataset=mnist",
                               f"scenario.data_root={tmp_path}/nothing"]))
    assert "root=<" not in str(info.value).replace("data_root=<", "")
    assert not (tmp_path / "runs").exists()
