"""Continual-learning metrics: pure functions over an accuracy matrix and
incremental trackers for per-iteration (continual) evaluation.

Conventions
-----------
* Tasks / experiences are 0-based; accuracies are floats in ``[0, 1]``.
* Iterations are global training-iteration counts (``int``).
* Undefined values are ``None`` (never NaN).

Two families of metrics live here:

1. **Task-end metrics** over the accuracy matrix ``R`` (``R[j][i]`` = accuracy
   on task ``i``'s full test set after training experience ``j``): average
   accuracy, average incremental accuracy, forgetting (Chaudhry et al., ECCV
   2018, "Riemannian Walk for Incremental Learning"), backward and forward
   transfer (Lopez-Paz & Ranzato, NeurIPS 2017, "Gradient Episodic Memory for
   Continual Learning").  See :class:`AccuracyMatrix`.

2. **Continual-evaluation metrics** of De Lange, van de Ven & Tuytelaars
   (ICLR 2023, "Continual evaluation for lifelong learning: identifying the
   stability gap"): min-ACC, WC-ACC, windowed forgetting WF^w and windowed
   plasticity WP^w, computed incrementally from per-iteration evaluations on
   fixed per-task subsets, plus a per-boundary stability-gap report.  See
   :class:`ContinualTracker`.  With an evaluation period ``p`` the minima are
   minima over evaluated iterations only (upper bounds of the true minima):
   log ``p`` with the results.

3. **Online (Si-Blurry) metrics** of Moon et al. (ICCV 2023, "Online Class Incremental
   Learning on Stochastic Blurry Task Boundary via Mask and Visual Prompt Tuning"; code
   ``KHU-AGI/Si-Blurry`` ``methods/_trainer.py``), over evaluations on the test images of
   the classes exposed so far: A_auc (mean of the periodic accuracies, evaluated every
   ``eval.every_samples`` samples), A_last, A_avg and F_last.  See :class:`OnlineTracker`.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

__all__ = [
    "average_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "backward_transfer",
    "forward_transfer",
    "AccuracyMatrix",
    "ContinualTracker",
    "WF_TASKS",
    "last_forgetting",
    "OnlineTracker",
]

Matrix = Sequence[Sequence[float | None]]

# Tolerance of the recovery comparison ``acc >= pre_acc - recovery_tol``, so that
# e.g. 0.85 counts as ">= 0.9 - 0.05" despite binary floating point.
_EPS = 1e-12


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------
# 1. Task-end metrics over the accuracy matrix
# ---------------------------------------------------------------------------


def _last_row(R: Matrix) -> int | None:
    """Index of the last row of ``R`` holding at least one accuracy (None if none)."""
    for j in range(len(R) - 1, -1, -1):
        row = R[j]
        if row is not None and any(a is not None for a in row):
            return j
    return None


def _entry(R: Matrix, j: int, i: int) -> float | None:
    row = R[j] if j < len(R) else None
    if row is None or i >= len(row):
        return None
    return row[i]


def average_accuracy(R: Matrix, j: int) -> float:
    """Average accuracy after experience ``j``.

    ACC_j = (1 / (j+1)) * sum_{i <= j} R[j][i]

    ``None`` entries are skipped; raises ``ValueError`` if row ``j`` holds no
    accuracy on a seen task.
    """
    values = [a for i in range(j + 1) if (a := _entry(R, j, i)) is not None]
    if not values:
        raise ValueError(f"row {j} of the accuracy matrix holds no accuracy on a seen task")
    return sum(values) / len(values)


def average_incremental_accuracy(R: Matrix) -> float:
    """Average incremental accuracy (Rebuffi et al., CVPR 2017, iCaRL).

    AIA = (1 / (J+1)) * sum_{j=0..J} ACC_j, with J the last filled row of ``R``
    and ACC_j = :func:`average_accuracy`; the first state (j = 0) is included.
    Rows without any seen-task accuracy are skipped.
    """
    last = _last_row(R)
    if last is None:
        raise ValueError("the accuracy matrix is empty")
    accs = []
    for j in range(last + 1):
        try:
            accs.append(average_accuracy(R, j))
        except ValueError:
            continue
    return sum(accs) / len(accs)


def forgetting(R: Matrix) -> tuple[float | None, list[float | None]]:
    """Average forgetting (Chaudhry et al., ECCV 2018).

    With T-1 the last filled row of ``R`` (so partially filled matrices work):

        f_i = max_{i <= l < T-1} R[l][i] - R[T-1][i]      for i < T-1
        F   = (1 / (T-1)) * sum_{i < T-1} f_i

    Returns ``(F, [f_0, ..., f_{T-2}])``.  An f_i whose entries are missing is
    ``None`` and left out of the mean; ``F`` is ``None`` if T == 1 (no previous
    task) or no f_i is defined.
    """
    last = _last_row(R)
    if last is None or last == 0:
        return None, []
    per_task: list[float | None] = []
    for i in range(last):
        final = _entry(R, last, i)
        past = [a for l in range(i, last) if (a := _entry(R, l, i)) is not None]
        per_task.append(max(past) - final if (final is not None and past) else None)
    return _mean([f for f in per_task if f is not None]), per_task


def backward_transfer(R: Matrix) -> float | None:
    """Backward transfer (Lopez-Paz & Ranzato, NeurIPS 2017).

        BWT = (1 / (T-1)) * sum_{i < T-1} (R[T-1][i] - R[i][i])

    with T-1 the last filled row of ``R``.  Terms with a missing entry are left
    out; ``None`` if T == 1 or no term is defined.
    """
    last = _last_row(R)
    if last is None or last == 0:
        return None
    terms = []
    for i in range(last):
        final, diag = _entry(R, last, i), _entry(R, i, i)
        if final is not None and diag is not None:
            terms.append(final - diag)
    return _mean(terms)


def forward_transfer(R: Matrix, baseline: Sequence[float | None] | None) -> float | None:
    """Forward transfer (Lopez-Paz & Ranzato, NeurIPS 2017).

        FWT = (1 / (T-1)) * sum_{i = 1..T-1} (R[i-1][i] - b_i)

    with ``b_i = baseline[i]`` the accuracy of the untrained, randomly
    initialised model on task i, and T-1 the last filled row of ``R``.
    ``None`` if T == 1, the baseline is missing, or any required entry
    (R[i-1][i] or b_i) is missing -- e.g. when unseen tasks are not evaluated.
    In class-IL the logits of unseen classes are masked, so R[i-1][i] = b_i = 0 and
    FWT is 0 by construction: :class:`AccuracyMatrix` then reports it undefined.
    """
    last = _last_row(R)
    if last is None or last == 0 or baseline is None:
        return None
    terms = []
    for i in range(1, last + 1):
        acc = _entry(R, i - 1, i)
        base = baseline[i] if i < len(baseline) else None
        if acc is None or base is None:
            return None
        terms.append(acc - base)
    return _mean(terms)


class AccuracyMatrix:
    """The T x T task-end accuracy matrix and its summary metrics.

    ``matrix[j][i]`` is the accuracy on task i's full test set after training
    experience j (``None`` where not evaluated).
    """

    def __init__(self, n_tasks: int, fwt_undefined: str | None = None) -> None:
        """``fwt_undefined``: why FWT cannot be measured in this setting (e.g. class-IL, where
        unseen classes are masked); FWT is then ``None`` with this reason as ``fwt_note``."""
        if n_tasks < 1:
            raise ValueError("n_tasks must be >= 1")
        self.n_tasks = n_tasks
        self.matrix: list[list[float | None]] = [[None] * n_tasks for _ in range(n_tasks)]
        self.baseline: list[float | None] | None = None
        self.fwt_undefined = fwt_undefined

    def _row(self, accs: Sequence[float | None]) -> list[float | None]:
        if len(accs) != self.n_tasks:
            raise ValueError(f"expected {self.n_tasks} accuracies, got {len(accs)}")
        return [None if a is None else float(a) for a in accs]

    def set_baseline(self, accs: Sequence[float]) -> None:
        """Accuracies of the untrained, randomly initialised model on each task (for FWT)."""
        self.baseline = self._row(accs)

    def update(self, experience: int, accs: Sequence[float | None]) -> None:
        """Store the accuracies on all tasks after training ``experience``."""
        if not 0 <= experience < self.n_tasks:
            raise IndexError(f"experience {experience} out of range [0, {self.n_tasks})")
        self.matrix[experience] = self._row(accs)

    def summary(self) -> dict[str, float | list | str | None]:
        """``acc``, ``avg_inc_acc``, ``forgetting``, ``forgetting_per_task``, ``bwt``, ``fwt``,
        ``fwt_note``, ``baseline_acc`` and ``matrix``.

        Computed up to the last filled row; values are ``None`` where undefined.  ``fwt_note``
        says why FWT is ``None`` when it cannot be measured (no baseline, or the setting given
        to the constructor); ``baseline_acc`` (the b_i) and ``matrix`` recompute FWT by hand.
        """
        last = _last_row(self.matrix)
        acc = avg_inc = None
        if last is not None:
            try:
                acc = average_accuracy(self.matrix, last)
            except ValueError:
                acc = None
            avg_inc = average_incremental_accuracy(self.matrix)
        forg, forg_per_task = forgetting(self.matrix)
        fwt, fwt_note = None, self.fwt_undefined
        if fwt_note is None and self.baseline is None:
            fwt_note = "no baseline: the untrained model was not evaluated (eval.baseline=false)"
        elif fwt_note is None:
            fwt = forward_transfer(self.matrix, self.baseline)
        return {
            "acc": acc,
            "avg_inc_acc": avg_inc,
            "forgetting": forg,
            "forgetting_per_task": forg_per_task,
            "bwt": backward_transfer(self.matrix),
            "fwt": fwt,
            "fwt_note": fwt_note,
            "baseline_acc": None if self.baseline is None else list(self.baseline),
            "matrix": [list(row) for row in self.matrix],
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {
            "n_tasks": self.n_tasks,
            "matrix": [list(row) for row in self.matrix],
            "baseline": None if self.baseline is None else list(self.baseline),
            "fwt_undefined": self.fwt_undefined,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.n_tasks = int(d["n_tasks"])
        self.matrix = [list(row) for row in d["matrix"]]
        self.baseline = None if d.get("baseline") is None else list(d["baseline"])
        self.fwt_undefined = d.get("fwt_undefined", self.fwt_undefined)


# ---------------------------------------------------------------------------
# 2. Continual evaluation (De Lange, van de Ven & Tuytelaars, ICLR 2023)
# ---------------------------------------------------------------------------


class _Curve:
    """Running statistics of one accuracy curve around one experience boundary b.

    ``pre`` is the last value at or before b; ``min``/``min_iter`` the (first) minimum
    within the gap window b < n <= b + window; ``rec_iter`` the first iteration after
    that minimum (within the experience) whose value is >= pre - tol.
    """

    __slots__ = ("pre", "min", "min_iter", "rec_iter")

    def __init__(self, pre: float | None = None) -> None:
        self.pre = pre
        self.min: float | None = None
        self.min_iter: int | None = None
        self.rec_iter: int | None = None

    def observe(self, iteration: int, acc: float, tol: float, in_window: bool) -> None:
        if in_window and (self.min is None or acc < self.min):
            self.min, self.min_iter, self.rec_iter = acc, iteration, None
        elif (self.rec_iter is None and self.min is not None and self.pre is not None
              and acc >= self.pre - tol - _EPS):
            self.rec_iter = iteration

    def report(self, boundary: int, tol: float) -> dict[str, Any]:
        """Gap statistics; a gap exists iff ``pre - min > tol`` (see
        :meth:`ContinualTracker.stability_gaps`)."""
        drop = self.pre - self.min if (self.pre is not None and self.min is not None) else None
        has_gap = None if drop is None else drop > tol + _EPS
        return {
            "pre_acc": self.pre,
            "min_acc": self.min,
            "drop": drop,
            "has_gap": has_gap,
            "gap": drop if has_gap else None,
            "iters_to_min": self.min_iter - boundary if has_gap else None,
            "recovery_iters": self.rec_iter - boundary if (has_gap and self.rec_iter is not None) else None,
        }

    def to_list(self) -> list:
        return [self.pre, self.min, self.min_iter, self.rec_iter]

    @classmethod
    def from_list(cls, values: Sequence) -> "_Curve":
        curve = cls(values[0])
        curve.min, curve.min_iter, curve.rec_iter = values[1], values[2], values[3]
        return curve


class _Boundary:
    """Stability-gap statistics of one experience boundary k >= 1 (previous tasks i < k)."""

    def __init__(self, experience: int, iteration: int) -> None:
        self.experience = experience
        self.iteration = iteration
        self.mean = _Curve()  # mean accuracy over tasks i < k
        self.tasks: dict[int, _Curve] = {i: _Curve() for i in range(experience)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "experience": self.experience,
            "iteration": self.iteration,
            "mean": self.mean.to_list(),
            "tasks": [[i, c.to_list()] for i, c in self.tasks.items()],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "_Boundary":
        b = cls(int(d["experience"]), int(d["iteration"]))
        b.mean = _Curve.from_list(d["mean"])
        b.tasks = {int(i): _Curve.from_list(c) for i, c in d["tasks"]}
        return b


WF_TASKS = ("previous", "seen")


class ContinualTracker:
    """Incremental continual-evaluation metrics (De Lange et al., ICLR 2023).

    Feed it the accuracy of every seen task on its fixed evaluation subset
    after training iterations (:meth:`update`) and mark experience boundaries
    (:meth:`start_experience`).  With A(i, n) the accuracy on task i after
    iteration n, |T_i| the last iteration of experience i, current task k and
    current iteration t:

    * **min-ACC_{T_k}** = (1/k) * sum_{i<k} min_{|T_i| < n <= t} A(i, n)
      -- mean over previous tasks of the running minimum since the end of their
      training.
    * **WC-ACC_t** = (1/(k+1)) * A(k, t) + (1 - 1/(k+1)) * min-ACC_{T_k}
      (worst-case accuracy; = A(0, t) when k = 0).
    * **WF^w_i** (windowed forgetting) = max over the run of
      max_{m < n, n - m < w} A(i, m) - A(i, n), where m, n are *iterations* at which
      task i was evaluated (from its first evaluation, including those during its
      own training): ``w`` is a number of training iterations, not of evaluations.
      With evaluation period p only pairs of evaluated iterations count, so a
      window needs p < w; windows with w <= p (or p = 0) are not computed (None).
      At p = 1 this is the authors' code (``Mattdl/ContinualEvaluation``,
      ``WindowedForgettingPluginMetric``), whose window holds the last w evaluations.
    * **WP^w_i** (windowed plasticity) = the same with A(i, n) - A(i, m).
    * ``wf{w}`` averages WF^w_i over the previous tasks i < k with
      ``wf_tasks="previous"`` (default), or over every evaluated task i <= k, the
      one in training included, with ``wf_tasks="seen"`` -- what the authors' code
      logs (``TaskAveragingPluginMetric`` over all tracked tasks), for comparison
      with published values.  ``wp{w}`` averages WP^w_i over all seen tasks i <= k
      (as the authors' code does).

    WF/WP of a task start at 0 (a single evaluation has no pair), as in the
    authors' code.  Each update costs O(#seen tasks * max(w) / p); memory is
    O(#tasks * (max(w) / p + #boundaries)).
    """

    def __init__(self, windows: tuple[int, ...] = (10, 100), recovery_tol: float = 0.0,
                 wf_tasks: str = "previous", gap_window: int = 100, period: int | None = None) -> None:
        """``windows``: WF/WP window lengths in iterations; ``recovery_tol``: the stability
        gap's tolerance; ``wf_tasks``: ``previous`` | ``seen`` (see the class docstring);
        ``gap_window``: iterations after a boundary in which a stability gap is looked for;
        ``period``: the evaluation period in iterations (None: unknown or irregular, every
        window is computed)."""
        if any(w < 1 for w in windows):
            raise ValueError("window sizes must be >= 1")
        if wf_tasks not in WF_TASKS:
            raise ValueError(f"wf_tasks must be one of {', '.join(WF_TASKS)}, got {wf_tasks!r}")
        if gap_window < 1:
            raise ValueError("gap_window must be >= 1")
        self.windows = tuple(int(w) for w in windows)
        self.recovery_tol = float(recovery_tol)
        self.wf_tasks = wf_tasks
        self.gap_window = int(gap_window)
        self.period = None if period is None else int(period)
        # windows that can hold two periodic evaluations
        self.active = tuple(w for w in self.windows if self.period is None or 0 < self.period < w)
        self._exp = 0  # current experience k
        self._end_iter: dict[int, int] = {}  # task i -> |T_i| (last iteration of its experience)
        self._min: dict[int, float] = {}  # running min of previous tasks
        self._hist: dict[int, deque[tuple[int, float]]] = {}  # task -> (iteration, acc) within max(w)
        self._wf: dict[int, dict[int, float]] = {w: {} for w in self.windows}
        self._wp: dict[int, dict[int, float]] = {w: {} for w in self.windows}
        self._last: dict[int, tuple[int, float]] = {}  # task -> (iteration, acc) of its last evaluation
        self._last_full: tuple[int, dict[int, float]] | None = None  # last eval covering tasks 0..k
        self._boundaries: list[_Boundary] = []
        self._metrics: dict[str, float] = {}

    # -- training events ---------------------------------------------------

    def start_experience(self, experience: int, iteration: int) -> None:
        """Training of ``experience`` begins after global iteration ``iteration``.

        The next training iteration is ``iteration + 1``; ``iteration`` is thus
        |T_{k-1}|, the last iteration of the previous experience.
        """
        self._exp = experience
        for i in range(experience):
            self._end_iter.setdefault(i, iteration)
        if experience < 1 or any(b.experience == experience for b in self._boundaries):
            return  # nothing to record, or already recorded (e.g. a resumed run re-announcing it)
        b = _Boundary(experience, iteration)
        for i, curve in b.tasks.items():
            if i in self._last and self._last[i][0] <= iteration:
                curve.pre = self._last[i][1]
        if self._last_full is not None and self._last_full[0] <= iteration:
            accs = self._last_full[1]
            if all(i in accs for i in range(experience)):
                b.mean.pre = sum(accs[i] for i in range(experience)) / experience
        self._boundaries.append(b)

    def update(self, iteration: int, accs: dict[int, float]) -> dict[str, float]:
        """Add the accuracies of the seen tasks evaluated after ``iteration``.

        Returns the current ``min_acc``, ``wc_acc``, ``wf{w}`` and ``wp{w}``,
        omitting undefined ones.
        """
        accs = {int(i): float(a) for i, a in accs.items()}
        k = self._exp
        longest = max(self.active, default=0)
        for i, a in accs.items():
            self._last[i] = (iteration, a)
            # min-ACC: only evaluations strictly after the end of task i's training.
            if i < k and i in self._end_iter and iteration > self._end_iter[i]:
                self._min[i] = min(self._min.get(i, a), a)
            # WF^w / WP^w: pairs (m, n = iteration) of evaluations of task i with n - m < w.
            hist = self._hist.setdefault(i, deque())
            while hist and iteration - hist[0][0] >= longest:
                hist.popleft()
            for w in self.active:
                inside = [b for m, b in hist if iteration - m < w]
                self._wf[w][i] = max(self._wf[w].get(i, 0.0), max(inside, default=a) - a)
                self._wp[w][i] = max(self._wp[w].get(i, 0.0), a - min(inside, default=a))
            hist.append((iteration, a))
        if all(i in accs for i in range(k + 1)):
            self._last_full = (iteration, {i: accs[i] for i in range(k + 1)})
        self._update_boundaries(iteration, accs)
        self._metrics = self._compute(accs)
        return dict(self._metrics)

    def _update_boundaries(self, iteration: int, accs: dict[int, float]) -> None:
        # Only the last two boundaries can contain ``iteration`` (iterations increase).
        n = len(self._boundaries)
        for idx in range(max(0, n - 2), n):
            b = self._boundaries[idx]
            k = b.experience
            mean = sum(accs[i] for i in range(k)) / k if all(i in accs for i in range(k)) else None
            if iteration <= b.iteration:  # at (or before) the boundary: refresh pre_acc
                if b.mean.min is None and mean is not None:
                    b.mean.pre = mean
                for i, curve in b.tasks.items():
                    if curve.min is None and i in accs:
                        curve.pre = accs[i]
                continue
            nxt = self._boundaries[idx + 1].iteration if idx + 1 < n else None
            if nxt is not None and iteration > nxt:
                continue  # belongs to a later experience
            in_window = iteration - b.iteration <= self.gap_window
            if mean is not None:
                b.mean.observe(iteration, mean, self.recovery_tol, in_window)
            for i, curve in b.tasks.items():
                if i in accs:
                    curve.observe(iteration, accs[i], self.recovery_tol, in_window)

    def _compute(self, accs: dict[int, float]) -> dict[str, float]:
        k = self._exp
        out: dict[str, float] = {}
        prev_mins = [self._min[i] for i in range(k) if i in self._min]
        min_acc = _mean(prev_mins)
        if min_acc is not None:
            out["min_acc"] = min_acc
        if k in accs:
            if k == 0:
                out["wc_acc"] = accs[0]
            elif min_acc is not None:
                out["wc_acc"] = accs[k] / (k + 1) + (1 - 1 / (k + 1)) * min_acc
        last_wf = k if self.wf_tasks == "seen" else k - 1
        for w in self.active:
            wf = _mean([v for i, v in self._wf[w].items() if i <= last_wf])
            wp = _mean([v for i, v in self._wp[w].items() if i <= k])
            if wf is not None:
                out[f"wf{w}"] = wf
            if wp is not None:
                out[f"wp{w}"] = wp
        return out

    # -- reports -------------------------------------------------------------

    def stability_gaps(self) -> list[dict[str, Any]]:
        """One stability-gap record per experience boundary k >= 1 (b = |T_{k-1}|).

        **Definition.**  With pre = the last evaluation at or before b and
        min = the minimum over the evaluations in the gap window b < n <= b + ``gap_window``
        (iterations), boundary k *has a gap* iff ``pre - min > recovery_tol``: the
        accuracy drops out of the band [pre - tol, ...] soon after the new task starts
        (the stability gap of De Lange et al. 2023).  A rise (min >= pre), a
        drop within the tolerance, or a slow drift that leaves the band only after the
        window has no gap: ``has_gap`` False, ``gap``, ``iters_to_min`` and
        ``recovery_iters`` None.

        Keys: ``experience``, ``iteration`` (b), ``pre_acc``, ``min_acc`` (the window's
        minimum), ``drop`` = pre_acc - min_acc (signed, always given when both are
        known), ``has_gap`` (None when pre_acc or the window's minimum is unknown),
        ``gap`` (= drop when there is a gap), ``iters_to_min`` (iteration of the first
        minimum - b), ``recovery_iters`` (first evaluation after the minimum, within
        experience k, with acc >= pre_acc - recovery_tol, minus b; None if it does
        not recover within experience k) and ``per_task`` ({i: same keys}).
        Top-level values use the mean accuracy over previous tasks i < k
        (evaluations covering all of them only).  The experience in progress is
        reported so far.
        """
        out = []
        for b in self._boundaries:
            rec = {"experience": b.experience, "iteration": b.iteration}
            rec.update(b.mean.report(b.iteration, self.recovery_tol))
            rec["per_task"] = {i: c.report(b.iteration, self.recovery_tol) for i, c in b.tasks.items()}
            out.append(rec)
        return out

    def per_task_min(self) -> dict[int, float]:
        """Running minimum of each previous task since the end of its training."""
        return dict(self._min)

    def summary(self) -> dict[str, Any]:
        """Final ``min_acc``, ``wc_acc``, ``wf{w}``, ``wp{w}`` (None if undefined, or if the
        window is not longer than the evaluation period), ``window_unit``
        (``"iterations"``), ``wf_tasks``, ``gap_window``, ``per_task_min``,
        ``stability_gaps``, ``n_gaps`` (boundaries with a gap) and ``mean_gap`` (mean of
        the top-level gaps of those boundaries, None if none)."""
        out: dict[str, Any] = {"min_acc": self._metrics.get("min_acc"), "wc_acc": self._metrics.get("wc_acc")}
        for w in self.windows:
            out[f"wf{w}"] = self._metrics.get(f"wf{w}")
            out[f"wp{w}"] = self._metrics.get(f"wp{w}")
        out["window_unit"] = "iterations"
        out["wf_tasks"] = self.wf_tasks
        out["gap_window"] = self.gap_window
        gaps = self.stability_gaps()
        out["per_task_min"] = self.per_task_min()
        out["stability_gaps"] = gaps
        out["n_gaps"] = sum(1 for g in gaps if g["has_gap"])
        out["mean_gap"] = _mean([g["gap"] for g in gaps if g["has_gap"]])
        return out

    # -- checkpointing ---------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (int keys as [key, value] pairs, deques as lists)."""

        def pairs(d: dict) -> list:
            return [[k, v] for k, v in d.items()]

        return {
            "windows": list(self.windows),
            "recovery_tol": self.recovery_tol,
            "wf_tasks": self.wf_tasks,
            "gap_window": self.gap_window,
            "period": self.period,
            "experience": self._exp,
            "end_iter": pairs(self._end_iter),
            "min": pairs(self._min),
            "hist": [[i, [list(e) for e in q]] for i, q in self._hist.items()],
            "wf": [[w, pairs(self._wf[w])] for w in self.windows],
            "wp": [[w, pairs(self._wp[w])] for w in self.windows],
            "last": [[i, list(v)] for i, v in self._last.items()],
            "last_full": None if self._last_full is None else [self._last_full[0], pairs(self._last_full[1])],
            "boundaries": [b.to_dict() for b in self._boundaries],
            "metrics": dict(self._metrics),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        def unpairs(p: list, cast=float) -> dict:
            return {int(k): cast(v) for k, v in p}

        self.__init__(tuple(d["windows"]), d["recovery_tol"], d.get("wf_tasks", "previous"),
                      d.get("gap_window", 100), d.get("period"))
        self._exp = int(d["experience"])
        self._end_iter = unpairs(d["end_iter"], int)
        self._min = unpairs(d["min"])
        # (checkpoints written before windows were in iterations have no "hist": windows restart)
        self._hist = {int(i): deque((int(m), float(a)) for m, a in q) for i, q in d.get("hist", [])}
        for w, p in d["wf"]:
            self._wf[int(w)] = unpairs(p)
        for w, p in d["wp"]:
            self._wp[int(w)] = unpairs(p)
        self._last = {int(i): (int(v[0]), float(v[1])) for i, v in d["last"]}
        lf = d["last_full"]
        self._last_full = None if lf is None else (int(lf[0]), unpairs(lf[1]))
        self._boundaries = [_Boundary.from_dict(b) for b in d["boundaries"]]
        self._metrics = dict(d["metrics"])


# ---------------------------------------------------------------------------
# 3. Online continual learning (Moon et al., ICCV 2023, Si-Blurry)
# ---------------------------------------------------------------------------


def last_forgetting(class_accs: Sequence[Sequence[float | None]]) -> float | None:
    """F_last (Moon et al. 2023, as in ``methods/_trainer.py``): with ``class_accs[t][c]`` the
    accuracy on class c's test images at the end of task t (``None``: c not yet exposed),

        F_last = mean over classes c with max_{t < T-1} a_t(c) > 0 of  max_{t < T-1} a_t(c) - a_{T-1}(c).

    Classes never exposed before the last task (and, as in the code, exposed classes whose
    accuracy stayed 0) are left out.  ``None`` with fewer than two task ends or no such class.
    """
    if len(class_accs) < 2:
        return None
    diffs = []
    for c in range(len(class_accs[-1])):
        past = max((row[c] or 0.0) for row in class_accs[:-1])
        if past > 0:
            diffs.append(past - (class_accs[-1][c] or 0.0))
    return _mean(diffs)


class OnlineTracker:
    """A_auc, A_last, A_avg and F_last of an online run (Moon et al., ICCV 2023).

    * :meth:`periodic` adds one accuracy on the test images of the exposed classes, measured
      after ``samples`` training samples; **A_auc** = the mean of these accuracies (the
      code's ``np.mean(eval_results["test_acc"])``: the area under the accuracy-vs-samples
      curve for a fixed evaluation period).
    * :meth:`task_end` adds the accuracy on the exposed classes at the end of a task and the
      per-class accuracies; **A_last** = the last task's, **A_avg** = their mean over tasks
      (tasks that ended with no exposed class are left out), **F_last** =
      :func:`last_forgetting` of the per-class rows.
    """

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.accs: list[float] = []
        self.task_accs: list[float | None] = []
        self.class_accs: list[list[float | None]] = []

    def periodic(self, samples: int, acc: float) -> dict[str, float]:
        """Record one periodic accuracy; returns ``acc/exposed`` and the running ``a_auc``."""
        self.samples.append(int(samples))
        self.accs.append(float(acc))
        return {"acc/exposed": float(acc), "a_auc": sum(self.accs) / len(self.accs)}

    def task_end(self, acc: float | None, class_accs: Sequence[float | None]) -> None:
        self.task_accs.append(None if acc is None else float(acc))
        self.class_accs.append([None if a is None else float(a) for a in class_accs])

    def summary(self) -> dict[str, Any]:
        """``a_auc``, ``a_last``, ``a_avg``, ``f_last`` (None where undefined), the periodic
        curve (``online_samples``, ``online_acc``), ``task_end_acc`` and ``class_acc``."""
        defined = [a for a in self.task_accs if a is not None]
        return {
            "a_auc": _mean(self.accs),
            "a_last": self.task_accs[-1] if self.task_accs else None,
            "a_avg": _mean(defined),
            "f_last": last_forgetting(self.class_accs),
            "online_samples": list(self.samples),
            "online_acc": list(self.accs),
            "task_end_acc": list(self.task_accs),
            "class_acc": [list(r) for r in self.class_accs],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"samples": list(self.samples), "accs": list(self.accs), "task_accs": list(self.task_accs),
                "class_accs": [list(r) for r in self.class_accs]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.samples = [int(s) for s in d["samples"]]
        self.accs = [float(a) for a in d["accs"]]
        self.task_accs = list(d["task_accs"])
        self.class_accs = [list(r) for r in d["class_accs"]]
