"""The engine: builds a run from its config and owns the training loop.

It owns the optimiser, the learning-rate schedule, AMP, gradient clipping, the device,
seeding and checkpoints; strategies only supply hooks (:mod:`clbench.strategy`).  Every
``eval.every`` iterations, and at the last iteration of every experience, the evaluator runs
on fixed subsets of the seen tasks; at each experience end it runs on the full test sets.
With ``eval.overlap`` the periodic evaluation is queued on a weight snapshot and its metrics
are logged when ready (:mod:`clbench.evaluation`); pending evaluations are drained before
``after_experience`` and before every checkpoint.  A training step makes no host sync when the
data is on the device (batch indices live there too); the loss is read every ``logging.log_every``.

Online protocol (``train.online=true``; Moon et al., ICCV 2023, Si-Blurry,
``methods/_trainer.py``): each experience's samples arrive once, in the stream's order (no
reshuffle, ``train.epochs``/``iterations`` ignored), in batches of ``train.batch_size``; a
class is *exposed* when its first sample arrives, and ``ctx.class_mask`` (hence the loss and
evaluation masks) allows exposed classes only.  Each incoming batch gets
``train.online_iter`` gradient steps (``prepare_batch``/``forward``/``loss``/optimiser each
time, fresh augmentation each time) and then one ``after_step`` (the code updates its memory
once per incoming batch).  Every ``eval.every_samples`` samples the evaluator measures the exposed classes (an A_auc
point) and the per-experience subsets (stability-gap trackers).  When, is ``eval.online_points``
(:func:`online_eval_due`): ``official`` (default) as the released Si-Blurry trainer
(``samples_cnt > num_eval``, ``num_eval`` = k x period, no point at the end of the stream):
after the first batch that takes the count strictly past a multiple, so
``ceil(n_samples / every_samples) - 1`` A_auc points when the batch size is at most
``every_samples``; ``inclusive_with_end`` (clbench before issue 13): after the batch that
reaches or crosses a multiple, and once more after the last sample of the stream if that is
not a multiple, so ``ceil(n_samples / every_samples)`` points.  At every task end (the stream's
end included, under ``official``) the subsets are measured once more for the trackers only
(unless just measured), and the full test sets give A_last, A_avg, F_last and the accuracy
matrix.

Resuming (``run(resume=RUN_DIR)``) restores model, optimiser, scheduler, AMP scaler,
strategy state, metric trackers, the loss accumulator of the current ``logging.log_every``
window and every RNG state from the last checkpoint, so on CPU the resumed run's
``summary.json`` and ``metrics.jsonl`` equal those of an uninterrupted run, row for row.

API for callers that drive many runs (``clbench sweep``):

* :func:`run` ``(cfg=None, resume=None, force_config_change=False) -> summary dict``.  With
  ``resume``: a finished run is left untouched and its existing summary returned; a run
  killed before its first checkpoint restarts from the beginning in the same directory (its
  records dropped); otherwise it continues from ``checkpoint.pt`` (``checkpoint.prev.pt``
  when the newest is damaged).  A ``config.yaml`` edited since the checkpoint is refused
  (:class:`ConfigChangedError`, listing the keys) unless ``force_config_change``, which is
  then recorded in ``run_info`` (``config_changes``).
* :func:`run_status` ``(run_dir) -> str``: ``missing``, ``running`` (locked by a live
  process), ``finished``, ``failed``, ``interrupted`` or ``incomplete`` (killed).

A live run holds an ``fcntl.flock`` on ``run_dir/run.lock`` (:mod:`clbench.rundir`): a second
run of the same name, or a ``--resume`` of it, is refused with the holder's PID
(:class:`~clbench.rundir.RunInUseError`); a lock left by a killed process is taken over.
SIGINT and SIGTERM stop the run after the current iteration with a checkpoint and status
``interrupted`` (a second signal stops at once); the exception is :class:`Interrupted`, a
``KeyboardInterrupt`` carrying ``run_dir`` and ``signum``.  Every other error the user can act
on is a :class:`~clbench.registry.ClbenchError`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from clbench.config import SCHEDULERS, RunConfig, check_milestones, config_to_yaml, load_config, to_dict
from clbench.evaluation import Evaluator, check_compile_mode
from clbench.logging import build_logger
from clbench.logging.console import PassProgress
from clbench.models import build_model
from clbench.composite import build_strategy
from clbench.registry import ClbenchError
from clbench.rundir import (CHECKPOINT, RunLock, create_run_dir, load_checkpoint, notice, read_summary,
                            refuse_existing, run_status, save_checkpoint)
from clbench.strategy import Batch, Context, Strategy
from clbench.transforms import Preprocess
from clbench.scenarios import build_stream
from clbench.scenarios.base import seeded_generator

__all__ = ["run", "run_status", "Engine", "Interrupted", "ConfigChangedError", "NonFiniteLossError", "CHECKPOINT"]

#: Config keys that may change between a checkpoint and its resume (where things are written
#: and shown, not what is computed).
RESUME_FREE_KEYS = ("output_dir", "name", "cache_dir", "logging.console", "logging.tensorboard", "logging.wandb")


class NonFiniteLossError(ClbenchError):
    """The training loss became NaN or infinite."""


class ConfigChangedError(ClbenchError):
    """``config.yaml`` of a run differs from the config its checkpoint was made with."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT/SIGTERM (``signum``); ``run_dir`` is the directory to resume."""

    def __init__(self, signum: int, run_dir: Path | None = None, checkpoint: bool = False):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}" + (" (checkpoint written)" if checkpoint else ""))
        self.signum, self.run_dir = signum, run_dir


@dataclass
class Position:
    """Where training stands: the next experience to train and iterations already done in it."""

    experience: int = 0
    experience_iteration: int = 0
    iteration: int = 0


def run(cfg: DictConfig | None = None, resume: str | Path | None = None,
        force_config_change: bool = False) -> dict[str, Any]:
    """Run (``cfg``, default: the built-in default job) or resume (``resume``: a run directory,
    with its own ``config.yaml``) one experiment; returns the summary written to ``summary.json``.

    Resuming a finished run returns its summary untouched; a run without checkpoint restarts
    from the beginning in its directory; a ``config.yaml`` changed since the checkpoint raises
    :class:`ConfigChangedError` unless ``force_config_change``."""
    engine = open_run(cfg, resume, force_config_change)
    return engine if isinstance(engine, dict) else engine.run()


def open_run(cfg: DictConfig | None = None, resume: str | Path | None = None,
             force_config_change: bool = False) -> "Engine | dict[str, Any]":
    """What :func:`run` runs: the :class:`Engine` of a new run (``cfg``) or of the resumed run
    directory ``resume`` (holding its lock; call ``.run()``), or the summary of an already
    finished one.  For scripts that read the engine after the run (e.g. extra evaluations)."""
    if resume is None:
        return Engine(cfg if cfg is not None else load_config())
    run_dir = Path(resume)
    if not (run_dir / "config.yaml").is_file():
        raise ClbenchError(f"cannot resume: {run_dir} is not a run directory (no config.yaml)")
    lock = RunLock.acquire(run_dir)
    try:
        summary = read_summary(run_dir)
        if summary is not None and summary.get("status") == "finished":
            notice(f"{run_dir} is already finished; nothing to resume (its summary.json is unchanged)")
            lock.release()
            return summary
        cfg = load_config(run_dir / "config.yaml")  # the run's own config
        checkpoint = load_checkpoint(run_dir, resolve_device(cfg.device))
        changes: dict[str, list[Any]] = {}
        if checkpoint is None:
            notice(f"{run_dir} has no checkpoint (it stopped before the first one): restarting it from the beginning")
        elif checkpoint.get("config") is not None:
            changes = config_changes(checkpoint["config"], flat_config(cfg))
            if changes and not force_config_change:
                listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} in config.yaml" for k, (old, new) in changes.items())
                raise ConfigChangedError(
                    f"cannot resume {run_dir}: config.yaml changed since the checkpoint ({listed}); "
                    "restore those values, or pass --force-config-change to continue with the new ones")
            if changes:
                notice(f"resuming {run_dir} with a changed config: " + ", ".join(changes))
        return Engine(cfg, resume_dir=run_dir, checkpoint=checkpoint, lock=lock, config_changes=changes)
    except BaseException:
        lock.release()
        raise


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as ``{"train.lr": 0.05, ...}`` (plain values: stored in checkpoints)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(json.loads(json.dumps(to_dict(cfg), default=str)), "")
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """``{key: [saved, current]}`` for every key that differs, except :data:`RESUME_FREE_KEYS`."""
    free = lambda key: any(key == k or key.startswith(k + ".") for k in RESUME_FREE_KEYS)  # noqa: E731
    return {key: [saved.get(key), current.get(key)] for key in sorted(set(saved) | set(current))
            if not free(key) and saved.get(key) != current.get(key)}


class Engine:
    """One run: stream, model, strategy, evaluator, loggers and the training loop."""

    def __init__(self, cfg: DictConfig, resume_dir: Path | None = None, checkpoint: dict[str, Any] | None = None,
                 lock: RunLock | None = None, config_changes: dict[str, list[Any]] | None = None):
        """``resume_dir``: continue that run from ``checkpoint`` (None: restart it) under
        ``lock``, held by the caller (:func:`run`); otherwise a new run directory is created."""
        self.config = cfg  # the DictConfig, for the run directory
        self.cfg = cfg = OmegaConf.to_object(cfg)  # plain dataclasses: cheap attribute reads in the loops
        seed_everything(cfg.seed, cfg.deterministic)
        self.device = resolve_device(cfg.device)
        stream = build_stream(cfg.scenario, seed=cfg.seed, cache_dir=cfg.cache_dir)
        self.stream = stream.to(self.device) if cfg.train.data_on_device else stream
        self.model = build_model(cfg.model, stream.image_shape, stream.num_classes).to(self.device)
        self.strategy: Strategy = build_strategy(cfg.strategy)  # a Composite for strategy=[a,b]
        mean, std = getattr(self.model, "input_stats", None) or (stream.mean, stream.std)
        self.ctx = Context(stream=self.stream, device=self.device, seed=cfg.seed,
                           preprocess=Preprocess(mean, std, cfg.train.augment, size=getattr(self.model, "input_size", None),
                                                 crop=getattr(self.model, "input_crop", 1.0)))
        self.ctx.class_mask = self.stream.class_mask(0).to(self.device)
        self.online = cfg.train.online
        if self.online:
            check_online(cfg, self.stream)
        self.exposed = torch.zeros(stream.num_classes, dtype=torch.bool, device=self.device)  # online: classes seen
        self._last_eval = -1  # online: samples_seen at the last evaluation
        if cfg.logging.console:  # long passes (Fisher, features, key fitting) report on the console
            self.ctx.progress = PassProgress(cfg.logging.progress)
        self.strategy.setup(self.model, self.ctx)
        self.model.to(self.device)
        self.channels_last = cfg.train.channels_last and self.device.type == "cuda"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        compile_model(self.model, cfg)
        self.trainable_params = count_parameters(self.strategy.param_groups())
        self.evaluator = Evaluator(self.strategy, self.ctx, cfg.eval, online=self.online)
        self.resume_dir = resume_dir
        self.run_dir = resume_dir or make_run_dir(cfg, stream)
        self.lock = lock
        self.config_changes = config_changes or {}
        self.position = Position()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.step_lr = 0.0  # the learning rate of the last optimizer step
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16" and self.device.type == "cuda")
        self._checkpoint: dict[str, Any] | None = checkpoint
        self._pending_optimizer: dict[str, Any] | None = None  # boundary resume: state for the next optimiser
        self._resume_loss: dict[str, Any] | None = None  # mid-experience resume: the loss window so far
        self._losses: LossLog | None = None
        self._stop_signal: int | None = None  # SIGINT/SIGTERM received: stop after this iteration
        self.status = "running"

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Train (or continue) to the end; the run directory stays locked until it returns."""
        if self.lock is None:
            self.lock = create_run_dir(self.run_dir)
        try:
            with self._signals_stop_gracefully():
                return self._run()
        except KeyboardInterrupt as err:
            err.run_dir = self.run_dir  # for the CLI's "resume with" hint
            raise
        finally:
            self.lock.release()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self.resume_dir is not None
        (self.run_dir / "summary.json").unlink(missing_ok=True)  # until the run ends, no summary: status "incomplete"
        if self._checkpoint is not None:
            self.position = Position(**self._checkpoint["position"])
            trim_metrics(self.run_dir, self.position.iteration)
        else:  # a new run, or one killed before its first checkpoint: (re)start from scratch
            trim_metrics(self.run_dir, None)
            (self.run_dir / "config.yaml").write_text(config_to_yaml(self.config))
        self.ctx.iteration = self.position.iteration
        self.logger = build_logger(cfg.logging, self.run_dir, to_dict(self.config))
        self.logger.on_run_start(self._run_info(resumed))
        error: BaseException | None = None
        try:
            if self._checkpoint is None and cfg.eval.baseline and self.stream.protocol != "tta":
                self.evaluator.baseline()
            if self._checkpoint is not None and self.position.experience_iteration == 0:
                self._restore(self._checkpoint, optimizer=False)
                if not cfg.train.reset_optimizer:
                    self._pending_optimizer = self._checkpoint["optimizer"]
                self._checkpoint = None
            step = (self._adapt_experience if self.stream.protocol == "tta"
                    else self._train_online if self.online else self._train_experience)
            for k in range(self.position.experience, len(self.stream)):
                if self._stop_signal is not None:  # at a boundary: its checkpoint is written
                    raise Interrupted(self._stop_signal, self.run_dir, checkpoint=cfg.checkpoint.enabled)
                step(k)
            self.status = "finished"
        except BaseException as err:  # keep what was logged; say why it stopped
            error = err
            self.status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            raise
        finally:
            summary = self._summary(error)
            try:
                self.logger.on_run_end(summary)
            finally:
                self.logger.close()
        return summary

    # ------------------------------------------------------------------ signals
    def _signals_stop_gracefully(self):
        """SIGINT and SIGTERM ask the loops to stop after the current iteration (with a
        checkpoint); a second signal raises :class:`Interrupted` at once.  Only in the main
        thread (elsewhere Python cannot install handlers); the previous handlers come back after."""
        engine = self

        class Handlers:
            def __enter__(self):
                self.saved = {}
                if threading.current_thread() is not threading.main_thread():
                    return self
                for signum in (signal.SIGINT, signal.SIGTERM):
                    self.saved[signum] = signal.signal(signum, engine._on_signal)
                return self

            def __exit__(self, *exc):
                for signum, handler in self.saved.items():
                    signal.signal(signum, handler)

        return Handlers()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:
            raise Interrupted(signum, self.run_dir)
        self._stop_signal = signum
        notice(f"{signal.Signals(signum).name} received: stopping after this iteration with a checkpoint "
               "(send it again to stop at once)")

    def _stop_here(self, position: Position) -> None:
        """A stop was asked for: checkpoint ``position`` (where the loop stands) and raise."""
        if self._stop_signal is None:
            return
        if self.cfg.checkpoint.enabled:
            self._save(position)
        raise Interrupted(self._stop_signal, self.run_dir, checkpoint=self.cfg.checkpoint.enabled)

    def _train_experience(self, k: int) -> None:
        cfg, ctx, stream = self.cfg, self.ctx, self.stream
        exp = stream[k]
        ctx.experience = k
        ctx.class_mask = stream.class_mask(k).to(self.device)
        self._restore_strategy_early()
        train_exps = self.strategy.training_experiences(exp, ctx)
        sample_idx, sample_exp, task_ids = training_samples(train_exps, stream.train.x.device)
        n_iter = iterations_per_experience(sample_idx.numel(), cfg.train)
        self._prepare_experience(exp, n_iter, math.ceil(sample_idx.numel() / cfg.train.batch_size))
        start = self.position.experience_iteration
        ctx.iteration = self.position.iteration
        self.logger.on_experience_start(k, len(stream), n_iter, exp.classes.tolist())
        if start == 0:
            self.evaluator.start_experience(k, ctx.iteration)
        losses = self._losses = LossLog(self, k)
        eval_every, checkpoint_every = cfg.eval.every, cfg.checkpoint.every
        self.model.train()
        for it, (idx, which) in enumerate(batch_schedule(sample_idx, sample_exp, cfg, k), start=0):
            if it < start:
                continue
            ctx.experience_iteration = it
            batch = self._fetch(idx, which, train_exps, task_ids)
            last = losses.record(self._step(batch), it, n_iter)
            if last or (eval_every > 0 and ctx.iteration % eval_every == 0):
                self._periodic_eval(k)
            if checkpoint_every > 0 and ctx.iteration % checkpoint_every == 0 and not last:
                self._save(Position(k, it + 1, ctx.iteration))
            if not last:
                self._stop_here(Position(k, it + 1, ctx.iteration))
        self._drain_evaluations()  # before after_experience may change what predict reads
        self.strategy.after_experience(exp, ctx)
        if n_iter == 0:  # no gradient steps (e.g. FeTrIL's incremental states): evaluate once, after
            self.logger.log_metrics(self.evaluator.periodic(ctx.iteration, k + 1), ctx.iteration, "eval")
        metrics = self.evaluator.experience_end(k)
        self.logger.log_metrics(metrics, ctx.iteration, "experience")
        self.logger.on_experience_end(k, metrics)
        self.position = Position(k + 1, 0, ctx.iteration)
        if cfg.checkpoint.enabled:
            self._save(self.position)

    def _periodic_eval(self, k: int) -> None:
        """The periodic evaluation after ``ctx.iteration`` (queued on a side stream with
        ``eval.overlap``; its metrics are then logged when ready, at their own iteration)."""
        if not self.evaluator.overlap:
            self.logger.log_metrics(self.evaluator.periodic(self.ctx.iteration, k + 1), self.ctx.iteration, "eval")
            return
        for iteration, metrics in self.evaluator.submit(self.ctx.iteration, k + 1):
            self.logger.log_metrics(metrics, iteration, "eval")

    def _drain_evaluations(self) -> None:
        for iteration, metrics in self.evaluator.drain():
            self.logger.log_metrics(metrics, iteration, "eval")

    def _prepare_experience(self, exp, n_iter: int, per_epoch: int | None = None) -> None:
        """Before training ``exp`` for ``n_iter`` steps: strategy hook, optimiser, schedule and,
        when resuming, the checkpoint's state."""
        cfg, ctx = self.cfg, self.ctx
        ctx.n_iterations = n_iter
        self.strategy.before_experience(exp, ctx)
        if n_iter and (self.optimizer is None or cfg.train.reset_optimizer):
            self._new_optimizer(self.strategy.param_groups())
        # the schedule starts from the optimiser's state (a boundary resume has loaded it above),
        # exactly as in the uninterrupted run
        self.scheduler = make_scheduler(self.optimizer, cfg.train, n_iter, per_epoch) if n_iter else None
        if self._checkpoint is not None:  # mid-experience: after the experience's own set-up
            self._restore(self._checkpoint, optimizer=True)
        self._checkpoint = None

    def _restore_strategy_early(self) -> None:
        """Mid-experience resume: the strategy's state (e.g. iCaRL's exemplars) must be back
        before ``training_experiences`` picks this experience's training data; the full restore
        (model, optimiser, trackers) still follows the experience's own set-up."""
        if self._checkpoint is not None:
            self.strategy.load_state_dict(self._checkpoint["strategy"])

    def _new_optimizer(self, groups: list[dict[str, Any]]) -> None:
        """A fresh optimiser; after a resume at a boundary with ``train.reset_optimizer=false`` it
        takes the checkpoint's state (as the uninterrupted run keeps its optimiser)."""
        self.optimizer = make_optimizer(groups, self.cfg.train)
        if self._pending_optimizer is not None:
            self.optimizer.load_state_dict(self._pending_optimizer)
            self._pending_optimizer = None

    def _train_online(self, k: int) -> None:
        """Experience k under the online protocol (see the module docstring)."""
        cfg, ctx, stream = self.cfg, self.ctx, self.stream
        exp = stream[k]
        ctx.experience = k
        allowed = stream.class_mask(k).to(self.device)  # what the protocol allows (task-IL: the task's classes)
        ctx.class_mask = allowed & self.exposed
        self._restore_strategy_early()
        train_exps = self.strategy.training_experiences(exp, ctx)
        sample_idx, sample_exp, task_ids = training_samples(train_exps, stream.train.x.device)
        bs, reps, period = cfg.train.batch_size, cfg.train.online_iter, cfg.eval.every_samples
        n_batches = math.ceil(sample_idx.numel() / bs)
        n_iter = n_batches * reps
        self._prepare_experience(exp, n_iter)
        start = self.position.experience_iteration // reps  # incoming batches already done
        ctx.iteration = self.position.iteration
        self.logger.on_experience_start(k, len(stream), n_iter, exp.classes.tolist())
        if start == 0:
            self.evaluator.start_experience(k, ctx.iteration)
        losses = self._losses = LossLog(self, k)
        checkpoint_every = cfg.checkpoint.every
        self.model.train()
        for b in range(start, n_batches):
            rows = slice(b * bs, (b + 1) * bs)
            batch = self._fetch(sample_idx[rows], sample_exp[rows], train_exps, task_ids)
            self.exposed[batch.y] = True  # exposed on arrival, before training on the batch
            ctx.class_mask = allowed & self.exposed
            for r in range(reps):
                it = b * reps + r
                ctx.experience_iteration = it
                losses.record(self._step(batch, after_step=r == reps - 1), it, n_iter)
            ctx.samples_seen += len(batch)
            if period > 0 and online_eval_due(ctx.samples_seen, len(batch), period, cfg.eval.online_points):
                self._online_eval(k)
            if (checkpoint_every > 0 and ctx.iteration // checkpoint_every > (ctx.iteration - reps) // checkpoint_every
                    and b + 1 < n_batches):
                self._save(Position(k, (b + 1) * reps, ctx.iteration))
            if b + 1 < n_batches:
                self._stop_here(Position(k, (b + 1) * reps, ctx.iteration))
        self.strategy.after_experience(exp, ctx)
        final = k == len(stream) - 1
        stream_end = all(e.train_idx.numel() == 0 for e in stream.experiences[k + 1:])
        if period > 0 and n_batches and self._last_eval != ctx.samples_seen:
            # task ends give the trackers their boundary accuracies (as the offline loop's
            # evaluation at the last iteration); the end of the stream is an A_auc point only
            # with eval.online_points=inclusive_with_end (the released trainer has none)
            self._online_eval(k, auc=stream_end and cfg.eval.online_points == "inclusive_with_end")
        metrics = self.evaluator.online_task_end(k, self.exposed)
        self.logger.log_metrics(metrics, ctx.iteration, "experience")
        self.logger.on_experience_end(k, metrics)
        if final:
            self.logger.log_metrics(self.evaluator.online_final(), ctx.iteration, "eval")
        self.position = Position(k + 1, 0, ctx.iteration)
        if cfg.checkpoint.enabled:
            self._save(self.position)

    def _online_eval(self, k: int, auc: bool = True) -> None:
        metrics = self.evaluator.online_periodic(self.ctx.iteration, k + 1, self.ctx.samples_seen, self.exposed, auc)
        self.logger.log_metrics(metrics, self.ctx.iteration, "eval")
        self._last_eval = self.ctx.samples_seen

    def _adapt_experience(self, k: int) -> None:
        """Test-time adaptation (protocol ``tta``): one pass over domain k's test stream in the
        stream's order.  Per batch: ``forward`` returns the predictions (made with the current
        weights), ``loss`` the unsupervised adaptation loss (None: no update), the engine steps
        the optimiser, then ``after_step`` (EMA teacher, stochastic restore, ...).  Labels are
        hidden from the strategy (-1) and used only to score the predictions: online accuracy."""
        cfg, ctx, stream = self.cfg, self.ctx, self.stream
        exp = stream[k]
        ctx.experience, ctx.experience_iteration = k, 0
        ctx.class_mask = stream.class_mask(k).to(self.device)
        ctx.n_iterations = math.ceil(exp.test_idx.numel() / cfg.train.batch_size)
        self.strategy.before_experience(exp, ctx)
        groups = [g for g in self.strategy.param_groups() if list(g["params"])]
        if groups and (self.optimizer is None or cfg.train.reset_optimizer):
            self._new_optimizer(groups)
        ctx.iteration = self.position.iteration
        self.logger.on_experience_start(k, len(stream), ctx.n_iterations, exp.classes.tolist())
        hits = torch.zeros((), device=self.device)
        total = 0
        for labelled in ctx.batches([exp], cfg.train.batch_size, split="test"):
            if self._stop_signal is not None:  # no mid-domain checkpoint: resumes at this domain's start
                raise Interrupted(self._stop_signal, self.run_dir)
            batch = Batch(labelled.x, torch.full_like(labelled.y, -1), labelled.task)
            with autocast(cfg.train.amp, self.device):
                scores = self.strategy.forward(ctx.inputs(batch.x), batch, ctx)
                loss = self.strategy.loss(scores, batch, ctx)
            if loss is not None:
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            self.strategy.after_step(batch, ctx)
            hits += (scores.detach().argmax(1) == labelled.y).sum()
            total += len(batch)
            ctx.iteration += 1
            ctx.experience_iteration += 1
            self.logger.on_iteration(ctx.iteration, ctx.experience_iteration)
            if ctx.experience_iteration % max(1, cfg.logging.log_every) == 0:
                self.logger.log_metrics({"tta/running_acc": float(hits) / total}, ctx.iteration, "eval")
        metrics = self.evaluator.online_result(k, float(hits) / max(total, 1))
        self.logger.log_metrics(metrics, ctx.iteration, "experience")
        self.logger.on_experience_end(k, metrics)
        self.position = Position(k + 1, 0, ctx.iteration)
        if cfg.checkpoint.enabled:
            self._save(self.position)

    def _fetch(self, idx: torch.Tensor, which: torch.Tensor, exps: list, task_ids: torch.Tensor) -> Batch:
        """The batch of training-set rows ``idx`` (``which``: each row's position in ``exps``,
        whose task ids are ``task_ids``, on the same device).
        With the data on the device every step here is a device op: no host sync."""
        data = self.stream.train
        x = data.x[idx]
        if len(exps) == 1 and exps[0].transform is not None:
            x = exps[0].transform(x)
        elif any(e.transform is not None for e in exps):  # several domains in one batch (e.g. joint)
            x = x.clone()
            for j, e in enumerate(exps):
                if e.transform is not None:
                    rows = (which == j).nonzero().flatten()
                    if rows.numel():
                        x[rows] = e.transform(x[rows])
        task = task_ids[which]
        return Batch(x.to(self.device, non_blocking=True), data.y[idx].to(self.device, non_blocking=True),
                     task.to(self.device, non_blocking=True))

    def _step(self, batch: Batch, after_step: bool = True) -> torch.Tensor:
        cfg, ctx = self.cfg.train, self.ctx
        full = self.strategy.prepare_batch(batch, ctx)
        x = ctx.inputs(full.x, train=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(cfg.amp, self.device):
            output = self.strategy.forward(x, full, ctx)
            loss = self.strategy.loss(output, full, ctx)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.strategy.before_optimizer_step(ctx)
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used (logged as train/lr)
        if self.scheduler is not None:
            self.scheduler.step()
        if after_step:
            self.strategy.after_step(batch, ctx)
        return loss

    def _check_finite(self, nonfinite: torch.Tensor, k: int) -> None:
        bad = int(nonfinite)
        if bad:
            experience_start = self.ctx.iteration - self.ctx.experience_iteration
            raise NonFiniteLossError(
                f"non-finite training loss at experience {k}, iteration {bad - experience_start} "
                f"of that experience (global iteration {bad}); strategy '{self.cfg.strategy.name}', lr {self.cfg.train.lr}. "
                f"Everything logged so far is in {self.run_dir}; lower train.lr, set train.grad_clip, or check the data."
            )

    # ------------------------------------------------------------------ checkpoints
    def _save(self, position: Position) -> None:
        self._drain_evaluations()  # the trackers' state must include every evaluation so far
        state = {
            "position": vars(position),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "evaluator": self.evaluator.state_dict(),
            "rng": rng_state(),
            "online": {"exposed": self.exposed.cpu(), "samples_seen": self.ctx.samples_seen,
                       "last_eval": self._last_eval},
            "config": flat_config(self.config),
        }
        if position.experience_iteration > 0 and self._losses is not None:
            state["loss"] = self._losses.state_dict()
        save_checkpoint(state, self.run_dir)

    def _restore(self, state: dict[str, Any], optimizer: bool) -> None:
        self.model.load_state_dict(state["model"])
        self.strategy.load_state_dict(state["strategy"])
        self.evaluator.load_state_dict(state["evaluator"])
        if optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state["scheduler"] is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self._resume_loss = state.get("loss")
        self.scaler.load_state_dict(state["scaler"])
        if "online" in state:
            self.exposed = state["online"]["exposed"].to(self.device)
            self.ctx.samples_seen = int(state["online"]["samples_seen"])
            self._last_eval = int(state["online"]["last_eval"])
        set_rng_state(state["rng"])

    # ------------------------------------------------------------------ records
    def _run_info(self, resumed: bool) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir), "config": to_dict(self.config), "seed": self.cfg.seed,
            "class_order": list(self.stream.class_order), "class_names": list(self.stream.class_names),
            "experiences": [{"index": e.index, "task_id": e.task_id, "classes": e.classes.tolist(),
                             "n_train": e.train_idx.numel(), "n_test": e.test_idx.numel(),
                             "transform": repr(e.transform) if e.transform is not None else None}
                            for e in self.stream],
            "protocol": self.stream.protocol, "n_experiences": len(self.stream), "device": str(self.device),
            "scenario_info": self.stream.info, "online": self.online, "trainable_params": self.trainable_params,
            "versions": versions(), "resumed": resumed, "started": datetime.now().isoformat(timespec="seconds"),
            "resumed_from": self.position.iteration if resumed and self._checkpoint is not None else None,
            "config_changes": self.config_changes or None,
        }

    def _summary(self, error: BaseException | None) -> dict[str, Any]:
        summary = {"status": self.status, "run_dir": str(self.run_dir), "iterations": self.ctx.iteration,
                   "trainable_params": self.trainable_params,
                   "experiences_done": self.position.experience, **self.evaluator.summary()}
        if error is not None:
            summary["error"] = f"{type(error).__name__}: {error}"
        return summary


class LossLog:
    """Per-iteration bookkeeping shared by the training loops: advances the iteration counters,
    accumulates the loss on the device, logs its mean every ``logging.log_every`` iterations and
    stops on a non-finite loss.  The finiteness flag stays on the device (no host sync per
    iteration) except on a CPU, where checking it is free."""

    def __init__(self, engine: "Engine", experience: int):
        self.engine, self.experience = engine, experience
        self.nonfinite = torch.zeros((), dtype=torch.long, device=engine.device)  # first bad iteration + 1
        self.loss_sum = torch.zeros((), device=engine.device)
        self.log_every = max(1, engine.cfg.logging.log_every)
        self.on_cpu = engine.device.type == "cpu"
        if engine._resume_loss is not None:  # resumed mid-window: the iterations before the checkpoint count
            self.load_state_dict(engine._resume_loss)
            engine._resume_loss = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"loss_sum": self.loss_sum.detach().cpu().clone(), "nonfinite": self.nonfinite.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.loss_sum.copy_(state["loss_sum"])
        self.nonfinite.copy_(state["nonfinite"])

    def record(self, loss: torch.Tensor, it: int, n_iter: int) -> bool:
        """Book iteration ``it`` (0-based within the experience); True on the experience's last."""
        engine, ctx = self.engine, self.engine.ctx
        ctx.iteration += 1
        ctx.experience_iteration = it + 1
        loss = loss.detach()
        self.nonfinite = torch.where((self.nonfinite == 0) & ~torch.isfinite(loss), ctx.iteration, self.nonfinite)
        self.loss_sum += loss.float()
        engine.logger.on_iteration(ctx.iteration, it + 1)
        last = it + 1 == n_iter
        due = (it + 1) % self.log_every == 0 or last
        if due or self.on_cpu:
            engine._check_finite(self.nonfinite, self.experience)
        if due:
            n = (it + 1) % self.log_every or self.log_every
            engine.logger.log_metrics({"train/loss": float(self.loss_sum) / n,
                                       "train/lr": engine.step_lr}, ctx.iteration, "train")
            self.loss_sum.zero_()
        return last


# ---------------------------------------------------------------------- helpers
def training_samples(train_exps: list, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """The training-set indices of ``train_exps`` concatenated, for each the position of its
    experience in ``train_exps`` (both empty when no experience has samples), and the task id
    of each experience; on ``device`` (the training data's: batches are then gathered without
    a host round trip)."""
    empty = torch.zeros(0, dtype=torch.long)
    sample_idx = torch.cat([e.train_idx.cpu() for e in train_exps] + [empty])
    sample_exp = torch.cat([torch.full((e.train_idx.numel(),), j) for j, e in enumerate(train_exps)] + [empty])
    task_ids = torch.tensor([e.task_id for e in train_exps], dtype=torch.long)
    return sample_idx.to(device), sample_exp.to(device), task_ids.to(device)


def iterations_per_experience(n_samples: int, cfg) -> int:
    """Gradient steps for an experience; 0 when the strategy trains on no samples (e.g. FeTrIL)."""
    if n_samples == 0:
        return 0
    if cfg.iterations is not None:
        return int(cfg.iterations)
    return cfg.epochs * math.ceil(n_samples / cfg.batch_size)


def batch_schedule(sample_idx: torch.Tensor, sample_exp: torch.Tensor, cfg: RunConfig, k: int):
    """Yields ``(indices, experience-of-each)`` per iteration: seeded reshuffles per epoch,
    derived from (seed, experience, epoch) so a resumed run sees the same batches."""
    n, bs = sample_idx.numel(), cfg.train.batch_size
    total = iterations_per_experience(n, cfg.train)
    per_epoch = math.ceil(n / bs)
    done, epoch = 0, 0
    while done < total:  # the permutation is drawn on the CPU (seeded) and moved once per epoch
        perm = torch.randperm(n, generator=seeded_generator(cfg.seed, 3, k, epoch)).to(sample_idx.device)
        for b in range(per_epoch):
            if done == total:
                return
            sel = perm[b * bs:(b + 1) * bs]
            yield sample_idx[sel], sample_exp[sel]
            done += 1
        epoch += 1


def online_eval_due(samples: int, batch: int, period: int, points: str = "official") -> bool:
    """Whether the online protocol evaluates after a batch of ``batch`` samples that took the
    count to ``samples`` (``eval.every_samples`` = ``period``).  ``official``: some multiple
    k x period (k >= 1) satisfies ``samples - batch <= k x period < samples`` -- the released
    Si-Blurry trainer's ``samples_cnt > num_eval`` (identical to it while ``batch <= period``;
    its ``num_eval`` then lags behind for larger batches, this does not).
    ``inclusive_with_end``: ``samples - batch < k x period <= samples``."""
    if points == "official":
        return max(samples - 1, 0) // period > max(samples - batch - 1, 0) // period
    return samples // period > (samples - batch) // period


def check_online(cfg: RunConfig, stream) -> None:
    """Errors a user can act on for ``train.online=true``."""
    if stream.protocol == "tta":
        raise ClbenchError(f"train.online=true does not apply to the test-time-adaptation scenario '{stream.name}' "
                           "(it is already a single online pass); set train.online=false")
    if cfg.train.online_iter < 1:
        raise ClbenchError(f"train.online_iter must be >= 1 (gradient steps per incoming batch), got {cfg.train.online_iter}")
    if cfg.eval.overlap:
        raise ClbenchError("eval.overlap applies to the offline loop's periodic evaluation; "
                           "set eval.overlap=false with train.online=true")
    if cfg.eval.every_samples < 0:
        raise ClbenchError(f"eval.every_samples must be >= 0 (0: evaluate at task ends only), got {cfg.eval.every_samples}")


def compile_model(model: torch.nn.Module, cfg: RunConfig) -> None:
    """``train.compile``: ``torch.compile`` the model's forward in place (its state dict keeps its
    keys).  Modes that use CUDA graphs assume fixed weight addresses, which the overlapped
    evaluator's snapshot swap breaks, so they cannot be combined with ``eval.overlap``."""
    mode = cfg.train.compile
    check_compile_mode("train.compile", mode)
    if mode in ("reduce-overhead", "max-autotune") and cfg.eval.overlap:
        raise ClbenchError(f"train.compile={mode} (CUDA graphs) cannot be combined with eval.overlap=true; "
                           "use train.compile=default with the overlap, or eval.overlap=false")
    if mode != "none":
        model.compile(mode=mode, dynamic=False)


def count_parameters(groups: list[dict[str, Any]]) -> int:
    """Elements of the distinct parameters that require a gradient in ``groups`` (the strategy's
    trainable parameters at the start of the run, e.g. prompts + head for a prompt method)."""
    seen = {id(p): p for g in groups for p in g["params"] if p.requires_grad}
    return sum(p.numel() for p in seen.values())


def make_optimizer(groups: list[dict[str, Any]], cfg) -> torch.optim.Optimizer:
    """The ``train.optimizer`` over the strategy's parameter groups.  A group may set its own
    ``lr``, or ``lr_scale`` (its lr = ``train.lr * lr_scale``, e.g. SLCA's slow backbone)."""
    if not any(len(list(g["params"])) for g in groups):
        raise ClbenchError("the strategy returned no trainable parameters (param_groups() is empty)")
    groups = [{**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": cfg.lr * g["lr_scale"]} if "lr_scale" in g else g
              for g in groups]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ClbenchError(f"unknown train.optimizer '{cfg.optimizer}'; valid: sgd, adam, adamw")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg, n_iter: int, per_epoch: int | None = None):
    """The learning-rate schedule of one experience of ``n_iter`` iterations, ``per_epoch`` per epoch
    (``None``: one epoch of ``n_iter``), stepped once per iteration.

    * ``cosine``: per-iteration half cosine to 0 over the experience (after ``warmup_iters``).
    * ``coda_cosine``: the CODA-Prompt code's epoch-wise schedule (``utils/schedulers.py::CosineSchedule``,
      stepped at the start of each epoch after the first; GT-RIPL/CODA-Prompt, also L2P++/DualPrompt/OnePrompt
      there): lr x cos(99 pi max(e - 1, 0) / (200 (K - 1))) in epoch e of K (x1 when K = 1).  One epoch
      behind the formula: the official ``_LRScheduler.__init__`` sets epoch 0's lr and then resets
      ``last_epoch`` to -1, so the first ``step()`` (epoch 1) computes e = 0 again (golden from the official
      class: ``tests/test_reference_prompts.py``); the last epoch runs at cos(99 pi (K - 2) / (200 (K - 1))).
    * ``multistep``: torch's ``MultiStepLR`` stepped per epoch (SLCA, FeTrIL's initial model):
      lr x gamma^(number of milestones <= e) in epoch e.
    A linear warm-up over the first ``warmup_iters`` iterations multiplies any of them."""
    if cfg.scheduler == "none" and cfg.warmup_iters == 0:
        return None
    if cfg.scheduler not in SCHEDULERS:
        raise ClbenchError(f"unknown train.scheduler '{cfg.scheduler}'; valid: {', '.join(SCHEDULERS)}")
    milestones = list(getattr(cfg, "milestones", []) or [])
    check_milestones(cfg.scheduler, milestones)
    warm, kind = cfg.warmup_iters, cfg.scheduler
    per_epoch = max(1, per_epoch or n_iter)
    n_epochs = max(1, math.ceil(n_iter / per_epoch))
    gamma = getattr(cfg, "gamma", 0.1)

    def epoch_factor(epoch: int) -> float:
        if kind == "coda_cosine":
            return 1.0 if n_epochs == 1 else math.cos(99 * math.pi * max(epoch - 1, 0) / (200 * (n_epochs - 1)))
        return gamma ** sum(m <= epoch for m in milestones)

    def factor(step: int) -> float:
        ramp = (step + 1) / warm if step < warm else 1.0
        if kind in ("coda_cosine", "multistep"):
            return ramp * epoch_factor(min(step // per_epoch, n_epochs - 1))
        if step < warm:
            return ramp
        if kind == "none":
            return 1.0
        progress = (step - warm) / max(1, n_iter - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(amp: str, device: torch.device):
    if amp == "none":
        return nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ClbenchError(f"unknown train.amp '{amp}'; valid: none, bf16, fp16")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type != "cuda" and amp == "fp16":
        raise ClbenchError("train.amp=fp16 needs a CUDA device; use bf16 or none on CPU")
    return torch.autocast(device.type, dtype=dtype)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClbenchError(f"device '{name}' requested but CUDA is not available; use device=cpu or device=auto")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state() -> dict[str, Any]:
    """Every RNG's state as plain data (tensors, numbers, lists): loadable with ``weights_only=True``."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def make_run_dir(cfg: RunConfig, stream) -> Path:
    """The new run's directory path (created, locked, by :func:`clbench.rundir.create_run_dir`)."""
    name = cfg.name or f"{datetime.now():%Y%m%d-%H%M%S}-{stream.name}-{cfg.strategy.name}-s{cfg.seed}"
    path = Path(cfg.output_dir) / name
    if path.exists():
        refuse_existing(path)
    return path


def trim_metrics(run_dir: Path, iteration: int | None) -> None:
    """Drop records a killed run logged after its last checkpoint at ``iteration`` (they will be
    logged again); ``None``: drop them all (the run restarts from the beginning)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    if iteration is None:
        path.write_text("")
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= iteration:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a truncated last line
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    import clbench

    out = {"python": platform.python_version(), "torch": torch.__version__, "clbench": clbench.__version__,
           "numpy": np.__version__}
    try:
        out["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                        cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except Exception:
        out["git_sha"] = "unknown"
    return out
