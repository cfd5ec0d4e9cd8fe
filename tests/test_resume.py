"""Resume never changes the run: a run stopped at any point (SIGKILL in a real subprocess, before
or after its first checkpoint, mid-experience or at a boundary; SIGTERM; an exception) and then
``--resume``d ends with the ``summary.json`` and ``metrics.jsonl`` of the uninterrupted run, row
for row (wall-clock fields aside), offline, online (Si-Blurry) and test-time adaptation.  Also:
config changes are refused, finished runs left alone, live runs locked, and checkpoints are
loaded without running code.  Built-in digits, tiny MLP, CPU, seeded: about half a minute."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from clbench.config import load_config
from clbench.engine import ConfigChangedError, run, run_status
from clbench.logging import read_metrics
from clbench.registry import STRATEGIES, ClbenchError
from clbench.rundir import CHECKPOINT, PREVIOUS_CHECKPOINT, RunInUseError, RunLock

REPO = Path(__file__).resolve().parents[1]
QUIET = ["logging.console=false", "logging.tensorboard=false", "logging.progress=false"]
# cosine schedule with warm-up, optimiser (momentum) kept across experiences, gradient clipping,
# a loss window (3) that checkpoints (every 5) cut in the middle; 5 experiences x 8 iterations
OFFLINE = [*QUIET, "train.iterations=8", "train.scheduler=cosine", "train.warmup_iters=2", "train.momentum=0.9",
           "train.reset_optimizer=false", "train.grad_clip=1.0", "train.augment=flip", "logging.log_every=3",
           "eval.every=2", "eval.subset_size=100", "checkpoint.every=5", "strategy=killable_replay"]

PLUGIN = '''
import os, signal
from dataclasses import dataclass
from clbench.registry import register_strategy
from clbench.strategies.replay import Replay, ReplayConfig


@dataclass
class KillableReplayConfig(ReplayConfig):
    name: str = "killable_replay"


@register_strategy("killable_replay", config=KillableReplayConfig, description="test: replay that stops its process")
class KillableReplay(Replay):
    """At global iteration $CLBENCH_TEST_STOP_AT: sends itself $CLBENCH_TEST_SIGNAL (KILL, TERM), or
    raises KeyboardInterrupt (RAISE) -- an abrupt death at a chosen point."""

    def after_step(self, batch, ctx):
        super().after_step(batch, ctx)
        if ctx.iteration == int(os.environ.get("CLBENCH_TEST_STOP_AT", -1)):
            how = os.environ.get("CLBENCH_TEST_SIGNAL", "KILL")
            if how == "RAISE":
                raise KeyboardInterrupt
            os.kill(os.getpid(), getattr(signal, "SIG" + how))
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plugin") / "killable.py"
    path.write_text(PLUGIN)
    return str(path)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    monkeypatch.delenv("CLBENCH_TEST_STOP_AT", raising=False)
    monkeypatch.delenv("CLBENCH_TEST_SIGNAL", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same float sums
    yield
    torch.set_num_threads(before)


def cfg_for(out: Path, name: str, plugin: str, *overrides: str, base: Path | None = None):
    return load_config(base, [f"output_dir={out}", f"name={name}", f"plugins=[{plugin}]", *overrides])


def stop_in_process(monkeypatch, at: int, cfg) -> None:
    monkeypatch.setenv("CLBENCH_TEST_STOP_AT", str(at))
    monkeypatch.setenv("CLBENCH_TEST_SIGNAL", "RAISE")
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.delenv("CLBENCH_TEST_STOP_AT")


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def assert_same_run(resumed_dir: Path, full_dir: Path) -> None:
    """summary.json (but its own run_dir) and every metrics.jsonl row (but wall-clock time) equal."""
    a = json.loads((resumed_dir / "summary.json").read_text())
    b = json.loads((full_dir / "summary.json").read_text())
    assert a.pop("run_dir") != b.pop("run_dir")
    assert a["status"] == "finished"
    assert a == b
    ra, rb = strip(read_metrics(resumed_dir)), strip(read_metrics(full_dir))
    assert len(ra) == len(rb)
    for i, (x, y) in enumerate(zip(ra, rb)):
        assert x == y, f"metrics.jsonl row {i} differs"


@pytest.fixture(scope="module")
def offline_full(tmp_path_factory, plugin) -> Path:
    out = tmp_path_factory.mktemp("full")
    torch.set_num_threads(1)
    run(cfg_for(out, "full", plugin, *OFFLINE))
    return out / "full"


def cli(out: Path, name: str, plugin: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "clbench.cli", "run", f"output_dir={out}", f"name={name}", f"plugins=[{plugin}]", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


# ------------------------------------------------------------------ real processes, real signals
# (a subprocess costs ~5 s of imports on a busy 2-core machine: the mid-experience cut is also
# tested in-process below, with an exception as the abrupt death)
@pytest.mark.parametrize("at", [1, 9], ids=["before-first-checkpoint", "after-a-boundary"])
def test_sigkill_at_any_point_then_resume_equals_uninterrupted(at, tmp_path, plugin, offline_full):
    """``at``: completed iterations when the process kills itself (during the next one)."""
    killed = cli(tmp_path, "k", plugin, *OFFLINE, env={"CLBENCH_TEST_STOP_AT": str(at), "CLBENCH_TEST_SIGNAL": "KILL"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert run_status(tmp_path / "k") == "incomplete"  # no summary, no live lock
    # the checkpoint the resume starts from: none (restart), mid-experience 5, boundary 8
    expected = {1: None, 7: 5, 9: 8}[at]
    has_ckpt = (tmp_path / "k" / CHECKPOINT).exists()
    assert has_ckpt == (expected is not None)
    if expected is not None:
        assert torch.load(tmp_path / "k" / CHECKPOINT, weights_only=True)["position"]["iteration"] == expected
    summary = run(resume=tmp_path / "k")
    assert summary["iterations"] == 40
    assert_same_run(tmp_path / "k", offline_full)
    assert run_status(tmp_path / "k") == "finished"


def test_sigterm_checkpoints_where_it_stands_and_resumes_equal(tmp_path, plugin, offline_full):
    stopped = cli(tmp_path, "t", plugin, *OFFLINE, env={"CLBENCH_TEST_STOP_AT": "6", "CLBENCH_TEST_SIGNAL": "TERM"})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert f"resume with `clbench run --resume {tmp_path / 't'}`" in stopped.stderr  # the real path
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["iterations"] == 7
    assert run_status(tmp_path / "t") == "interrupted"
    # a checkpoint at iteration 7 exactly (not the periodic one at 5): mid loss window (7 % 3 = 1)
    assert torch.load(tmp_path / "t" / CHECKPOINT, weights_only=True)["position"]["iteration"] == 7
    run(resume=tmp_path / "t")
    assert_same_run(tmp_path / "t", offline_full)


def test_death_mid_experience_mid_loss_window_then_resume_equals_uninterrupted(tmp_path, plugin, offline_full, monkeypatch):
    """Dies during iteration 8, after the checkpoint at 5, which cuts the loss window 4-6 (log_every 3)."""
    stop_in_process(monkeypatch, 7, cfg_for(tmp_path, "m", plugin, *OFFLINE))
    assert torch.load(tmp_path / "m" / CHECKPOINT, weights_only=True)["position"]["iteration"] == 5
    run(resume=tmp_path / "m")
    assert_same_run(tmp_path / "m", offline_full)


# ------------------------------------------------------------------ online and test-time adaptation
ONLINE = [*QUIET, "strategy=killable_replay", "checkpoint.enabled=true", "checkpoint.every=20", "logging.log_every=5",
          "eval.every_samples=200"]


@pytest.mark.parametrize("at", [2, 50])  # after_step runs once per incoming batch (3 steps): at 3b + 2
def test_online_si_blurry_resume_equals_uninterrupted(at, tmp_path, plugin, monkeypatch):
    base = REPO / "configs" / "si_blurry_digits.yaml"
    run(cfg_for(tmp_path, "full", plugin, *ONLINE, base=base))
    stop_in_process(monkeypatch, at, cfg_for(tmp_path, "cut", plugin, *ONLINE, base=base))
    run(resume=tmp_path / "cut")
    assert_same_run(tmp_path / "cut", tmp_path / "full")


def test_tta_resume_restores_optimizer_and_iteration(tmp_path, monkeypatch, plugin):
    from test_cotta import _fake_cifar

    from clbench.strategies.tent import Tent, TentConfig
    from clbench.registry import register_strategy
    from dataclasses import dataclass

    @dataclass
    class KillableTentConfig(TentConfig):
        name: str = "killable_tent"

    @register_strategy("killable_tent", config=KillableTentConfig, description="test: TENT that dies")
    class KillableTent(Tent):
        def after_step(self, batch, ctx):
            super().after_step(batch, ctx)
            if ctx.iteration == int(os.environ.get("CLBENCH_TEST_STOP_AT", -1)):
                raise KeyboardInterrupt

    _fake_cifar(monkeypatch, n_test=40)
    overrides = ["strategy=killable_tent", "scenario.corruptions=[gaussian_noise,contrast,fog]", "scenario.n_examples=32",
                 "model.depth=20", "model.width=4", "model.checkpoint=null", "train.batch_size=8", "logging.log_every=3",
                 f"cache_dir={tmp_path / 'cache'}", "device=cpu", "checkpoint.enabled=true", *QUIET]
    base = REPO / "configs" / "cotta_cifar10c.yaml"
    run(cfg_for(tmp_path, "full", plugin, *overrides, base=base))
    monkeypatch.setenv("CLBENCH_TEST_STOP_AT", "6")  # second domain, after the checkpoint at 4 (Adam state in it)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(tmp_path, "cut", plugin, *overrides, base=base))
    monkeypatch.delenv("CLBENCH_TEST_STOP_AT")
    run(resume=tmp_path / "cut")
    assert_same_run(tmp_path / "cut", tmp_path / "full")


# ------------------------------------------------------------------ what resume refuses or leaves alone
SMALL = [*QUIET, "train.iterations=4", "eval.every=0", "eval.subset_size=50", "scenario.n_tasks=2",
         "scenario.classes=[0,1,2,3]"]


def test_resume_of_a_finished_run_leaves_it_untouched(tmp_path, plugin, capsys):
    run(cfg_for(tmp_path, "done", plugin, *SMALL))
    d = tmp_path / "done"
    before = {f: (d / f).read_bytes() for f in ("summary.json", "metrics.jsonl", CHECKPOINT)}
    summary = run(resume=d)
    assert summary["iterations"] == 8 and summary["status"] == "finished"
    assert {f: (d / f).read_bytes() for f in before} == before
    assert not (d / "run_info.resume-1.json").exists()
    assert "already finished" in capsys.readouterr().err


def test_changed_config_is_refused_listing_the_keys_unless_forced(tmp_path, plugin, monkeypatch):
    stop_in_process(monkeypatch, 6, cfg_for(tmp_path, "c", plugin, *SMALL, "strategy=killable_replay"))
    d = tmp_path / "c"
    text = (d / "config.yaml").read_text()
    assert "lr: 0.05" in text and "buffer_size: 200" in text
    (d / "config.yaml").write_text(text.replace("lr: 0.05", "lr: 0.01").replace("buffer_size: 200", "buffer_size: 50"))
    with pytest.raises(ConfigChangedError, match=r"strategy.buffer_size: 200 .* 50.*train.lr: 0.05 .* 0.01"):
        run(resume=d)
    assert run_status(d) == "interrupted"  # untouched
    summary = run(resume=d, force_config_change=True)
    assert summary["status"] == "finished"
    info = json.loads((d / "run_info.resume-1.json").read_text())
    assert info["config_changes"] == {"strategy.buffer_size": [200, 50], "train.lr": [0.05, 0.01]}


def test_a_live_run_directory_is_locked_and_a_stale_lock_taken_over(tmp_path, plugin, monkeypatch):
    stop_in_process(monkeypatch, 6, cfg_for(tmp_path, "l", plugin, *SMALL, "strategy=killable_replay"))
    d = tmp_path / "l"
    with RunLock.acquire(d):  # as a live run holds it
        assert run_status(d) == "running"
        with pytest.raises(RunInUseError, match=f"in use by process {os.getpid()}"):
            run(resume=d)
        with pytest.raises(RunInUseError, match=f"in use by process {os.getpid()}.*choose another name"):
            run(cfg_for(tmp_path, "l", plugin, *SMALL))
    assert issubclass(RunInUseError, ClbenchError)
    (d / "run.lock").write_text("999999\n")  # left by a killed process: no flock on it
    assert run_status(d) == "interrupted"
    assert run(resume=d)["status"] == "finished"
    assert run_status(d) == "finished" and run_status(tmp_path / "nothing") == "missing"


# ------------------------------------------------------------------ checkpoint files
def test_damaged_checkpoint_falls_back_to_the_previous_one_or_says_what_to_do(tmp_path, plugin, monkeypatch, capsys):
    run(cfg_for(tmp_path, "full", plugin, *SMALL))
    stop_in_process(monkeypatch, 7, cfg_for(tmp_path, "d", plugin, *SMALL, "checkpoint.every=3", "strategy=killable_replay"))
    d = tmp_path / "d"
    # checkpoints at 3 and 4 (boundary) then 6 (kept: 4 as the previous one); truncate the newest
    data = (d / CHECKPOINT).read_bytes()
    (d / CHECKPOINT).write_bytes(data[: len(data) // 2])
    run(resume=d)
    assert f"{CHECKPOINT} (" in capsys.readouterr().err
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    got = json.loads((d / "summary.json").read_text())
    assert got["matrix"] == full["matrix"] and got["iterations"] == 8
    # both damaged: one line naming the files and the way out
    stop_in_process(monkeypatch, 6, cfg_for(tmp_path, "e", plugin, *SMALL, "checkpoint.every=3", "strategy=killable_replay"))
    e = tmp_path / "e"
    (e / CHECKPOINT).write_bytes(b"")
    (e / PREVIOUS_CHECKPOINT).write_bytes((e / PREVIOUS_CHECKPOINT).read_bytes()[:100])
    with pytest.raises(ClbenchError, match=r"damaged checkpoint checkpoint.pt .*checkpoint.prev.pt.*Delete .* restart"):
        run(resume=e)


class _Payload:
    """Unpickling this creates the file ``marker``: what a crafted checkpoint could do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_checkpoint_is_refused_without_running_it(tmp_path, plugin, monkeypatch):
    stop_in_process(monkeypatch, 2, cfg_for(tmp_path, "x", plugin, *SMALL, "checkpoint.every=1", "strategy=killable_replay"))
    d, marker = tmp_path / "x", tmp_path / "pwned"
    state = torch.load(d / CHECKPOINT, weights_only=True)
    state["strategy"] = {"buffer": _Payload(str(marker))}
    torch.save(state, d / CHECKPOINT)
    with pytest.raises(ClbenchError, match="refusing to load .*could run code"):
        run(resume=d)
    assert not marker.exists()


VIT = ["model=timm", "model.arch=vit_tiny_patch16_224", "model.pretrained=false", "model.normalize=dataset",
       "model.kwargs={img_size: 8, patch_size: 4, embed_dim: 32, depth: 5, num_heads: 2, in_chans: 1}"]
NEEDS_VIT = {"l2p", "dualprompt", "coda_prompt", "oneprompt", "mvp", "slca", "kv_bottleneck", "linear_probe"}
SMALLER = {"kv_bottleneck": ["strategy.codebooks=4", "strategy.keys_per_codebook=8", "strategy.key_dim=3",
                             "strategy.init_epochs=1", "strategy.pretrain_images=64"],
           "cotta": ["strategy.n_augmentations=2"], "coda_prompt": ["strategy.pool_size=4"], "l2p": ["strategy.pool_size=6"]}
TTA = {"source", "bn_adapt", "tent", "cotta"}
BUILTIN = sorted(e.name for e in STRATEGIES.entries() if e.obj.__module__.startswith("clbench.strategies."))


@pytest.mark.parametrize("name", BUILTIN)
def test_every_strategy_state_loads_with_weights_only(name, tmp_path, monkeypatch):
    """After two experiences each built-in strategy's state survives torch.save and
    torch.load(weights_only=True) (nothing but tensors and plain data), and loads back."""
    from clbench.engine import Engine

    overrides = ["checkpoint.enabled=false", "logging.jsonl=false", f"strategy={name}", f"output_dir={tmp_path}",
                 "name=s", *SMALLER.get(name, [])]
    if name in TTA:
        from test_cotta import _fake_cifar

        _fake_cifar(monkeypatch, n_test=20)
        cfg = load_config(REPO / "configs" / "cotta_cifar10c.yaml", [
            *overrides, *QUIET, "scenario.corruptions=[gaussian_noise,contrast]", "scenario.n_examples=16",
            "model.depth=20", "model.width=4", "model.checkpoint=null", "train.batch_size=8", f"cache_dir={tmp_path}"])
    else:
        cfg = load_config(None, [*SMALL, "eval.baseline=false", "train.iterations=2", *overrides,
                                 *(VIT if name in NEEDS_VIT else [])])
    engine = Engine(cfg)
    engine.run()
    torch.save(engine.strategy.state_dict(), tmp_path / "state.pt")
    engine.strategy.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
