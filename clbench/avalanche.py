"""clbench's continual evaluator inside an Avalanche training loop (issue 14, section 2).

:class:`ContinualEvaluationPlugin` is an Avalanche ``SupervisedPlugin``.  Added to any
Avalanche strategy (``Naive``, ``EWC``, ``Replay``, ... best built with ``eval_every=-1`` so
that Avalanche does not evaluate too), it

* materialises every experience of the benchmark's test stream once (the datasets' eval
  transforms applied once) and moves it to the strategy's device;
* after every ``every`` training iterations evaluates the *seen* experiences (0..k while
  experience k trains) on fixed, seeded subsets of ``subset_size`` images
  (:meth:`clbench.scenarios.base.Experience.eval_subset`, as clbench runs do), in large
  batches under ``inference_mode`` (``precision``: bf16 autocast on a GPU by default), and
  after each experience evaluates every full test set (one row of the accuracy matrix);
* does so with clbench's own :class:`clbench.evaluation.Evaluator`, so accuracy matrix, ACC,
  forgetting, BWT, min-ACC, WC-ACC, windowed forgetting/plasticity and the per-boundary
  stability gaps come from :mod:`clbench.metrics`'s trackers, exactly as in a clbench run;
* writes a clbench run directory through clbench's loggers (``config.yaml``,
  ``run_info.json``, ``metrics.jsonl``, TensorBoard, optionally wandb; ``summary.json`` with
  ``status`` once the last experience of the stream is trained or :meth:`close` is
  called), which ``clbench compare`` and ``clbench report`` read like any clbench run;
* publishes the values to the strategy's Avalanche ``EvaluationPlugin`` (and so its loggers):
  per-experience accuracies under Avalanche's names
  (``Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000``, the same names
  ``accuracy_metrics(experience=True)`` uses), the rest as ``clbench/<metric>``
  (``clbench/min_acc``, ``clbench/wc_acc``, ``clbench/wf10``, ``clbench/acc``, ...).

The model's outputs are used as Avalanche's evaluation uses them (``argmax`` over all logits,
no class masking; the task labels are passed to multi-head models), so the accuracies equal
Avalanche's own ``accuracy_metrics`` on the same images (tests/test_avalanche_plugin.py).
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from clbench.config import EvalConfig
from clbench.evaluation import Evaluator
from clbench.logging import LoggingConfig, build_logger
from clbench.registry import ClbenchError
from clbench.scenarios.base import Experience
from clbench.strategy import Context
from clbench.validation import validate

__all__ = ["ContinualEvaluationPlugin", "materialise_test_stream"]

#: summary metrics published to Avalanche at each experience end (with every ``wf{w}``/``wp{w}``)
PUBLISHED = ("acc", "avg_inc_acc", "forgetting", "bwt", "fwt", "min_acc", "wc_acc", "n_gaps", "mean_gap")


@dataclasses.dataclass(frozen=True)
class _Split:
    """Test images (any dtype: already transformed floats from Avalanche) and int64 labels."""

    x: torch.Tensor
    y: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _TestStream:
    """The part of :class:`clbench.scenarios.base.Stream` the evaluator reads, for an Avalanche
    test stream: the concatenated test sets and one :class:`Experience` per test experience."""

    name: str
    protocol: str
    test: _Split
    experiences: tuple[Experience, ...]
    info: dict

    def __len__(self) -> int:
        return len(self.experiences)

    def __iter__(self):
        return iter(self.experiences)

    def __getitem__(self, k: int) -> Experience:
        return self.experiences[k]


class _Predictor:
    """The clbench side of a strategy that the evaluator asks for: ``model`` (read from the
    Avalanche strategy at each call: strategies may replace it) and ``predict``."""

    def __init__(self, strategy: Any):
        self.strategy = strategy

    @property
    def model(self) -> torch.nn.Module:
        return self.strategy.model

    def predict(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        if task_id is None:
            return self.model(x)
        from avalanche.models.utils import avalanche_forward

        return avalanche_forward(self.model, x, task_id)


def _no_preprocess(x: torch.Tensor, train: bool = False) -> torch.Tensor:
    """Avalanche's eval transforms were applied once when the stream was materialised."""
    return x


def materialise_test_stream(test_stream: Any, batch_size: int = 1024) -> _TestStream:
    """Every experience of an Avalanche test stream as tensors (eval transforms applied once).

    Raises :class:`ClbenchError` naming the experience whose samples are not (image tensor,
    integer label, task label) triples."""
    xs, ys, exps, offset = [], [], [], 0
    tasks: set[int] = set()
    task_aware = True  # experiences carry task labels (Avalanche then names metrics .../Task000/...)
    for k, aexp in enumerate(test_stream):
        ds = aexp.dataset.eval() if hasattr(aexp.dataset, "eval") else aexp.dataset
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0,
                                             collate_fn=getattr(ds, "collate_fn", None))
        bx, by = [], []
        for batch in loader:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not torch.is_tensor(batch[0]):
                raise ClbenchError(f"test experience {k}: samples are not (tensor, label, ...) tuples; "
                                   "ContinualEvaluationPlugin needs a classification benchmark with tensor inputs")
            bx.append(batch[0])
            by.append(torch.as_tensor(batch[1]).long())
        x = torch.cat(bx) if bx else torch.zeros(0)
        y = torch.cat(by) if by else torch.zeros(0, dtype=torch.long)
        try:
            labels = aexp.task_labels
        except (AttributeError, NotImplementedError):  # a task-unaware benchmark
            labels = None
        task_aware = task_aware and labels is not None
        task_labels = list(labels or [0])
        if len(task_labels) != 1:
            raise ClbenchError(f"test experience {k} holds several task labels {task_labels}; "
                               "ContinualEvaluationPlugin needs one task label per experience")
        task = int(task_labels[0])
        tasks.add(task)
        classes = torch.tensor(sorted(getattr(aexp, "classes_in_this_experience", y.unique().tolist())))
        exps.append(Experience(index=k, task_id=task, classes=classes.long(), train_idx=torch.zeros(0, dtype=torch.long),
                               test_idx=torch.arange(offset, offset + y.numel())))
        xs.append(x)
        ys.append(y)
        offset += y.numel()
    if not exps:
        raise ClbenchError("the Avalanche test stream has no experience")
    protocol = "task" if len(tasks) > 1 else "class"
    name = str(getattr(test_stream, "name", "test"))
    name = name if name.endswith("_stream") else name + "_stream"  # as Avalanche's metric names spell it
    return _TestStream(name, protocol, _Split(torch.cat(xs), torch.cat(ys)), tuple(exps),
                       {"source": "avalanche", "task_aware": task_aware})


class ContinualEvaluationPlugin(SupervisedPlugin):
    """clbench's continual evaluation and metrics for an Avalanche strategy.

    ``test_stream``: the Avalanche test stream (or a benchmark: its ``test_stream``); training
    experience k is assumed to match test experience k.  ``every``: evaluate the seen
    experiences every N training iterations (0: only at experience ends); ``subset_size``:
    images per experience of the fixed seeded subsets (0: the full test sets); ``precision``:
    ``auto`` | ``fp32`` | ``bf16``; ``eval_batch_size``: 0 = clbench's default (256 on CPU,
    2048 on a GPU); ``run_dir``: the clbench run directory to create (default
    ``<output_dir>/<time>_avalanche_<strategy>``; None with ``write=False``: no records);
    ``logging``: clbench's logger selection (default: JSONL and TensorBoard, no console);
    ``config``: extra keys for ``config.yaml`` (e.g. ``{"strategy": {"lr": 0.01}}``).
    Other keyword arguments are fields of :class:`clbench.config.EvalConfig`
    (``windows``, ``recovery_tol``, ``gap_window``, ``wf_tasks``, ``baseline``...).
    """

    def __init__(self, test_stream: Any, every: int = 10, subset_size: int = 1000, precision: str = "auto",
                 eval_batch_size: int = 0, seed: int = 0, run_dir: str | Path | None = None,
                 output_dir: str | Path = "runs", write: bool = True, logging: LoggingConfig | None = None,
                 publish: bool = True, config: dict[str, Any] | None = None, **eval_options: Any):
        super().__init__()
        self.test_stream = getattr(test_stream, "test_stream", test_stream)
        unknown = set(eval_options) - {f.name for f in dataclasses.fields(EvalConfig)}
        if unknown:
            raise ClbenchError(f"ContinualEvaluationPlugin: unknown option(s) {sorted(unknown)}; "
                               f"valid: the fields of clbench.config.EvalConfig")
        if eval_options.get("overlap") or eval_options.get("compile", "none") != "none":
            raise ClbenchError("ContinualEvaluationPlugin supports neither eval.overlap nor eval.compile")
        self.cfg = EvalConfig(**{**eval_options, "every": every, "subset_size": subset_size,
                                 "precision": precision, "batch_size": eval_batch_size})
        validate(self.cfg, "eval.")
        self.seed = int(seed)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.output_dir, self.write, self.publish = Path(output_dir), write, publish
        self.logging = logging or LoggingConfig(console=False, progress=False)
        self.extra_config = dict(config or {})
        self.evaluator: Evaluator | None = None
        self.ctx: Context | None = None
        self.logger = None
        self._lock = None
        self.iteration = 0  # training iterations done, over the whole run
        self.experiences_done = 0
        self.status: str | None = None
        self.eval_seconds = 0.0
        self.last_periodic: dict[int, float] = {}  # accuracies of the last periodic evaluation, by experience

    # ---------------------------------------------------------------- set-up
    def _setup(self, strategy: Any) -> None:
        device = torch.device(strategy.device)
        stream = materialise_test_stream(self.test_stream)
        stream = dataclasses.replace(stream, test=_Split(stream.test.x.to(device), stream.test.y.to(device)))
        self.ctx = Context(stream=stream, device=device, seed=self.seed, preprocess=_no_preprocess)  # type: ignore[arg-type]
        # Avalanche evaluates the argmax over all outputs: allow every logit (broadcast over classes)
        self.ctx.class_mask = torch.ones(1 + max(e.task_id for e in stream), 1, dtype=torch.bool, device=device)
        self.evaluator = Evaluator(_Predictor(strategy), self.ctx, self.cfg)  # type: ignore[arg-type]
        if stream.protocol == "class":  # no unseen-class masking here: FWT is measurable
            self.evaluator.matrix.fwt_undefined = None
        if not self.write:
            return
        from clbench.rundir import create_run_dir

        if self.run_dir is None:
            stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            self.run_dir = self.output_dir / f"{stamp}_avalanche_{type(strategy).__name__.lower()}"
        self._lock = create_run_dir(self.run_dir)
        config = self._config(strategy, stream)
        from omegaconf import OmegaConf

        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
        self.logger = build_logger(self.logging, self.run_dir, config)
        self.logger.on_run_start(self._run_info(strategy, stream, config))

    def _config(self, strategy: Any, stream: _TestStream) -> dict[str, Any]:
        """What ``config.yaml`` records: enough for ``clbench compare`` to group runs."""
        optimizer = getattr(strategy, "optimizer", None)
        lr = optimizer.param_groups[0].get("lr") if optimizer is not None and optimizer.param_groups else None
        config: dict[str, Any] = {
            "framework": "avalanche",
            "seed": self.seed,
            "device": str(self.ctx.device),
            "scenario": {"name": "avalanche", "stream": stream.name, "n_experiences": len(stream),
                         "protocol": stream.protocol},
            "model": {"name": type(strategy.model).__name__},
            "strategy": {"name": type(strategy).__name__.lower(), "optimizer": type(optimizer).__name__ if optimizer else None,
                         "lr": lr},
            "train": {"batch_size": getattr(strategy, "train_mb_size", None),
                      "epochs": getattr(strategy, "train_epochs", None)},
            "eval": dataclasses.asdict(self.cfg),
        }
        for key, value in self.extra_config.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        return config

    def _run_info(self, strategy: Any, stream: _TestStream, config: dict[str, Any]) -> dict[str, Any]:
        from clbench.engine import versions

        import avalanche

        return {
            "run_dir": str(self.run_dir), "config": config, "seed": self.seed, "framework": "avalanche",
            "avalanche_strategy": type(strategy).__name__,
            "experiences": [{"index": e.index, "task_id": e.task_id, "classes": e.classes.tolist(),
                             "n_test": e.test_idx.numel()} for e in stream],
            "protocol": stream.protocol, "n_experiences": len(stream), "device": str(self.ctx.device),
            "eval_subset_sizes": self.evaluator.subset_sizes, "class_order": None,
            "versions": {**versions(), "avalanche": avalanche.__version__}, "resumed": False,
            "started": datetime.now().isoformat(timespec="seconds"),
        }

    # ---------------------------------------------------------------- Avalanche callbacks
    def before_training(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.evaluator is None:
            self._setup(strategy)
            if self.cfg.baseline:
                self.evaluator.baseline()

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        k = self._experience(strategy)
        self.evaluator.start_experience(k, self.iteration)
        if self.logger is not None:
            exp = self.ctx.stream[k]
            self.logger.on_experience_start(k, len(self.ctx.stream), 0, exp.classes.tolist())

    def after_training_iteration(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self.iteration += 1
        if self.logger is not None:
            self.logger.on_iteration(self.iteration, int(strategy.clock.train_exp_iterations))
        if self.cfg.every > 0 and self.iteration % self.cfg.every == 0:
            self._periodic(strategy)

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        k = self._experience(strategy)
        if self.cfg.every <= 0 or self.iteration % self.cfg.every != 0:
            self._periodic(strategy)  # the last iteration of every experience is evaluated (as clbench does)
        t = time.perf_counter()
        metrics = self.evaluator.experience_end(k)
        self.eval_seconds += time.perf_counter() - t
        self.experiences_done = k + 1
        if self.logger is not None:
            self.logger.log_metrics(metrics, self.iteration, "experience")
            self.logger.on_experience_end(k, metrics)
        summary = {key: v for key, v in self.summary().items() if key in PUBLISHED or key.startswith(("wf", "wp"))}
        self._publish(strategy, {**metrics, **{f"summary/{key}": v for key, v in summary.items()}})
        if self.experiences_done == len(self.ctx.stream):
            self.close("finished")

    # ---------------------------------------------------------------- evaluation
    def _experience(self, strategy: Any) -> int:
        k = int(strategy.experience.current_experience)
        if not 0 <= k < len(self.ctx.stream):
            raise ClbenchError(f"training experience {k} has no test experience in the plugin's test stream "
                               f"({len(self.ctx.stream)} experiences)")
        return k

    def _periodic(self, strategy: Any) -> None:
        t = time.perf_counter()
        metrics = self.evaluator.periodic(self.iteration, self._experience(strategy) + 1)
        self.eval_seconds += time.perf_counter() - t
        self.last_periodic = {int(key.rsplit("_", 1)[1]): v for key, v in metrics.items() if key.startswith("eval/acc/task_")}
        if self.logger is not None:
            self.logger.log_metrics(metrics, self.iteration, "eval")
        self._publish(strategy, {key: v for key, v in metrics.items() if key != "eval/period"})

    def _publish(self, strategy: Any, metrics: dict[str, Any]) -> None:
        """Hand ``metrics`` to the strategy's Avalanche ``EvaluationPlugin`` (and its loggers)."""
        evaluator = getattr(strategy, "evaluator", None)
        if not self.publish or evaluator is None or not hasattr(evaluator, "publish_metric_value"):
            return
        from avalanche.evaluation.metric_results import MetricValue

        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            evaluator.publish_metric_value(MetricValue(self, self.avalanche_name(name), value, self.iteration))

    def avalanche_name(self, name: str) -> str:
        """Avalanche's name for clbench metric ``name`` where one exists, else ``clbench/<name>``:
        ``eval/acc/task_3`` (periodic) and ``exp/acc/task_3`` (experience end) are both
        ``Top1_Acc_Exp/eval_phase/test_stream/Task<t>/Exp003`` (``.../test_stream/Exp003`` when the
        experiences carry no task labels, as Avalanche names them)."""
        for prefix in ("eval/acc/task_", "exp/acc/task_"):
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                k = int(name[len(prefix):])
                stream = self.ctx.stream
                task = f"/Task{stream[k].task_id:03d}" if stream.info["task_aware"] else ""
                return f"Top1_Acc_Exp/eval_phase/{stream.name}{task}/Exp{k:03d}"
        return "clbench/" + name.split("/", 1)[1] if name.startswith(("eval/", "summary/")) else "clbench/" + name

    # ---------------------------------------------------------------- results
    def summary(self) -> dict[str, Any]:
        """clbench's summary of the run so far (as in ``summary.json``)."""
        return {"status": self.status or "running", "run_dir": None if self.run_dir is None else str(self.run_dir),
                "iterations": self.iteration, "experiences_done": self.experiences_done,
                "framework": "avalanche", "eval_seconds": round(self.eval_seconds, 4), **self.evaluator.summary()}

    def close(self, status: str = "interrupted") -> dict[str, Any] | None:
        """Write ``summary.json`` (``status``: ``finished`` after the stream's last experience,
        else as given) and close the loggers; called automatically after the last experience,
        call it yourself when training stops earlier.  Returns the summary."""
        if self.evaluator is None or self.status is not None:
            return None
        self.status = status
        summary = self.summary()
        if self.logger is not None:
            try:
                self.logger.on_run_end(summary)
            finally:
                self.logger.close()
                if self._lock is not None:
                    self._lock.release()
        return summary
