"""The one evaluator: periodic evaluation on fixed device-resident subsets, full test sets at
experience ends, and the continual metrics (:mod:`clbench.metrics`) computed from both.

Periodic evaluation (every ``eval.every`` iterations) runs on a fixed, seeded subset of each
seen task's test data (De Lange et al. 2023), gathered once and held on the device as one
uint8 tensor (normalised batch by batch: the floats of every subset may not fit), in large
batches under ``torch.inference_mode``; per-task accuracies are reduced on
the device and read back with a single transfer.  It asks the strategy only for ``predict``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from clbench.metrics import AccuracyMatrix, ContinualTracker

if TYPE_CHECKING:
    from clbench.config import EvalConfig
    from clbench.strategy import Context, Strategy


class Evaluator:
    """Accuracies of a strategy on the stream's tasks, and the metric trackers fed by them."""

    def __init__(self, strategy: "Strategy", ctx: "Context", cfg: "EvalConfig"):
        self.strategy = strategy
        self.ctx = ctx
        self.cfg = cfg
        stream = ctx.stream
        self.matrix = AccuracyMatrix(len(stream))
        self.tracker = ContinualTracker(windows=tuple(cfg.windows), recovery_tol=cfg.recovery_tol)
        self.task_given = stream.protocol == "task"
        self.batch_size = cfg.batch_size or (256 if ctx.device.type == "cpu" else 2048)
        self.online: dict[int, float] = {}
        xs, ys, exps = [], [], []
        for exp in stream:
            idx = exp.eval_subset(cfg.subset_size, ctx.seed)
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

    # ---------------------------------------------------------------- accuracies
    def subset_accuracies(self, n_seen: int) -> dict[int, float]:
        """Accuracy on the eval subsets of experiences ``0..n_seen-1`` (one host transfer)."""
        end = self.ends[n_seen]
        correct = self._correct(self.x[:end], self.y[:end], self.task[:end])
        counts = torch.bincount(self.exp[:end], minlength=n_seen)[:n_seen]
        hits = torch.bincount(self.exp[:end], weights=correct.float(), minlength=n_seen)[:n_seen]
        accs = (hits / counts.clamp_min(1)).tolist()
        return dict(enumerate(accs))

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

    def _correct(self, x_uint8: torch.Tensor, y: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        mask = self.ctx.class_mask
        model: nn.Module = self.strategy.model
        was_training = model.training
        model.eval()
        try:
            out = []
            with torch.inference_mode():
                bs = self.batch_size
                for s in range(0, y.numel(), bs):
                    xb = self.ctx.inputs(x_uint8[s:s + bs])
                    tb = task[s:s + bs]
                    scores = self.strategy.predict(xb, tb if self.task_given else None).float()
                    scores = scores.masked_fill(~mask[tb], float("-inf"))
                    out.append(scores.argmax(1) == y[s:s + bs])
        finally:
            model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=y.device)

    # ---------------------------------------------------------------- metrics
    def periodic(self, iteration: int, n_seen: int) -> dict[str, float]:
        """Evaluate the seen tasks' subsets after ``iteration`` and update the trackers."""
        accs = self.subset_accuracies(n_seen)
        metrics = {f"eval/acc/task_{k}": a for k, a in accs.items()}
        metrics["eval/acc/avg"] = sum(accs.values()) / len(accs)
        metrics.update({f"eval/{k}": v for k, v in self.tracker.update(iteration, accs).items()})
        metrics["eval/period"] = self.cfg.every
        return metrics

    def baseline(self) -> list[float]:
        """Accuracies of the untrained model (FWT's baseline b_i)."""
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
        return {**self.matrix.summary(), **self.tracker.summary(), "eval_period": self.cfg.every,
                "eval_subset_size": self.cfg.subset_size}

    def state_dict(self) -> dict[str, Any]:
        return {"matrix": self.matrix.state_dict(), "tracker": self.tracker.state_dict(),
                "online": sorted(self.online.items())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.matrix.load_state_dict(state["matrix"])
        self.tracker.load_state_dict(state["tracker"])
        self.online = dict(state.get("online", []))
