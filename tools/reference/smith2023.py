"""Golden for EWC / L2 / LwF.MC as in Smith et al. 2023 ("A Closer Look at Rehearsal-Free Continual
Learning", arXiv 2203.17269): runs the authors' learners on a tiny case and writes
``tests/reference/smith2023.safetensors``.

Official code: ``shaunak27/data-free-continual-learning`` at commit
``5388102071939440c21df4e32282724ca5c76cfa`` ("collas final"); files ``learners/kd.py`` (classes
``EWC_MC``, ``EWC_MC_L1L2``, ``EWC_MC_L2START``, ``LWF_MC``, ``LWF_MC_FEATKD``, and their base ``LWF``),
``learners/default.py`` (``NormalNN``: optimiser, ``Teacher``, ``loss_fn_kd``), ``utils/metric.py``.
The learner classes are imported from the checkout and driven exactly as ``trainer.py`` drives them
(``add_valid_output_dim`` then ``learn_batch`` per task); nothing of them is copied here.

Variants (the learner and flags of the runs in ``experiments/cifar100-continual.sh`` /
``cifar100-continual_pt.sh``, all with ``--KD``, ``--beta 0``):

* ``ewc_mc``      ``EWC_MC --mu 10 --eps 0`` (output dir ``ewc-mc``): LwF.MC loss (5 x BCE, sigmoid of the
  teacher's logits as the old classes' targets) + EWC;
* ``l2_mc``       ``EWC_MC_L1L2 --mu 0 --eps -0.05`` (``mc-l2``): LwF.MC + L2, anchored at the initial
  weights during task 1;
* ``ewc_mc_l2start`` ``EWC_MC_L2START --mu 10 --eps -0.05`` (``ewc-mc-l2start``): LwF.MC + L2 (initial
  anchor in task 1) + EWC -- note its ``l2_start_flag`` branch is never reached, so the L2 term stays on
  for every task;
* ``ewc_nologitkd`` ``EWC_MC --playground_flag --temp -1`` (``ewc-mc-nologitkd``): 5 x BCE on the new
  classes' logits only + EWC;
* ``ewc_ce``      ``EWC_MC --playground_flag --temp -3`` (``ewc``): CE over the seen classes + EWC;
* ``ewc_lwf``     ``EWC_MC --playground_flag --temp -4`` (``ewc-lwf``): CE + KD(T=2) + EWC;
* ``lwf_mc``      ``LWF_MC`` (``lwf-mc``): the LwF.MC loss alone;
* ``featkd``      ``LWF_MC_FEATKD --mu 5 --playground_flag --temp -3`` (``featkd``): CE + 5 x MSE between the
  penultimate features and the teacher's -- in task 1 the teacher is the initial model;
* ``lwf_mc_featkd`` ``LWF_MC_FEATKD --mu 5`` (``lwf-mc-featkd``): LwF.MC + the same feature distillation;
* ``lwf_mc_featkd_nologitkd`` ``LWF_MC_FEATKD --mu 5 --playground_flag --temp -1``
  (``lwf-mc-featkd-nologitkd``): 5 x BCE on the new classes' logits + the feature distillation;
* ``*_balanced`` (``BALANCED``): ``lwf_mc``, ``lwf_mc_featkd``, ``ewc_mc``, ``l2_mc`` with ``--balanced_bce``
  (``lwf-mc-balance``, ``lwf-mc-featkd-balance``, ``ewc-mc-balance``, ``mc-l2-balance``): the class-balanced
  BCE in training and in EWC's Fisher pass;
* ``ewc_mc_balanced_uneven`` ``EWC_MC --balanced_bce`` on tasks of 2 and 4 classes (``SPLITS``; own data
  ``<name>/x``, ``<name>/y``): with 3 + 3 classes the balanced loss's n/(n+m) : m/(n+m) mix is 1/2 : 1/2,
  here it is 4/6 : 2/6, and the Fisher passes run with n = 2 and n = 4.

Case: a tiny MLP with BatchNorm (``feat`` = Linear(8,12)-BN-ReLU-Linear(12,12)-BN-ReLU, ``last`` =
Linear(12,6), non-trivial BN running statistics), 2 tasks of 3 classes (0-2, 3-5), 24 seeded Gaussian
samples per task, 3 fixed mini-batches of 8 per epoch, 2 epochs per task, SGD lr 0.1, momentum 0.9,
weight decay 2e-4 (``--schedule 2 --schedule_type decay``: constant lr), optimiser reset per task.
The train loader is a fixed list (no shuffling, no augmentation), and it is also the loader of the
end-of-task Fisher pass, as in ``learn_batch``.  Recorded per variant: the loss, classification and
regularisation parts at every step, all parameters after steps 1, 6 (end of task 1), 7 and 12, the
EWC importance (``importance_l2``, the Fisher) and the anchor (``task_param``) after each task.

Patches from outside, because the code is CUDA-only: ``torch.Tensor.cuda`` returns a clone (on a
GPU ``.cuda()`` of a CPU leaf gives a non-leaf tensor, into which the learner adds in place: a
plain identity would make those in-place adds fail on a leaf that requires grad),
``nn.Module.cuda`` and ``torch.cuda.set_device`` do nothing; ``seaborn`` (imported by
``utils/visualization.py``, not used on this path, not installed here) is a stub module; the tiny
model replaces ``learner.model`` after construction (``create_model`` builds a ResNet), and
``learner.update_model`` is wrapped to record each step's returned losses.

Run: ``python tools/reference/smith2023.py [--source DIR]`` (DIR: a checkout at the commit above;
default: extracted from the mirror, see ``tools/reference/common.py``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.reference.common import imported_from, official_source, seed_everything, write_golden  # noqa: E402

REPOSITORY = "shaunak27/data-free-continual-learning"
COMMIT = "5388102071939440c21df4e32282724ca5c76cfa"
FILES = ["learners/kd.py", "learners/default.py", "utils/metric.py"]

IN_DIM, HIDDEN, CLASSES, PER_TASK = 8, 12, 6, 3
BATCH, N_BATCHES, EPOCHS, TASKS = 8, 3, 2, 2
LR, MOMENTUM, WD = 0.1, 0.9, 2e-4
RECORD_STEPS = (0, 5, 6, 11)  # 0-based steps whose parameters are stored

# name: (learner class, KD, playground_flag, temp, mu, eps)
VARIANTS = {
    "ewc_mc": ("EWC_MC", True, False, 2.0, 10.0, 0.0),
    "l2_mc": ("EWC_MC_L1L2", True, False, 2.0, 0.0, -0.05),
    "ewc_mc_l2start": ("EWC_MC_L2START", True, False, 2.0, 10.0, -0.05),
    "ewc_nologitkd": ("EWC_MC", True, True, -1.0, 10.0, 0.0),
    "ewc_ce": ("EWC_MC", True, True, -3.0, 10.0, 0.0),
    "ewc_lwf": ("EWC_MC", True, True, -4.0, 10.0, 0.0),
    "lwf_mc": ("LWF_MC", True, False, 2.0, 1.0, 0.0),
    "featkd": ("LWF_MC_FEATKD", True, True, -3.0, 5.0, 0.0),
    "lwf_mc_featkd": ("LWF_MC_FEATKD", True, False, 2.0, 5.0, 0.0),
    "lwf_mc_featkd_nologitkd": ("LWF_MC_FEATKD", True, True, -1.0, 5.0, 0.0),
    "lwf_mc_balanced": ("LWF_MC", True, False, 2.0, 1.0, 0.0),
    "lwf_mc_featkd_balanced": ("LWF_MC_FEATKD", True, False, 2.0, 5.0, 0.0),
    "ewc_mc_balanced": ("EWC_MC", True, False, 2.0, 10.0, 0.0),
    "l2_mc_balanced": ("EWC_MC_L1L2", True, False, 2.0, 0.0, -0.05),
}
VARIANTS["ewc_mc_balanced_uneven"] = VARIANTS["ewc_mc_balanced"]
BALANCED = ("lwf_mc_balanced", "lwf_mc_featkd_balanced", "ewc_mc_balanced", "l2_mc_balanced",
            "ewc_mc_balanced_uneven")  # --balanced_bce
SPLITS = {"ewc_mc_balanced_uneven": (2, 4)}  # classes per task where not (PER_TASK,) * TASKS


class TinyNet(nn.Module):
    """The official models' interface: ``feat`` (the regularised feature extractor), ``last`` (the
    head), ``forward(x, pen=False)``."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(),
                                  nn.Linear(HIDDEN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU())
        self.last = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor, pen: bool = False) -> torch.Tensor:
        f = self.feat(x)
        return f if pen else self.last(f)


def initial_state() -> dict[str, torch.Tensor]:
    seed_everything(0)
    net = TinyNet()
    with torch.no_grad():
        for m in net.feat:
            if isinstance(m, nn.BatchNorm1d):  # frozen BN must use these, not batch statistics
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.1, 0.1)
    return {k: v.clone() for k, v in net.state_dict().items()}


def make_data(split: tuple[int, ...] = (PER_TASK,) * TASKS) -> tuple[torch.Tensor, torch.Tensor]:
    """``TASKS * N_BATCHES * BATCH`` samples in stream order; task t holds ``split[t]`` classes (default 3t..3t+2), a class-
    dependent mean so that the tasks are learnable."""
    g = torch.Generator().manual_seed(1)
    n = N_BATCHES * BATCH
    xs, ys = [], []
    means = torch.randn(CLASSES, IN_DIM, generator=g)
    for t in range(TASKS):
        y = sum(split[:t]) + torch.arange(n) % split[t]
        y = y[torch.randperm(n, generator=g)]
        xs.append(means[y] + torch.randn(n, IN_DIM, generator=g))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def learner_config(kd: bool, playground: bool, temp: float, mu: float, eps: float, balanced: bool = False,
                   split: tuple[int, ...] = (PER_TASK,) * TASKS) -> dict:
    """The dict ``trainer.py`` builds from the arguments (only the keys the learners read)."""
    return {"num_classes": CLASSES, "lr": LR, "debug_mode": False, "momentum": MOMENTUM, "weight_decay": WD,
            "schedule": [EPOCHS], "schedule_type": "decay", "model_type": "mlp", "model_name": "MLP",
            "gen_model_type": "mlp", "gen_model_name": "MLP", "optimizer": "SGD", "gpuid": [0], "memory": 0,
            "temp": temp, "out_dim": CLASSES, "overwrite": False, "mu": mu, "beta": 0.0, "eps": eps, "DW": False,
            "KD": kd, "batch_size": BATCH, "stat_layers": [-1], "power_iters": 10, "deep_inv_params": [-1],
            "refresh_iters": 10, "upper_bound_flag": False, "playground_flag": playground,
            "tasks": [list(range(sum(split[:t]), sum(split[:t + 1]))) for t in range(TASKS)], "top_k": 1,
            "block_size": 1, "layer_freeze": 1, "balanced_bce": balanced}


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def run_variant(kd_module, name: str, spec, state: dict, x: torch.Tensor, y: torch.Tensor, save_dir: str) -> dict:
    cls_name, kd, playground, temp, mu, eps = spec
    split = SPLITS.get(name, (PER_TASK,) * TASKS)
    learner = getattr(kd_module, cls_name)(learner_config(kd, playground, temp, mu, eps, name in BALANCED, split))
    learner.log = lambda *a, **k: None
    learner.model = TinyNet()
    learner.model.load_state_dict(state)
    learner.init_optimizer()

    steps: list[tuple[float, float, float]] = []
    params: list[torch.Tensor] = []
    update = learner.update_model

    def recorded(*args):
        out = update(*args)
        steps.append((float(out[0].sum()), float(out[1].sum()), float(out[2].sum())))
        if len(steps) - 1 in RECORD_STEPS:
            params.append(flat(learner.model.parameters()))
        return out

    learner.update_model = recorded
    dataset = types.SimpleNamespace(dw=False)
    out: dict[str, torch.Tensor] = {}
    n = N_BATCHES * BATCH
    for t in range(TASKS):
        xt, yt = x[t * n:(t + 1) * n], y[t * n:(t + 1) * n]
        loader = [([xt[b * BATCH:(b + 1) * BATCH]], yt[b * BATCH:(b + 1) * BATCH], torch.full((BATCH,), t))
                  for b in range(N_BATCHES)]
        learner.add_valid_output_dim(split[t])
        learner.learn_batch(loader, dataset, f"{save_dir}/{name}-task{t}/")
        terms = getattr(learner, "regularization_terms", {}).get("online")
        if terms is not None:
            names = list(learner.params)
            out[f"{name}/fisher_task{t}"] = flat(terms["importance_l2"][n_] for n_ in names)
            out[f"{name}/anchor_task{t}"] = flat(terms["task_param"][n_] for n_ in names)
    out[f"{name}/loss"] = torch.tensor([s[0] for s in steps])
    out[f"{name}/loss_class"] = torch.tensor([s[1] for s in steps])
    out[f"{name}/loss_reg"] = torch.tensor([s[2] for s in steps])
    out[f"{name}/params"] = torch.stack(params)
    return out


def patch_cuda() -> None:
    torch.Tensor.cuda = lambda self, *a, **k: self.clone()
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    sys.modules.setdefault("seaborn", types.ModuleType("seaborn"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", help=f"a checkout of {REPOSITORY} at {COMMIT}")
    args = parser.parse_args()
    src = official_source(REPOSITORY, COMMIT, args.source, paths=("learners", "models", "utils"))
    torch.set_num_threads(1)
    cuda, module_cuda, set_device = torch.Tensor.cuda, nn.Module.cuda, torch.cuda.set_device
    patch_cuda()
    state = initial_state()
    x, y = make_data()
    tensors: dict[str, torch.Tensor] = {"x": x, "y": y}
    tensors.update({f"init/{k}": v for k, v in state.items()})
    for m in ("learners", "models", "utils", "dataloaders"):
        sys.modules.pop(m, None)
    try:
        with imported_from(src, "learners", "models", "utils", "dataloaders"), tempfile.TemporaryDirectory() as tmp:
            import learners.kd as kd_module
            for name, spec in VARIANTS.items():
                if name in SPLITS:
                    xs, ys = make_data(SPLITS[name])
                    tensors.update({f"{name}/x": xs, f"{name}/y": ys})
                    tensors.update(run_variant(kd_module, name, spec, state, xs, ys, tmp))
                else:
                    tensors.update(run_variant(kd_module, name, spec, state, x, y, tmp))
    finally:
        torch.Tensor.cuda, nn.Module.cuda, torch.cuda.set_device = cuda, module_cuda, set_device
    write_golden("smith2023", tensors, repository=REPOSITORY, commit=COMMIT, files=FILES,
                 script="tools/reference/smith2023.py",
                 notes="EWC_MC / EWC_MC_L1L2 / EWC_MC_L2START / LWF_MC / LWF_MC_FEATKD learners on a tiny BN-MLP, 2 tasks x 2 epochs x 3 batches",
                 extra={"variants": {k: list(v) for k, v in VARIANTS.items()}, "balanced_bce": list(BALANCED),
                        "splits": {k: list(v) for k, v in SPLITS.items()}, "in_dim": IN_DIM, "hidden": HIDDEN,
                        "classes": CLASSES, "per_task": PER_TASK, "batch": BATCH, "n_batches": N_BATCHES,
                        "epochs": EPOCHS, "tasks": TASKS, "lr": LR, "momentum": MOMENTUM, "weight_decay": WD,
                        "record_steps": list(RECORD_STEPS)})


if __name__ == "__main__":
    main()
