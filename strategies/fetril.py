"""FeTrIL: feature translation for exemplar-free class-incremental learning.

Petit, Popescu, Schindler, Picard & Delezoide, "FeTrIL: Feature Translation for
Exemplar-Free Class-Incremental Learning", WACV 2023 (arXiv:2211.13131); official code
``GregoirePetit/FeTrIL`` @ e3b139c (``codes/compute_distances.py``, ``train_classifiers.py``,
``compute_predictions.py``, ``eval.py``).

Algorithm (clbench hooks):

1. Initial state (experience 0, classes ``P_0``): the backbone and a linear head are trained
   with cross-entropy through the engine's ordinary loop (``train.*`` of the run config).
2. Then the model is frozen (``requires_grad=False``, eval mode) and no gradient iterations
   run any more: for experiences k >= 1 ``training_experiences`` returns no data, so the
   engine runs 0 iterations, calls ``after_experience`` and evaluates.  (``strategy.initial_model``: load a saved model and skip the initial
   training too -- e.g. to share one initial model between B100 + 5/10/20-step runs.)
3. After every experience (``after_experience``), with new classes ``P_k``: the features of
   the experience's training images are extracted (no augmentation) and each new class's
   centroid ``mu_n`` is stored.  For every past class ``c`` the *most similar* new class
   ``n* = argmin_{n in P_k} ||mu_c - mu_n||_2`` is chosen and its features are translated
   (the paper's pseudo-feature equation, Sec. 3)::

       f_hat_c = f_{n*} + mu_c - mu_{n*}            for every feature f_{n*} of class n*

   so the pseudo-features of ``c`` have exactly ``c``'s centroid and as many samples as ``n*``.
4. Classifier, retrained from scratch at every state: one-vs-rest linear SVMs
   (``sklearn.svm.LinearSVC``, squared hinge, L2 penalty, primal solver, C=1, tol=1e-4) on
   L2-normalised features -- real features of the new classes plus pseudo-features of all past
   classes.  ``predict`` returns ``w_c . f/||f|| + b_c`` for every class with a classifier and
   -inf for the others.  In the initial state the SVMs are trained on the base classes' real
   features (the official ``compute_distances.py`` treats every class as "current" at state 0,
   so the translation is the identity; ``eval.py`` scores state 0 with those SVMs).
   ``classifier: fc`` is FeTrIL^fc: one linear layer over all seen classes, trained with
   cross-entropy on the same real + pseudo features.  The official repository has no code for
   it, so its recipe is PyCIL's (``models/fetril.py`` + ``exps/fetril.json``): raw (not
   normalised) features, SGD momentum 0.9, lr 0.05, weight decay 5e-4, batch 128, 50 epochs
   with a per-epoch cosine schedule, warm-started from the previous state's layer; in the
   initial state it is the head trained with the backbone.

Memory: the class centroids (float64) and the classifier; features exist only for the
current experience inside ``after_experience`` (as in the official code, which needs the
past classes' centroids only).

Differences from the official code (paper behaviour by default):

* Its ``train_classifiers.py::normalize_train_features`` L2-normalises every 512-sample
  loader batch except the first (``matrix = matrix_mix[0][0]``): the first 512 training rows
  (in class order) reach the SVMs unnormalised.  A bug; clbench normalises every row.
  ``parity_unnormalized_first_512: true`` reproduces it: the rows are stacked in the released
  order of classes (utilsCIL's ``L4FeaturesDataset`` sorts the class folders as strings: 0, 10,
  11, ..., 1, 2, ...; see :func:`official_row_rank`), so the same classes stay unnormalised; the
  order *within* a class (``os.listdir`` of one file per row, file-system dependent) is not
  reproduced, so where the 512-row boundary cuts a class, which of its rows stay unnormalised
  differs.  It also labels each binary problem as the released code does (its '+1'/'-1' labels
  become the strings '+'/'-', so LinearSVC's positive class is "not c"; the weights are negated
  back): the same optimum, but liblinear's stopping point then matches the released one to
  rounding instead of to within its tolerance.  ``tests/test_reference_fetril.py`` checks both
  modes against the released scripts (``tools/reference/fetril.py``).
* It trains one binary ``LinearSVC`` per class in a process pool and writes the weights to
  text files; here the per-class fits run in threads (liblinear releases the GIL) and the
  weights stay tensors.  The problems solved are the same.
* Initial training and features: the released recipe (``codes/scratch.py``) is a LUCIR-style
  ResNet-18 at 224x224 (90 epochs) plus a 290-epoch AugMix/Lookahead fine-tune, features taken
  after Resize 256 + CenterCrop 224.  clbench trains the initial model with the run's
  ``train.*``/``model.*`` settings and extracts features from the un-augmented images (the
  evaluation preprocessing).  The first part of the released recipe is
  ``configs/repro/fetril_tiny_imagenet_official_initial.yaml``: ``model.last_relu: false`` and
  ``model.classifier: lucir`` (LUCIR's ``lucir_models/modified_resnet.py`` with utilsCIL's
  ``CosineLinear``; same outputs as the official module, ``tests/test_reference_fetril.py``),
  ``model.input_size: 224`` with ``train.augment: resized_crop_flip`` (``RandomResizedCrop(224)``
  + flip) and ``model.input_crop: 0.875`` (``Resize(256) + CenterCrop(224)`` for the test images
  and the features), SGD lr 0.1 / momentum 0.9 / wd 1e-4, batch 128, 90 epochs,
  ``train.scheduler: multistep`` at [30, 60] x0.1.  The AugMix/Lookahead fine-tune (a torchvision
  ResNet-18 whose last ReLU is back) is not reproduced; the paper text does not describe it.
  ``configs/fetril_tiny_imagenet.yaml`` is the cheaper 64 px recipe (a different initial model,
  so the numbers shift).
* ``svm_solver: torch`` (not the default) solves liblinear's exact primal problem for all
  classes at once on the device (Newton-CG, float64; see :func:`fit_linear_svms_torch`):
  the same optimum, reached within the same relative-gradient tolerance, so scores differ
  from liblinear's only at the ~1e-3 level at ``tol=1e-4``.  It turns the CPU-bound fits
  (up to 200 classes x ~100k samples per Tiny-ImageNet state) into seconds on a GPU.
* PyCIL picks ``n*`` by cosine similarity of the centroids; the paper and the official code
  (here) use the Euclidean distance.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clbench.registry import ClbenchError, register_strategy
from clbench.safe_load import torch_load
from clbench.strategy import Context, Strategy, StrategyConfig, experience_features
from clbench.scenarios.base import Experience, seeded_generator
from clbench.validation import bounded, choice, path, require

CLASSIFIERS = ("svm", "fc")
SVM_SOLVERS = ("liblinear", "torch")


@dataclass
class FeTrILConfig(StrategyConfig):
    name: str = "fetril"
    classifier: str = choice("svm", "svm", "fc")  # svm: one-vs-rest LinearSVC (FeTrIL) | fc: a linear layer (FeTrIL^fc)
    svm_c: float = bounded(1.0, gt=0)  # LinearSVC C (official config 'regul')
    svm_tol: float = bounded(1e-4, gt=0)  # LinearSVC tol (official config 'toler')
    svm_max_iter: int = bounded(1000, ge=1)  # liblinear iterations (sklearn default; the official code keeps it)
    normalize: bool = True  # L2-normalise features for the SVMs, training and test (paper, official code)
    svm_solver: str = choice("liblinear", "liblinear", "torch")  # liblinear: sklearn LinearSVC, as released | torch: the same objective on the device
    fc_epochs: int = bounded(50, ge=0)  # FeTrIL^fc (PyCIL exps/fetril.json: epochs 50)
    fc_lr: float = bounded(0.05, gt=0)  # PyCIL: lr 0.05, per-epoch cosine annealing to 0
    fc_momentum: float = bounded(0.9, ge=0, le=1)  # PyCIL: SGD momentum 0.9
    fc_weight_decay: float = bounded(5e-4, ge=0)  # PyCIL: weight_decay 5e-4
    fc_batch_size: int = bounded(128, ge=1)  # PyCIL: batch_size 128
    fc_normalize: bool = False  # PyCIL trains and applies the fc layer on raw features
    feature_batch_size: int = bounded(256, ge=1)  # images per forward pass when extracting features
    n_jobs: int = bounded(-1, ge=-1)  # threads for the per-class SVM fits (-1: all cores; results do not depend on it)
    initial_model: Optional[str] = path(None)  # a model state_dict (.pt) to use as the initial model: experience 0 is not trained
    parity_unnormalized_first_512: bool = False  # released-code parity: the first 512 SVM rows (official class order) stay unnormalised, SVMs labelled as released

    def validate(self) -> None:
        require(self.n_jobs != 0, "strategy.n_jobs must be -1 (all cores) or >= 1, got 0")


@register_strategy("fetril", config=FeTrILConfig,
                   description="FeTrIL: frozen initial model, translated pseudo-features, linear SVMs (exemplar-free)")
class FeTrIL(Strategy):
    """Frozen feature extractor after the initial state; per-state classifiers trained on real
    features of the new classes and translated pseudo-features of the past ones."""

    cfg: FeTrILConfig

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        cfg = self.cfg
        if cfg.classifier not in CLASSIFIERS:
            raise ClbenchError(f"strategy.classifier must be one of {', '.join(CLASSIFIERS)}, got '{cfg.classifier}'")
        if cfg.svm_solver not in SVM_SOLVERS:
            raise ClbenchError(f"strategy.svm_solver must be one of {', '.join(SVM_SOLVERS)}, got '{cfg.svm_solver}'")
        if not hasattr(model, "features") or not hasattr(model, "feature_dim"):
            raise ClbenchError("FeTrIL needs a clbench Classifier model (model.features(x) and model.feature_dim)")
        if cfg.classifier == "fc" and not cfg.fc_normalize and getattr(model.head, "bias", None) is None:
            raise ClbenchError("FeTrIL^fc (strategy.classifier=fc) starts from the model's linear head after the initial "
                               "state; use model.classifier=linear (or strategy.fc_normalize=true, which fits its own layer)")
        if ctx.stream.protocol not in ("class", "task"):
            raise ClbenchError(f"FeTrIL is a class-incremental method; the stream's protocol is '{ctx.stream.protocol}'")
        n_classes, dim, device = ctx.stream.num_classes, model.feature_dim, ctx.device
        self.means = torch.zeros(n_classes, dim, dtype=torch.float64, device=device)  # class centroids
        self.seen = torch.zeros(n_classes, dtype=torch.bool, device=device)  # classes with a centroid
        self.weight = torch.zeros(n_classes, dim, device=device)  # SVM w_c (rows of classes without one: 0)
        self.bias = torch.zeros(n_classes, device=device)
        self.trained = torch.zeros(n_classes, dtype=torch.bool, device=device)  # classes the classifier covers
        self.fc = nn.Linear(dim, n_classes).to(device) if cfg.classifier == "fc" else None
        self.frozen = False
        self.stats: list[dict[str, Any]] = []  # per state: sample counts, chosen n*, fit time (not checkpointed)
        self.pretrained = cfg.initial_model is not None
        if self.pretrained:
            state = torch_load(cfg.initial_model, "strategy.initial_model")  # weights_only=True: no code runs
            state = state.get("model", state) if isinstance(state, dict) else state
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                raise ClbenchError(f"strategy.initial_model={cfg.initial_model} does not fit the model: {err}") from None

    # ------------------------------------------------------------------ engine hooks
    def training_experiences(self, exp: Experience, ctx: Context) -> list[Experience]:
        if exp.index == 0 and not self.pretrained:
            return [exp]
        return []  # no gradient iterations: the engine goes straight to after_experience



    def before_experience(self, exp: Experience, ctx: Context) -> None:
        if exp.index > 0 or self.pretrained:
            self._freeze()

    def after_experience(self, exp: Experience, ctx: Context) -> None:
        self._freeze()
        start = time.perf_counter()
        feats, labels = experience_features(self.model, exp, ctx, self.cfg.feature_batch_size)
        new = exp.classes.to(ctx.device).sort().values
        new_means = class_means(feats, labels, new)
        past = (self.seen & ~torch.isin(torch.arange(self.seen.numel(), device=ctx.device), new)).nonzero().flatten()
        self.means[new] = new_means
        self.seen[new] = True
        pseudo, pseudo_y, nearest = translate(feats, labels, new, new_means, past, self.means[past])
        x = torch.cat([feats.double(), pseudo])
        y = torch.cat([labels, pseudo_y])
        key = official_row_rank(self.seen.numel(), y.device)[y] if self.cfg.parity_unnormalized_first_512 else y
        order = torch.sort(key, stable=True).indices  # rows grouped by class (parity: in the official file-list order)
        x, y = x[order], y[order]
        classes = self.seen.nonzero().flatten()
        fit_start = time.perf_counter()
        if self.cfg.classifier == "svm":
            self._fit_svms(x, y, classes)
        else:
            self._fit_fc(x, y, classes, exp.index, ctx)
        self.trained = self.seen.clone()
        self.stats.append({"experience": exp.index, "n_real": int(labels.numel()), "n_pseudo": int(pseudo_y.numel()),
                           "nearest": dict(zip(past.tolist(), new[nearest].tolist())),
                           "fit_s": time.perf_counter() - fit_start, "total_s": time.perf_counter() - start})

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        if not bool(self.trained.any()):  # during the initial training: the model's own head
            return self.model(x)
        feats = self.model.features(x).float()
        if self.cfg.classifier == "svm":
            if self.cfg.normalize:
                feats = F.normalize(feats, dim=1)
            scores = feats @ self.weight.T + self.bias
        else:
            scores = self.fc(F.normalize(feats, dim=1) if self.cfg.fc_normalize else feats)
        return scores.masked_fill(~self.trained, float("-inf"))

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means.cpu(), "seen": self.seen.cpu(), "weight": self.weight.cpu(),
                "bias": self.bias.cpu(), "trained": self.trained.cpu(), "frozen": self.frozen,
                "fc": {k: v.cpu() for k, v in self.fc.state_dict().items()} if self.fc is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("means", "seen", "weight", "bias", "trained"):
            getattr(self, key).copy_(state[key])
        if self.fc is not None and state.get("fc") is not None:
            self.fc.load_state_dict(state["fc"])
        if state.get("frozen"):
            self._freeze()

    # ------------------------------------------------------------------ internals
    def _freeze(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        self.frozen = True

    def _fit_svms(self, x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor) -> None:
        cfg = self.cfg
        if cfg.normalize:
            skip = 512 if cfg.parity_unnormalized_first_512 else 0
            x = torch.cat([x[:skip], F.normalize(x[skip:], dim=1)])
        if cfg.svm_solver == "torch":
            weight, bias = fit_linear_svms_torch(x, y, classes, c=cfg.svm_c, tol=cfg.svm_tol, max_iter=cfg.svm_max_iter)
        else:
            w, b = fit_linear_svms(x.cpu().numpy(), y.cpu().numpy(), classes.cpu().numpy(), c=cfg.svm_c,
                                   tol=cfg.svm_tol, max_iter=cfg.svm_max_iter, n_jobs=cfg.n_jobs,
                                   rest_positive=cfg.parity_unnormalized_first_512)
            weight, bias = torch.from_numpy(w), torch.from_numpy(b)
        self.weight.zero_()
        self.bias.zero_()
        self.weight[classes] = weight.to(self.weight)
        self.bias[classes] = bias.to(self.bias)

    def _fit_fc(self, x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor, k: int, ctx: Context) -> None:
        """FeTrIL^fc: cross-entropy over the seen classes, SGD with a per-epoch cosine schedule,
        warm-started from the previous state's layer (PyCIL); in the initial state the layer is
        the head trained with the backbone (unless ``fc_normalize``, then it is fitted here too)."""
        cfg, fc = self.cfg, self.fc
        if k == 0 and not cfg.fc_normalize:
            fc.load_state_dict(self.model.head.state_dict())
            return
        x = F.normalize(x, dim=1).float() if cfg.fc_normalize else x.float()
        allowed = torch.zeros_like(self.seen)
        allowed[classes] = True
        opt = torch.optim.SGD(fc.parameters(), lr=cfg.fc_lr, momentum=cfg.fc_momentum, weight_decay=cfg.fc_weight_decay)
        n = y.numel()
        with torch.enable_grad():
            for epoch in ctx.progress(range(cfg.fc_epochs), total=cfg.fc_epochs, description="FeTrIL classifier epochs"):
                for group in opt.param_groups:  # CosineAnnealingLR(T_max=fc_epochs), stepped per epoch
                    group["lr"] = cfg.fc_lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.fc_epochs))
                perm = torch.randperm(n, generator=seeded_generator(ctx.seed, 104, k, epoch)).to(x.device)
                for s in range(0, n, cfg.fc_batch_size):
                    idx = perm[s:s + cfg.fc_batch_size]
                    logits = fc(x[idx]).masked_fill(~allowed, float("-inf"))
                    loss = F.cross_entropy(logits, y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()


# ---------------------------------------------------------------------- the method's pieces
def class_means(feats: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Float64 centroids ``[len(classes), D]`` of the features of each class in ``classes``."""
    n_classes = int(max(int(classes.max()), int(labels.max())) + 1)
    sums = torch.zeros(n_classes, feats.shape[1], dtype=torch.float64, device=feats.device)
    sums.index_add_(0, labels, feats.double())
    counts = torch.bincount(labels, minlength=n_classes)[classes]
    if bool((counts == 0).any()):
        raise ClbenchError(f"FeTrIL: classes {classes[counts == 0].tolist()} have no training samples")
    return sums[classes] / counts.unsqueeze(1)


def official_row_rank(n_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rank of each class in the order the official ``train_classifiers.py`` stacks the SVM training rows:
    utilsCIL's ``L4FeaturesDataset`` lists the folders ``'<c>_decomposed'`` through ``np.sort``, i.e. as
    strings (0, 10, 11, ..., 19, 1, 2, 20, ... for 21+ classes), which decides which classes fall in the
    unnormalised first 512 rows."""
    names = sorted(range(n_classes), key=lambda c: f"{c}_decomposed")
    rank = torch.empty(n_classes, dtype=torch.long)
    rank[torch.tensor(names, dtype=torch.long)] = torch.arange(n_classes)
    return rank.to(device)


def nearest_new_class(past_means: torch.Tensor, new_means: torch.Tensor) -> torch.Tensor:
    """For each past centroid, the position (in ``new_means``) of the closest new centroid
    (Euclidean; first on ties, like ``np.argmin`` in the official code)."""
    dist = (past_means.unsqueeze(1) - new_means.unsqueeze(0)).pow(2).sum(-1)
    return dist.argmin(1)


def translate(feats: torch.Tensor, labels: torch.Tensor, new_classes: torch.Tensor, new_means: torch.Tensor,
              past_classes: torch.Tensor, past_means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pseudo-features of the past classes (paper Eq. 1): for each past class c, every feature of
    its nearest new class n* translated by ``mu_c - mu_{n*}``.  ``new_classes`` must be sorted
    and ``labels`` (of ``feats``) among them.

    Returns ``(pseudo [M, D] float64, their labels [M], nearest [P])`` where ``nearest[i]`` is the
    position in ``new_classes`` of the class chosen for ``past_classes[i]``.
    """
    device = feats.device
    if past_classes.numel() == 0:
        return (torch.zeros(0, feats.shape[1], dtype=torch.float64, device=device),
                torch.zeros(0, dtype=labels.dtype, device=device), torch.zeros(0, dtype=torch.long, device=device))
    nearest = nearest_new_class(past_means, new_means)  # [P] positions in new_classes
    slot = torch.searchsorted(new_classes, labels)  # position of each sample's class in new_classes (sorted)
    order = torch.sort(slot, stable=True).indices  # samples grouped by new class, dataset order within
    counts = torch.bincount(slot, minlength=new_classes.numel())
    starts = counts.cumsum(0) - counts
    per_past = counts[nearest]  # samples each past class gets
    owner = torch.repeat_interleave(torch.arange(past_classes.numel(), device=device), per_past)
    offset = torch.arange(owner.numel(), device=device) - (per_past.cumsum(0) - per_past)[owner]
    rows = order[starts[nearest[owner]] + offset]
    pseudo = feats[rows].double() - new_means[nearest[owner]] + past_means[owner]
    return pseudo, past_classes[owner].to(labels.dtype), nearest


def fit_linear_svms(x: np.ndarray, y: np.ndarray, classes: np.ndarray, c: float = 1.0, tol: float = 1e-4,
                    max_iter: int = 1000, n_jobs: int = -1, rest_positive: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest ``LinearSVC`` per class (the official code's settings): returns ``W [K, D]``
    and ``b [K]`` for ``classes`` (positive side = the class).

    ``rest_positive``: label the problem as the released ``train_classifiers.py`` does -- its labels
    '+1'/'-1' are truncated to the one-character strings '+'/'-', so LinearSVC's positive class is '-'
    ("not the class") -- and return the negated solution.  The optimum is the same; liblinear's
    iterates are not sign-symmetric, so this reproduces the released weights to rounding, where the
    default encoding agrees only to within the solver tolerance (~1e-3 on unnormalised rows)."""
    from joblib import Parallel, delayed
    from sklearn.svm import LinearSVC

    x = np.ascontiguousarray(x, dtype=np.float64)
    if len(classes) == 1:  # nothing to separate: a constant score
        return np.zeros((1, x.shape[1])), np.zeros(1)

    def fit(cls: int) -> tuple[np.ndarray, float]:
        svm = LinearSVC(penalty="l2", loss="squared_hinge", dual=False, C=c, tol=tol, fit_intercept=True,
                        intercept_scaling=1, max_iter=max_iter)
        if rest_positive:
            svm.fit(x, (y != cls).astype(np.int64))
            return -svm.coef_[0], -float(svm.intercept_[0])
        svm.fit(x, (y == cls).astype(np.int64))
        return svm.coef_[0], float(svm.intercept_[0])

    fits = Parallel(n_jobs=n_jobs, prefer="threads")(delayed(fit)(int(cls)) for cls in classes)
    return np.stack([w for w, _ in fits]), np.array([b for _, b in fits])


def fit_linear_svms_torch(x: torch.Tensor, y: torch.Tensor, classes: torch.Tensor, c: float = 1.0, tol: float = 1e-4,
                          max_iter: int = 1000, max_cg: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """The problems of :func:`fit_linear_svms`, solved for all classes at once on ``x``'s device.

    liblinear's primal L2-loss SVM (``dual=False``): for each class k, with ``x~ = [x, 1]``
    (the bias is a regularised weight, ``intercept_scaling=1``) and ``y_ik = +-1``,
    ``min_w 1/2 ||w||^2 + C sum_i max(0, 1 - y_ik w . x~_i)^2``.  Newton steps on the
    generalised Hessian ``I + 2C X~_A^T X~_A`` (A: margin violators), solved by conjugate
    gradient, with a backtracking line search; a class stops with liblinear's criterion
    ``||g|| <= tol * max(min(#pos, #neg), 1) / N * ||g_0||``.  Same optimum as liblinear
    (the problem is strictly convex); the two stop at slightly different points within the
    tolerance.  Float64.  Returns ``W [K, D]`` and ``b [K]``.
    """
    x = x.double()
    n = x.shape[0]
    xt = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], 1)
    sign = torch.where(y.unsqueeze(1) == classes.to(y.device).unsqueeze(0), 1.0, -1.0).to(x.dtype)  # [N, K]
    k = classes.numel()
    if k == 1:
        return torch.zeros(1, x.shape[1], dtype=x.dtype), torch.zeros(1, dtype=x.dtype)
    pos = (sign > 0).sum(0)
    eps = tol * torch.clamp(torch.minimum(pos, n - pos), min=1).to(x.dtype) / n

    def objective(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        margin = (xt @ w.T) * sign
        slack = torch.clamp(1 - margin, min=0)
        return 0.5 * (w * w).sum(1) + c * slack.pow(2).sum(0), w - 2 * c * ((slack * sign).T @ xt), margin < 1

    w = torch.zeros(k, xt.shape[1], dtype=x.dtype, device=x.device)
    f, g, violators = objective(w)
    g0 = g.norm(dim=1)
    for _ in range(max_iter):
        gnorm = g.norm(dim=1)
        todo = gnorm > eps * g0
        if not bool(todo.any()):
            break
        a = violators.to(x.dtype)
        # conjugate gradient on H d = -g, rows of finished classes held at 0
        d = torch.zeros_like(w)
        r = torch.where(todo.unsqueeze(1), -g, torch.zeros_like(g))
        p = r.clone()
        rr = (r * r).sum(1)
        cg_tol = (0.1 * gnorm).pow(2)
        for _ in range(max_cg):
            going = rr > cg_tol
            if not bool(going.any()):
                break
            hp = p + 2 * c * (((xt @ p.T) * a).T @ xt)
            alpha = torch.where(going, rr / (p * hp).sum(1).clamp_min(1e-300), torch.zeros_like(rr))
            d += alpha.unsqueeze(1) * p
            r -= alpha.unsqueeze(1) * hp
            rr_new = (r * r).sum(1)
            p = r + (rr_new / rr.clamp_min(1e-300)).unsqueeze(1) * p
            rr = rr_new
        # backtracking (Armijo) line search per class
        step = torch.ones(k, dtype=x.dtype, device=x.device)
        slope = (g * d).sum(1)
        for _ in range(40):
            f_new = objective(w + step.unsqueeze(1) * d)[0]
            ok = (f_new <= f + 1e-2 * step * slope) | ~todo
            if bool(ok.all()):
                break
            step = torch.where(ok, step, step / 2)
        w = torch.where(todo.unsqueeze(1), w + step.unsqueeze(1) * d, w)
        f, g, violators = objective(w)
    return w[:, :-1], w[:, -1]
