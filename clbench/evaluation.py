"""The one evaluator: periodic evaluation on fixed device-resident subsets, full test sets at
experience ends, and the continual metrics (:mod:`clbench.metrics`) computed from both.

Periodic evaluation (every ``eval.every`` iterations) runs on a fixed, seeded subset of each
seen task's test data (De Lange et al. 2023), gathered once and held on the device as one
uint8 tensor (normalised batch by batch: the floats of every subset may not fit), in large
batches under ``torch.inference_mode``; per-task accuracies are reduced on
the device and read back with a single transfer.  It asks the strategy only for ``predict``.

Online protocol (``train.online``; Moon et al., ICCV 2023): every ``eval.every_samples``
training samples the same subsets give both the per-experience accuracies (the continual
trackers) and the accuracy on the test images of the classes *exposed* so far (A_auc's
samples; subset samples are weighted by full/subset size per experience, so with
``eval.subset_size=0`` it is exactly the released code's accuracy).  Experiences without test
images (a Si-Blurry task that brings no new class) are left out of the trackers, whose
records are mapped back to experience indices.  At task ends one pass over the full test
sets gives the accuracy-matrix row, the exposed-class accuracy (A_last, A_avg) and per-class
accuracies (F_last).  Logits of unexposed classes are masked through ``ctx.class_mask``.

Overlapped evaluation (``eval.overlap``, offline loop): :meth:`Evaluator.submit` snapshots the
weights (:mod:`clbench.snapshot`) and queues the periodic pass of iteration t on a side CUDA
stream, so it runs while iterations t+1, t+2, ... train; :meth:`Evaluator.collect` hands back
finished results, in submission order, tagged with their own iteration, and feeds the trackers
in that order; :meth:`Evaluator.drain` waits for all of them (the engine drains before
experience ends and checkpoints).  At most ``OVERLAP_DEPTH`` snapshots are in flight.  The
numbers are those of the synchronous evaluator (tests/test_evaluation_overlap.py); on a CPU
the pass runs at submission and only its bookkeeping is deferred.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clbench.config import COMPILE_MODES, PRECISIONS
from clbench.metrics import AccuracyMatrix, ContinualTracker, OnlineTracker
from clbench.snapshot import WeightSnapshot, live_tensors

if TYPE_CHECKING:
    from clbench.config import EvalConfig
    from clbench.strategy import Context, Strategy


class Evaluator:
    """Accuracies of a strategy on the stream's tasks, and the metric trackers fed by them."""

    def __init__(self, strategy: "Strategy", ctx: "Context", cfg: "EvalConfig", online: bool = False):
        self.strategy = strategy
        self.ctx = ctx
        self.cfg = cfg
        stream = ctx.stream
        self.matrix = AccuracyMatrix(len(stream), fwt_undefined=fwt_undefined(stream.protocol, online))
        self.tracker = ContinualTracker(windows=tuple(cfg.windows), recovery_tol=cfg.recovery_tol,
                                        wf_tasks=cfg.wf_tasks, gap_window=cfg.gap_window,
                                        period=None if online else cfg.every)
        self.task_given = stream.protocol == "task"
        self.batch_size = cfg.batch_size or (256 if ctx.device.type == "cpu" else 2048)
        self.precision = resolve_precision(cfg.precision, ctx.device)
        self.channels_last = cfg.channels_last and ctx.device.type == "cuda"
        check_compile_mode("eval.compile", cfg.compile)
        self._predict = None  # strategy.predict, compiled on first use when eval.compile is set
        self.overlap = cfg.overlap
        if self.overlap and cfg.compile != "none":
            from clbench.registry import ClbenchError

            raise ClbenchError("eval.overlap=true needs eval.compile=none (a compiled predict, CUDA graphs above all, "
                               "assumes the weights never move; the overlapped evaluator reads them from a snapshot)")
        self._side = torch.cuda.Stream(ctx.device) if self.overlap and ctx.device.type == "cuda" else None
        self._free: list[WeightSnapshot] = [WeightSnapshot() for _ in range(OVERLAP_DEPTH)] if self.overlap else []
        self._pending: list[_Pending] = []
        self.online: dict[int, float] = {}
        xs, ys, exps = [], [], []
        self.subset_sizes: list[int] = []
        for exp in stream:
            idx = exp.eval_subset(cfg.subset_size, ctx.seed)
            self.subset_sizes.append(int(idx.numel()))  # effective: at most the task's test set
            x = stream.test.x[idx.to(stream.test.x.device)]
            x = exp.transform(x) if exp.transform is not None else x
            xs.append(x.to(ctx.device))
            ys.append(stream.test.y[idx.to(stream.test.y.device)].to(ctx.device))
            exps.append(torch.full((idx.numel(),), exp.index, device=ctx.device))
        self.ends = torch.tensor([0] + [y.numel() for y in ys]).cumsum(0).tolist()  # subset k: ends[k]:ends[k+1]
        self.x = torch.cat(xs)  # uint8; preprocessed per batch (floats of every subset may not fit)
        self.y = torch.cat(ys)
        self.exp = torch.cat(exps)
        self.task = torch.tensor([e.task_id for e in stream], device=ctx.device)[self.exp]
        self.online_metrics = OnlineTracker() if online else None
        if online:  # weights making subset accuracies estimates of full-test-set ones
            full = torch.tensor([e.test_idx.numel() for e in stream], dtype=torch.float64)
            sub = torch.tensor([y.numel() for y in ys], dtype=torch.float64)
            self.weight = (full / sub.clamp_min(1)).to(ctx.device)[self.exp].float()
            self.eval_tasks = [e.index for e in stream if e.test_idx.numel() > 0]  # tracker task r = experience eval_tasks[r]
            self._rank = {k: r for r, k in enumerate(self.eval_tasks)}

    # ---------------------------------------------------------------- accuracies
    def subset_accuracies(self, n_seen: int) -> dict[int, float]:
        """Accuracy on the eval subsets of experiences ``0..n_seen-1`` (one host transfer)."""
        return dict(enumerate(self._subset_accuracies(n_seen).tolist()))

    def _subset_accuracies(self, n_seen: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-experience accuracies on the first ``n_seen`` subsets, on the device."""
        end = self.ends[n_seen]
        correct = self._correct(self.x[:end], self.y[:end], self.task[:end], mask=mask)
        counts = torch.bincount(self.exp[:end], minlength=n_seen)[:n_seen]
        hits = torch.bincount(self.exp[:end], weights=correct.float(), minlength=n_seen)[:n_seen]
        return hits / counts.clamp_min(1)

    def full_accuracies(self) -> list[float]:
        """Accuracy on the full test set of every experience (seen or not)."""
        accs = []
        for exp in self.ctx.stream:
            hits = total = 0
            for batch in self.ctx.batches([exp], self.batch_size, split="test"):
                hits += self._correct(batch.x, batch.y, batch.task).sum()
                total += len(batch)
            accs.append(float(hits) / max(total, 1))
        return accs

    def _full_pass(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per test sample of every experience: (correct, label, experience index), on the device."""
        correct, ys, exps = [], [], []
        for exp in self.ctx.stream:
            for batch in self.ctx.batches([exp], self.batch_size, split="test"):
                correct.append(self._correct(batch.x, batch.y, batch.task))
                ys.append(batch.y)
                exps.append(torch.full_like(batch.y, exp.index))
        if not correct:
            empty = torch.zeros(0, dtype=torch.long, device=self.ctx.device)
            return empty.bool(), empty, empty
        return torch.cat(correct), torch.cat(ys), torch.cat(exps)

    def predict_fn(self):
        """``strategy.predict``, through ``torch.compile`` when ``eval.compile`` names a mode
        (``reduce-overhead`` adds CUDA graphs on a GPU).  Parameters are read at call time, so
        the compiled function sees every optimiser step (tests/test_evaluation_precision.py)."""
        if self.cfg.compile == "none":
            return self.strategy.predict
        if self._predict is None:
            self._predict = torch.compile(self.strategy.predict, mode=self.cfg.compile, dynamic=False)
        return self._predict

    def _correct(self, x_uint8: torch.Tensor, y: torch.Tensor, task: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = self.ctx.class_mask if mask is None else mask
        model: nn.Module = self.strategy.model
        was_training = model.training
        model.eval()
        try:
            out = []
            autocast = torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
            with torch.inference_mode(), autocast:
                bs = self.batch_size
                for s in range(0, y.numel(), bs):
                    xb = self.ctx.inputs(x_uint8[s:s + bs])
                    if self.channels_last and xb.dim() == 4:
                        xb = xb.contiguous(memory_format=torch.channels_last)
                    tb = task[s:s + bs]
                    scores = self.predict_fn()(xb, tb if self.task_given else None).float()
                    scores = scores.masked_fill(~mask[tb], float("-inf"))
                    out.append(scores.argmax(1) == y[s:s + bs])
        finally:
            model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=y.device)

    # ---------------------------------------------------------------- metrics
    def periodic(self, iteration: int, n_seen: int) -> dict[str, float]:
        """Evaluate the seen tasks' subsets after ``iteration`` and update the trackers."""
        return self._periodic_metrics(iteration, self.subset_accuracies(n_seen))

    def _periodic_metrics(self, iteration: int, accs: dict[int, float]) -> dict[str, float]:
        metrics = {f"eval/acc/task_{k}": a for k, a in accs.items()}
        metrics["eval/acc/avg"] = sum(accs.values()) / len(accs)
        metrics.update({f"eval/{k}": v for k, v in self.tracker.update(iteration, accs).items()})
        metrics["eval/period"] = self.cfg.every
        return metrics

    # ---------------------------------------------------------------- overlapped evaluation
    def submit(self, iteration: int, n_seen: int) -> list[tuple[int, dict[str, float]]]:
        """Queue the periodic evaluation of ``iteration`` (``eval.overlap``) on a snapshot of
        the current weights; returns the results that are ready, as ``(iteration, metrics)``."""
        ready = [] if self._free else self.collect(wait_for=1)
        snapshot = self._free.pop()
        live = live_tensors(self.strategy)
        snapshot.capture(live)  # on the training stream, after the step that produced the weights
        mask = self.ctx.class_mask.clone()  # the engine replaces ctx.class_mask between experiences
        side = self._side
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.ctx.device))
        with torch.cuda.stream(side) if side is not None else nullcontext(), snapshot.swapped_in(live):
            accs = self._subset_accuracies(n_seen, mask)
            done = None
            if side is not None:  # read back on the side stream too: a copy on the training
                accs = accs.to("cpu", non_blocking=True)  # stream would wait for its queue (pinned)
                done = torch.cuda.Event()
                done.record(side)
        self._pending.append(_Pending(iteration, accs, done, snapshot, mask))
        return ready + self.collect()

    def collect(self, wait_for: int = 0) -> list[tuple[int, dict[str, float]]]:
        """Finished overlapped evaluations in submission order (waiting for the first
        ``wait_for`` of them), fed to the trackers and returned as ``(iteration, metrics)``."""
        out = []
        while self._pending and (len(out) < wait_for or self._pending[0].ready()):
            job = self._pending.pop(0)
            if job.done is not None:
                job.done.synchronize()
            accs = dict(enumerate(job.accs.tolist()))
            out.append((job.iteration, self._periodic_metrics(job.iteration, accs)))
            self._free.append(job.snapshot)
        return out

    def drain(self) -> list[tuple[int, dict[str, float]]]:
        """Wait for every overlapped evaluation; their results, as :meth:`collect`."""
        return self.collect(wait_for=len(self._pending))

    def baseline(self) -> list[float]:
        """Accuracies of the untrained model (FWT's baseline b_i), kept with the accuracy matrix
        (checkpoints) and written to ``summary.json`` as ``baseline_acc``."""
        accs = self.full_accuracies()
        self.matrix.set_baseline(accs)
        return accs

    def experience_end(self, experience: int) -> dict[str, float]:
        """Full-test accuracies after training ``experience``: one row of the accuracy matrix."""
        accs = self.full_accuracies()
        self.matrix.update(experience, accs)
        metrics = {f"exp/acc/task_{k}": accs[k] for k in range(experience + 1)}
        metrics["exp/avg_acc"] = sum(accs[: experience + 1]) / (experience + 1)
        return metrics

    # ---------------------------------------------------------------- online protocol
    def start_experience(self, experience: int, iteration: int) -> None:
        """Mark the start of ``experience`` for the continual trackers (online: only
        experiences with test images, numbered in order)."""
        if self.online_metrics is None:
            self.tracker.start_experience(experience, iteration)
        elif experience in self._rank:
            self.tracker.start_experience(self._rank[experience], iteration)

    def online_periodic(self, iteration: int, n_seen: int, samples: int, exposed: torch.Tensor,
                        auc: bool = True) -> dict[str, float]:
        """Periodic evaluation of the online protocol after ``samples`` training samples:
        per-experience subset accuracies (continual trackers) and the accuracy on the test
        images of the ``exposed`` classes (bool ``[num_classes]``), from one forward pass.
        ``auc=False`` (the engine's extra evaluation at a task end, for the trackers' boundary
        accuracies) leaves A_auc untouched."""
        end = self.ends[n_seen]
        correct = self._correct(self.x[:end], self.y[:end], self.task[:end]).float()
        exp = self.exp[:end]
        w = self.weight[:end] * exposed[self.y[:end]].float()
        values = torch.cat([torch.bincount(exp, weights=correct, minlength=n_seen)[:n_seen],
                            torch.bincount(exp, minlength=n_seen)[:n_seen].float(),
                            (correct * w).sum()[None], w.sum()[None]]).tolist()  # one host transfer
        hits, counts = values[:n_seen], values[n_seen:2 * n_seen]
        accs = {k: hits[k] / counts[k] for k in range(n_seen) if counts[k] > 0}
        metrics: dict[str, float] = {f"eval/acc/task_{k}": a for k, a in accs.items()}
        if accs:
            metrics["eval/acc/avg"] = sum(accs.values()) / len(accs)
        ranked = {self._rank[k]: a for k, a in accs.items()}
        metrics.update({f"eval/{k}": v for k, v in self.tracker.update(iteration, ranked).items()})
        if auc and values[-1] > 0:
            metrics.update({f"eval/{k}": v for k, v in self.online_metrics.periodic(samples, values[-2] / values[-1]).items()})
        metrics["eval/n_exposed"] = int(exposed.sum())
        metrics["eval/samples"] = int(samples)
        metrics["eval/period"] = self.cfg.every_samples
        return metrics

    def online_task_end(self, experience: int, exposed: torch.Tensor) -> dict[str, float]:
        """Full-test evaluation at the end of task ``experience`` (online protocol): the
        accuracy-matrix row (None for experiences without test images), the exposed-class
        accuracy (A_last / A_avg) and per-class accuracies (F_last)."""
        n_classes = exposed.numel()
        correct, y, exp = self._full_pass()
        n_exp = len(self.ctx.stream)
        values = torch.cat([torch.bincount(exp[correct], minlength=n_exp), torch.bincount(exp, minlength=n_exp),
                            torch.bincount(y[correct], minlength=n_classes), torch.bincount(y, minlength=n_classes),
                            exposed.long()]).tolist()
        e_hits, e_counts = values[:n_exp], values[n_exp:2 * n_exp]
        c_hits, c_counts = values[2 * n_exp:2 * n_exp + n_classes], values[2 * n_exp + n_classes:-n_classes]
        seen = values[-n_classes:]
        row = [e_hits[i] / e_counts[i] if e_counts[i] else None for i in range(n_exp)]
        self.matrix.update(experience, row)
        class_accs = [c_hits[c] / c_counts[c] if seen[c] and c_counts[c] else None for c in range(n_classes)]
        hits = sum(c_hits[c] for c in range(n_classes) if seen[c])
        total = sum(c_counts[c] for c in range(n_classes) if seen[c])
        acc = hits / total if total else None
        self.online_metrics.task_end(acc, class_accs)
        metrics = {f"exp/acc/task_{i}": row[i] for i in range(experience + 1) if row[i] is not None}
        defined = [row[i] for i in range(experience + 1) if row[i] is not None]
        if defined:
            metrics["exp/avg_acc"] = sum(defined) / len(defined)
        if acc is not None:
            metrics["exp/acc/exposed"] = acc
        return metrics

    def online_final(self) -> dict[str, float]:
        """The online metrics as ``eval/a_auc``, ``eval/a_last``, ``eval/a_avg``, ``eval/f_last``
        (undefined ones left out)."""
        summary = self.online_metrics.summary()
        return {f"eval/{k}": summary[k] for k in ("a_auc", "a_last", "a_avg", "f_last") if summary[k] is not None}

    def online_result(self, experience: int, accuracy: float) -> dict[str, float]:
        """Record the online (predict-then-adapt) accuracy on a test-time-adaptation domain."""
        self.online[experience] = accuracy
        errors = [1 - a for a in self.online.values()]
        return {f"tta/acc/domain_{experience}": accuracy, f"tta/error/domain_{experience}": 1 - accuracy,
                "tta/mean_error": sum(errors) / len(errors)}

    def summary(self) -> dict[str, Any]:
        """The run's metrics: matrix-based (ACC, forgetting, BWT, FWT) and continual (min-ACC, ...),
        or for test-time adaptation the online error per domain and its mean."""
        if self.ctx.stream.protocol == "tta":
            errors = [1 - self.online[k] for k in sorted(self.online)]
            return {"online_error": errors, "mean_error": sum(errors) / len(errors) if errors else None,
                    "domains": [self.ctx.stream.info.get("domains", {}).get(k, str(k)) for k in sorted(self.online)]}
        if self.online_metrics is not None:
            return {**self.matrix.summary(), **self._tracker_summary_by_experience(),
                    **self.online_metrics.summary(), "eval_period": self.cfg.every_samples,
                    "eval_period_unit": "samples", "eval_subset_size": self.cfg.subset_size,
                    "eval_subset_sizes": self.subset_sizes,
                    "eval_tasks": list(self.eval_tasks)}
        return {**self.matrix.summary(), **self.tracker.summary(), "eval_period": self.cfg.every,
                "eval_subset_size": self.cfg.subset_size, "eval_subset_sizes": self.subset_sizes}

    def _tracker_summary_by_experience(self) -> dict[str, Any]:
        """The tracker's summary with its task numbers mapped back to experience indices."""
        out = self.tracker.summary()
        to_exp = self.eval_tasks
        out["per_task_min"] = {to_exp[r]: v for r, v in out["per_task_min"].items()}
        for gap in out["stability_gaps"]:
            gap["experience"] = to_exp[gap["experience"]]
            gap["per_task"] = {to_exp[r]: v for r, v in gap["per_task"].items()}
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {"matrix": self.matrix.state_dict(), "tracker": self.tracker.state_dict(),
                 "online": sorted(self.online.items())}
        if self.online_metrics is not None:
            state["online_metrics"] = self.online_metrics.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.matrix.load_state_dict(state["matrix"])
        self.tracker.load_state_dict(state["tracker"])
        self.online = dict(state.get("online", []))
        if self.online_metrics is not None and "online_metrics" in state:
            self.online_metrics.load_state_dict(state["online_metrics"])


class _Pending:
    """An overlapped evaluation in flight: its per-experience accuracies (on a GPU: a pinned host
    tensor filled by the side stream), the event recorded after them on the side stream, and the
    snapshot and mask it reads."""

    def __init__(self, iteration: int, accs: torch.Tensor, done, snapshot: WeightSnapshot, mask: torch.Tensor):
        self.iteration, self.accs, self.done = iteration, accs, done
        self.snapshot, self.mask = snapshot, mask

    def ready(self) -> bool:
        return self.done is None or self.done.query()


OVERLAP_DEPTH = 2  # snapshots in flight with eval.overlap (evaluation t runs while t+1 trains)


def fwt_undefined(protocol: str, online: bool = False) -> str | None:
    """Why forward transfer (Lopez-Paz & Ranzato 2017) cannot be measured under ``protocol``,
    or None where it can.  FWT compares R[i-1][i], the accuracy on task i before training on
    it, with b_i, the untrained model's; in class-IL (and under the online protocol's
    exposed-class masking) the logits of task i's classes are masked until it is trained, so
    both are 0 and FWT would be 0.0 whatever the strategy."""
    if online:
        return ("online protocol: logits of classes not yet exposed are masked, so the accuracy on a "
                "task before it is trained measures the masking, not transfer")
    if protocol == "class":
        return ("class-IL: logits of classes not yet seen are masked, so R[i-1][i] = b_i = 0 for every "
                "task and FWT would be 0 by construction")
    return None


def check_compile_mode(key: str, mode: str) -> None:
    """An error naming the valid ``torch.compile`` modes for config key ``key``."""
    if mode not in COMPILE_MODES:
        from clbench.registry import ClbenchError

        raise ClbenchError(f"{key} '{mode}' is not one of {', '.join(COMPILE_MODES)}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on a GPU (where it roughly doubles inference throughput), fp32 on a
    CPU (where bf16 matmuls are usually slower).  Accuracies under bf16 agree with fp32 up to the
    few samples whose top-2 logits are within bf16 rounding (tests/test_evaluation_precision.py)."""
    if precision not in PRECISIONS:
        from clbench.registry import ClbenchError

        raise ClbenchError(f"eval.precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision
