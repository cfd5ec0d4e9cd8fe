"""Typed config loading (YAML + overrides, per-component schemas, actionable errors) and the CLI."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from clbench.cli import main
from clbench.config import TrainConfig, component_config, load_config, schema_defaults, to_dict
from clbench.registry import DATASETS, MODELS, SCENARIOS, STRATEGIES, ClbenchError

REPO = Path(__file__).resolve().parents[1]
from conftest import DATA_ROOT  # noqa: E402  (the one data root, tests/conftest.py)
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
STRATEGY_CONFIGS = sorted((REPO / "configs" / "strategy").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _data_root(monkeypatch):
    monkeypatch.setenv("CLBENCH_DATA_ROOT", str(DATA_ROOT))


def _error(path=None, overrides=()) -> str:
    with pytest.raises(ClbenchError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- defaults and precedence


def test_defaults():
    cfg = load_config(None, [])
    assert cfg.scenario.name == "class_incremental" and cfg.scenario.dataset == "digits"
    assert cfg.strategy.name == "replay" and cfg.model.name == "mlp"
    # each typed section carries its component's schema defaults
    assert to_dict(cfg.strategy) == schema_defaults(STRATEGIES.get("replay").config)
    assert to_dict(cfg.scenario) == schema_defaults(SCENARIOS.get("class_incremental").config)
    assert to_dict(cfg.model) == schema_defaults(MODELS.get("mlp").config)
    assert cfg.seed == 0 and to_dict(cfg.train) == dataclasses.asdict(TrainConfig())
    assert cfg.eval.subset_size == 1000
    assert type(component_config(cfg.strategy)) is STRATEGIES.get("replay").config


def test_yaml_then_overrides_precedence(tmp_path):
    path = _write(tmp_path, (
        "seed: 3\n"
        "train: {lr: 0.5, batch_size: 16}\n"
        "strategy: {name: replay, buffer_size: 50}\n"
        "scenario: {n_tasks: 2}\n"
    ))
    cfg = load_config(path, [])
    assert cfg.seed == 3 and cfg.train.lr == 0.5 and cfg.train.batch_size == 16
    assert cfg.strategy.buffer_size == 50 and cfg.scenario.n_tasks == 2
    assert cfg.train.epochs == TrainConfig().epochs  # untouched keys keep the schema default
    cfg = load_config(path, ["train.lr=0.125", "strategy.buffer_size=7", "seed=9", "scenario.n_tasks=5"])
    assert cfg.train.lr == 0.125 and cfg.train.batch_size == 16  # CLI wins, YAML kept elsewhere
    assert cfg.strategy.buffer_size == 7 and cfg.seed == 9 and cfg.scenario.n_tasks == 5
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.strategy.buffer_size, int)


def test_name_as_string_in_yaml(tmp_path):
    cfg = load_config(_write(tmp_path, "strategy: ewc\n"), ["strategy.lambda_=5"])
    assert cfg.strategy.name == "ewc" and cfg.strategy.lambda_ == 5.0


@pytest.mark.parametrize("order", [("strategy=ewc", "strategy.lambda_=1e4"), ("strategy.lambda_=1e4", "strategy=ewc")])
def test_switch_strategy_on_cli_is_typed(order):
    cfg = load_config(None, list(order))
    ewc = STRATEGIES.get("ewc").config
    assert OmegaConf.get_type(cfg.strategy) is ewc
    assert cfg.strategy.lambda_ == 10000.0 and isinstance(cfg.strategy.lambda_, float)
    expected = schema_defaults(ewc)
    expected["lambda_"] = 10000.0
    assert to_dict(cfg.strategy) == expected
    obj = component_config(cfg.strategy)
    assert isinstance(obj, ewc) and obj.lambda_ == 10000.0


def test_switch_strategy_drops_old_yaml_keys(tmp_path):
    path = _write(tmp_path, "strategy: {name: replay, buffer_size: 50}\n")
    cfg = load_config(path, ["strategy=ewc"])
    assert cfg.strategy.name == "ewc" and "buffer_size" not in cfg.strategy
    assert to_dict(cfg.strategy) == schema_defaults(STRATEGIES.get("ewc").config)
    # the same name on the CLI keeps the YAML's keys
    assert load_config(path, ["strategy=replay"]).strategy.buffer_size == 50
    # l2 -> ewc share key names but not their meaning: EWC's own default, not l2's value
    path = _write(tmp_path, "strategy: {name: l2, lambda_: 0.5}\n")
    assert load_config(path, ["strategy=ewc"]).strategy.lambda_ == schema_defaults(STRATEGIES.get("ewc").config)["lambda_"]


def test_switch_class_to_task_incremental_keeps_split(tmp_path):
    path = _write(tmp_path, "scenario: {name: class_incremental, dataset: mnist, n_tasks: 2, initial_classes: 4}\n")
    cfg = load_config(path, ["scenario=task_incremental"])
    assert cfg.scenario.name == "task_incremental"
    assert cfg.scenario.dataset == "mnist" and cfg.scenario.n_tasks == 2 and cfg.scenario.initial_classes == 4
    # a different schema drops them
    cfg = load_config(path, ["scenario=domain_incremental"])
    assert cfg.scenario.dataset == "digits" and "initial_classes" not in cfg.scenario


# --------------------------------------------------------------------------- errors


def test_unknown_strategy_lists_valid_and_suggests():
    msg = _error(overrides=["strategy=ewcc"])
    assert "Did you mean 'ewc'?" in msg
    for name in STRATEGIES.names():
        assert name in msg
    assert "Did you mean 'class_incremental'?" in _error(overrides=["scenario=class_incremntal"])
    assert "mlp" in _error(overrides=["model=mpl"])


def test_unknown_key_suggests_and_lists():
    msg = _error(overrides=["train.lrr=1"])
    assert "train.lrr" in msg and "Did you mean 'train.lr'?" in msg
    for key in ("batch_size", "epochs", "momentum", "optimizer"):
        assert key in msg
    msg = _error(overrides=["strategy=ewc", "strategy.lamda_=1"])
    assert "Did you mean 'strategy.lambda_'?" in msg and "fisher" in msg
    # a key of another strategy is unknown to the default one
    assert "buffer_size" in _error(overrides=["strategy.lambda_=1"])
    assert "Did you mean 'seed'?" in _error(overrides=["sed=1"])


def test_unknown_key_in_yaml(tmp_path):
    msg = _error(_write(tmp_path, "strategy: {name: ewc, lamda_: 3}\n"))
    assert "strategy.lambda_" in msg
    msg = _error(_write(tmp_path, "eval: {evry: 3}\n"))
    assert "eval.every" in msg


def test_wrong_type_names_key():
    msg = _error(overrides=["train.batch_size=abc"])
    assert "train.batch_size" in msg and "abc" in msg
    assert "strategy.lambda_" in _error(overrides=["strategy=ewc", "strategy.lambda_=big"])
    assert "scenario.n_tasks" in _error(overrides=["scenario.n_tasks=1.5"])


def test_bad_override_syntax():
    assert "key=value" in _error(overrides=["train.lr"])


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = _error(missing)
    assert "not found" in msg and str(missing) in msg


def test_non_mapping_yaml(tmp_path):
    assert "mapping" in _error(_write(tmp_path, "- a\n- b\n"))


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path, [])
    for section in ("scenario", "model", "strategy"):
        entry = {"scenario": SCENARIOS, "model": MODELS, "strategy": STRATEGIES}[section].get(cfg[section].name)
        assert isinstance(component_config(cfg[section]), entry.config)
    if cfg.scenario.data_root is not None:
        assert cfg.scenario.data_root.startswith(str(DATA_ROOT))  # ${oc.env:CLBENCH_DATA_ROOT} resolved


def test_shipped_configs_exist():
    """The parametrised load test above runs over what the glob found: every config the README
    names must be among them (a renamed or lost file would otherwise just drop its test), and
    every registered strategy has its configs/strategy/<name>.yaml."""
    readme = (REPO / "README.md").read_text()
    named = set(re.findall(r"configs/([\w./-]+?\.yaml)", readme))
    found = {str(p.relative_to(REPO / "configs")) for p in CONFIGS}
    missing = {n for n in named if "/" not in n and "<" not in n} - found
    assert {"split_mnist.yaml", "permuted_mnist.yaml"} <= found and not missing, missing
    builtin = {e.name for e in STRATEGIES.entries() if e.obj.__module__.startswith("clbench.")}  # not tests' plug-ins
    assert len(builtin) >= 20 and {p.stem for p in STRATEGY_CONFIGS} == builtin


def _strategy_file(path: Path) -> dict:
    data = yaml.safe_load(path.read_text()) or {}
    if isinstance(data.get("strategy"), dict):
        data = data["strategy"]
    data.setdefault("name", path.stem)
    return data


@pytest.mark.parametrize("path", STRATEGY_CONFIGS, ids=[p.name for p in STRATEGY_CONFIGS])
def test_strategy_configs_load(path, tmp_path):
    data = _strategy_file(path)
    cfg = load_config(_write(tmp_path, yaml.safe_dump({"strategy": data})), [])
    assert cfg.strategy.name == path.stem


def test_strategy_configs_equal_registered_defaults():
    if not STRATEGY_CONFIGS:
        pytest.skip("configs/strategy/ is empty")
    for path in STRATEGY_CONFIGS:
        data = _strategy_file(path)
        assert data["name"] == path.stem
        expected = schema_defaults(STRATEGIES.get(path.stem).config)
        assert data == expected, f"{path} differs from the registered defaults of '{path.stem}'"


# --------------------------------------------------------------------------- CLI


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for registry in (STRATEGIES, SCENARIOS, DATASETS, MODELS):
        for name in registry.names():
            assert name in out, f"{registry.kind} {name} missing from `clbench list`"
    for title in ("strategies", "scenarios", "datasets", "models"):
        assert title in out


def test_cli_print_config(capsys):
    assert main(["run", "--print-config", "strategy=ewc", "train.lr=0.25"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert printed["strategy"]["name"] == "ewc" and "lambda_" in printed["strategy"]
    assert printed["train"]["lr"] == 0.25


def test_cli_print_config_with_file(capsys):
    path = CONFIGS[0]
    assert main(["run", str(path), "--print-config", "seed=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 4
    assert printed["scenario"] == to_dict(load_config(path, []).scenario)


def test_cli_unknown_strategy_exit_2(capsys):
    assert main(["run", "strategy=nope"]) == 2
    captured = capsys.readouterr()
    assert "unknown strategy 'nope'" in captured.err and "replay" in captured.err and "ewc" in captured.err
    assert captured.out == ""
    assert main(["run", "strategy=replai"]) == 2
    assert "Did you mean 'replay'?" in capsys.readouterr().err


def test_cli_bad_key_exit_2(capsys):
    assert main(["run", "--print-config", "train.lrr=1"]) == 2
    assert "Did you mean 'train.lr'?" in capsys.readouterr().err


def test_cli_missing_mnist_names_path(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nonexistent"
    rc = main(["run", "scenario.dataset=mnist", f"scenario.data_root={missing}", f"output_dir={tmp_path / 'runs'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "idx" in err
    assert not (tmp_path / "runs").exists()  # failed before creating a run directory


def test_cli_missing_config_file_exit_2(capsys, tmp_path):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    exe = shutil.which("clbench") or str(Path(sys.executable).parent / "clbench")
    assert Path(exe).exists(), "console script `clbench` is not installed (pip install -e .)"
    proc = subprocess.run([exe, "list"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("replay", "ewc", "class_incremental", "digits", "mlp"):
        assert name in proc.stdout


def test_cli_unknown_option_is_rejected(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--print-config", "--bogus"])
    assert info.value.code == 2
    assert "--bogus" in capsys.readouterr().err
