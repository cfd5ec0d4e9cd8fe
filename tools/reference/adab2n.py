"""Reference goldens for AdaB2N and its base methods ER-ACE and DER++ (issue 13, section 3).

Official code: ``lvyilin/AdaB2N`` @ 9aaba7e4ac848e5bce42a7da7df15e4453924b75 (mammoth-based), files
``models/utils/adab2n.py`` (the ``AdaB2N`` layer), ``models/er_ace.py`` / ``models/derpp.py`` (the BN
baselines: one forward per part), ``models/er_ace_ada.py`` / ``models/derpp_ada.py`` (one joint
forward, AdaB2N's ``set_counts`` and regulariser), ``models/utils/continual_model.py`` (BN
replacement, SGD), ``backbone/ResNet18.py`` (mammoth's ResNet-18), ``utils/buffer.py``.
And ``pclucas14/AML`` @ 7c929363d9c687e0aa4539c1ab91c812330d421f, ``model.py`` (``distLinear``:
ER-ACE's cosine head, scale 10).

Goldens written (``tests/reference/``), checked by ``tests/test_reference_adab2n.py``:

* ``adab2n_layer``: one official ``AdaB2N`` layer (3 channels, 5 tasks x 2 classes, kappa 0.4,
  random affine/running statistics/task weights, ``cur_tasks`` = 2) through 3 training forwards
  on seeded 8x3x4x4 inputs (step 1 lacks task 1: the released absent-task mass matters), the
  sample counts made by the official ``ErACEAda.set_counts`` from the labels; per step the
  output, the regulariser ``layer.loss``, the running statistics after the update and the
  gradients of ``sum(out * upstream) + loss`` w.r.t. input, weight, bias, task_weight; then an
  eval forward.  Plus running means after 3 plain steps with kappa 0 and 1.
* ``adab2n_er_ace_bn``, ``adab2n_er_ace_ada``, ``adab2n_derpp_bn``, ``adab2n_derpp_ada``:
  3 ``observe`` steps of the official model classes (``ErACE``, ``ErACEAda``, ``Derpp``,
  ``DerppAda``) on mammoth's ResNet-18 with nf=2 and 8x8 inputs (10 classes, 5 tasks, in task 2;
  SGD lr 0.03; ``_ada``: kappa 0.4, lambda 1, ada_t0 0; DER++ alpha 0.2, beta 0.5), incoming
  batches of 4 and buffer draws of 4 injected (``buffer.get_data`` returns the seeded draws in
  order, the same the test feeds clbench's buffer).  Stored: the initial state (random BN
  statistics, affine parameters and task weights), the inputs and draws, the loss ``observe``
  returns per step, the head after each step and the whole state after the last.
* ``adab2n_er_ace_ada_task0``: ``ErACEAda`` in task 0 (no replay, no mask, no AdaB2N term in the
  released code; step 0's batch holds class 1 only; incoming batches of 8: without replay, 4
  samples leave BN's 1x1 last stage so ill-conditioned that float rounding grows ~30x a step).
* ``adab2n_er_ace_mask_max_absent``, ``adab2n_er_ace_mask_last_class``: ``ErACE`` (BN) as
  ``adab2n_er_ace_bn`` (same stored quantities), in stream states that reach the two edges of its
  "unmask unseen classes" mask (``mask[:, seen_so_far.max():] = 1`` if ``seen_so_far.max() <
  num_classes - 1``), which the cases above never reach.  ``max_absent``: task 2, classes 0..5 seen
  before, incoming labels [4 4 4 4], [5 4 4 5], [4 4 4 4] (the largest seen class 5 absent at steps 0
  and 2, so only the mask's ``>=`` keeps it).  ``last_class``: task 4, classes 0..8 seen before,
  incoming [9 8 9 9], [8 8 8 8], [8 9 8 8] (class C-1 = 9 seen at every step: no unmasking; absent
  at step 1).  The script asserts from the official ``seen_so_far`` that the steps reach the edges.
* ``aml_cosine_head``: AML's ``distLinear`` on seeded features: scores and input/weight gradients.
* ``adab2n_task_order``: the official ``datasets/utils/continual_dataset.py::ContinualDataset.get_task_order``
  for seeds 0..4 (10 classes; seq-cifar10 maps every target ``c`` to ``order[c]``): the class order of
  each released seed, which ``benchmarks/adab2n_online_cifar10.py --parity`` follows.

Patched from outside (the exercised code is unchanged): ``models.utils.continual_model.evaluate``
for ``nl="BN"`` returns the identity (at this commit ``evaluate`` returns ``nn.BatchNorm2d``, and
``replace_bn`` calls ``BatchNorm2d(module)``, which raises a TypeError: the BN baseline cannot be
built as released); the buffer's ``get_data``/``is_empty`` are replaced to inject the draws; the
working directory is the checkout while ``datasets`` is imported (it lists ``datasets/`` relative
to the cwd).  Runs on CPU (``get_device()`` falls back to CPU).  Needs torchvision and pandas
(imported by the official modules), both in clbench's environment.

Run:  python tools/reference/adab2n.py [--source DIR_OF_ADAB2N_CHECKOUT] [--aml-source DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from argparse import Namespace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.reference.common import imported_from, official_source, seed_everything, write_golden  # noqa: E402

REPOSITORY = "lvyilin/AdaB2N"
COMMIT = "9aaba7e4ac848e5bce42a7da7df15e4453924b75"
AML = "pclucas14/AML"
AML_COMMIT = "7c929363d9c687e0aa4539c1ab91c812330d421f"
SCRIPT = "tools/reference/adab2n.py"
PACKAGES = ("models", "datasets", "utils", "backbone")

# the case (the test reads these from the golden's extra)
N_TASKS, CPT, N_CLASSES, TASK = 5, 2, 10, 2
NF, SIZE, BATCH, DRAW, STEPS, LR = 2, 8, 4, 4, 3, 0.03
KAPPA, LAMBD, ADA_T0, ALPHA, BETA = 0.4, 1.0, 0, 0.2, 0.5
INCOMING = [[4, 5, 5, 4], [5, 4, 4, 4], [4, 4, 5, 5]]  # labels of task 2
DRAWS = [[0, 1, 4, 0], [2, 0, 3, 5], [1, 3, 3, 4]]  # step 1 lacks task 1
DRAWS2 = [[5, 1, 0, 4], [3, 2, 1, 0], [0, 5, 2, 3]]  # DER++'s second draw
# ER-ACE mask edges.  max_absent: task 2 with classes 0..5 seen before (class 5 earlier in the task);
# steps 0 and 2 lack class 5, the largest seen class, which the released mask keeps (``seen.max():``)
MAX_ABSENT_SEEN, MAX_ABSENT_INCOMING = 6, [[4, 4, 4, 4], [5, 4, 4, 5], [4, 4, 4, 4]]
# last_class: task 4 with classes 0..8 seen before; step 0 brings class 9 = C-1 (then seen at every step):
# no unmasking at all (``seen.max() < C - 1`` is false); step 1 lacks class 9 (masked), steps 0, 2 hold it
LAST_CLASS_SEEN, LAST_CLASS_INCOMING = 9, [[9, 8, 9, 9], [8, 8, 8, 8], [8, 9, 8, 8]]
LAST_CLASS_DRAWS = [[0, 3, 7, 8], [2, 6, 1, 5], [4, 8, 0, 7]]


@contextlib.contextmanager
def cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def randomize_norms(net: nn.Module, g: torch.Generator) -> None:
    """Non-trivial BN affine parameters, running statistics and (AdaB2N) task weights."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if hasattr(m, "task_weight"):
                    m.task_weight.copy_(torch.randn(m.num_tasks, generator=g) * 0.5)


def layer_case() -> None:
    from models.er_ace_ada import ErACEAda
    from models.utils.adab2n import AdaB2N

    g = torch.Generator().manual_seed(0)
    layer = AdaB2N(nn.BatchNorm2d(3), num_tasks=N_TASKS, num_classes_per_task=CPT, kappa=KAPPA)
    randomize_norms(layer, g)
    for _ in range(TASK):
        layer.end_task()
    counter = Namespace(n_classes_per_task=CPT, task=TASK, norm_modules=[layer])
    labels = [[0, 1, 4, 5, 5, 4, 0, 5], [2, 0, 3, 5, 4, 1, 2, 5], [4, 4, 4, 5, 5, 1, 3, 0]]
    out = {f"init/{k}": v.clone() for k, v in layer.state_dict().items() if k != "cur_tasks"}
    out["init/task_weight"] = layer.task_weight.detach().clone()
    for s, lab in enumerate(labels):
        x = (torch.randn(8, 3, 4, 4, generator=g) * 1.5 + 0.3).requires_grad_()
        up = torch.randn(8, 3, 4, 4, generator=g)
        y = torch.tensor(lab)
        ErACEAda.set_counts(counter, y)
        layer.zero_grad()
        o = layer(x)
        loss = (o * up).sum() + LAMBD * layer.loss
        loss.backward()
        out.update({f"step{s}/x": x.detach(), f"step{s}/labels": y, f"step{s}/upstream": up, f"step{s}/out": o.detach(),
                    f"step{s}/reg": layer.loss.detach().reshape(1), f"step{s}/running_mean": layer.running_mean.clone(),
                    f"step{s}/running_var": layer.running_var.clone(), f"step{s}/grad_x": x.grad,
                    f"step{s}/grad_weight": layer.weight.grad.clone(), f"step{s}/grad_bias": layer.bias.grad.clone(),
                    f"step{s}/grad_task_weight": layer.task_weight.grad.clone()})
    layer.eval()
    xe = torch.randn(5, 3, 4, 4, generator=g)
    out["eval/x"], out["eval/out"] = xe, layer(xe).detach()
    for kappa in (0.0, 1.0):  # the two limits of the momentum recursion, plain batch statistics
        lim = AdaB2N(nn.BatchNorm2d(3), num_tasks=N_TASKS, num_classes_per_task=CPT, kappa=kappa)
        for s in range(3):
            lim(torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(100 + s)))
        out[f"kappa{kappa:g}/running_mean"] = lim.running_mean.clone()
        out[f"kappa{kappa:g}/running_var"] = lim.running_var.clone()
    write_golden("adab2n_layer", out, repository=REPOSITORY, commit=COMMIT,
                 files=["models/utils/adab2n.py", "models/er_ace_ada.py (set_counts)"], script=SCRIPT,
                 notes="AdaB2N layer, released code: 3 weighted training forwards (task 1 absent at step 0), eval forward, "
                       "kappa limits", extra={"num_tasks": N_TASKS, "classes_per_task": CPT, "current_task": TASK,
                                              "kappa": KAPPA, "lambda": LAMBD, "kappa_limit_inputs_seed": 100})


def case_data(derpp: bool, incoming: list[list[int]], draws: list[list[int]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    data = {}
    for s in range(STEPS):
        data[f"data/step{s}/x"] = torch.randn(len(incoming[s]), 3, SIZE, SIZE, generator=g)
        data[f"data/step{s}/y"] = torch.tensor(incoming[s])
        data[f"data/step{s}/buf_x"] = torch.randn(DRAW, 3, SIZE, SIZE, generator=g)
        data[f"data/step{s}/buf_y"] = torch.tensor(draws[s])
        if derpp:
            data[f"data/step{s}/buf_logits"] = torch.randn(DRAW, N_CLASSES, generator=g)
            data[f"data/step{s}/buf2_x"] = torch.randn(DRAW, 3, SIZE, SIZE, generator=g)
            data[f"data/step{s}/buf2_y"] = torch.tensor(DRAWS2[s])
            data[f"data/step{s}/buf2_logits"] = torch.randn(DRAW, N_CLASSES, generator=g)
    return data


def step_case(name: str, model_name: str, nl: str, task: int = TASK, incoming=INCOMING, draws=DRAWS,
              seen_before: int | None = None, notes: str = "") -> list[int]:
    """``task`` 0 (ER-ACE): the official code neither replays nor masks nor adds AdaB2N's term; the
    draws are stored anyway (the test's default mode, which replays, uses them).  ``seen_before``:
    the classes ``0..seen_before-1`` are in ``seen_so_far`` before the first step (default: those of
    the earlier tasks).  Returns the official ``seen_so_far.max()`` after each step (ER-ACE)."""
    seen_before = CPT * task if seen_before is None else seen_before
    import models.utils.continual_model as cm
    from backbone.ResNet18 import resnet18
    from models import derpp, derpp_ada, er_ace, er_ace_ada

    classes = {"er_ace": er_ace.ErACE, "er_ace_ada": er_ace_ada.ErACEAda, "derpp": derpp.Derpp,
               "derpp_ada": derpp_ada.DerppAda}
    official_evaluate = cm.evaluate
    cm.evaluate = lambda nl_, args: (lambda m: m) if nl_ == "BN" else official_evaluate(nl_, args)  # see docstring
    try:
        args = Namespace(dataset="seq-cifar10", nl=nl, kappa=KAPPA, lambd=LAMBD, ada_t0=ADA_T0, no_affine=False,
                         lr=LR, buffer_size=50, buffer_mode="reservoir", minibatch_size=DRAW, alpha=ALPHA, beta=BETA,
                         nowand=1, debug_mode=1)
        seed_everything(0)
        net = resnet18(N_CLASSES, nf=NF)
        model = classes[model_name](net, nn.functional.cross_entropy, args, transform=None)
    finally:
        cm.evaluate = official_evaluate
    randomize_norms(model.net, torch.Generator().manual_seed(2))
    model.task = task
    for m in model.net.modules():
        if hasattr(m, "end_task"):
            for _ in range(task):
                m.end_task()
    if hasattr(model, "seen_so_far"):
        model.seen_so_far = torch.arange(seen_before)  # classes seen before (default: of the earlier tasks)
    derpp_like = model_name.startswith("derpp")
    data = case_data(derpp_like, incoming, draws)
    out = dict(data)
    out.update({f"init/{k}": v.clone() for k, v in model.net.state_dict().items() if not k.endswith("cur_tasks")})
    injected = []
    for s in range(STEPS):
        if derpp_like:
            injected += [(data[f"data/step{s}/buf_x"], data[f"data/step{s}/buf_y"], data[f"data/step{s}/buf_logits"]),
                      (data[f"data/step{s}/buf2_x"], data[f"data/step{s}/buf2_y"], data[f"data/step{s}/buf2_logits"])]
        else:
            injected.append((data[f"data/step{s}/buf_x"], data[f"data/step{s}/buf_y"]))
    queue, used = iter(injected), []

    def get_data(size, transform=None, return_index=False):  # inject the draws
        used.append(size)
        return next(queue)

    model.buffer.get_data = get_data
    model.buffer.is_empty = lambda: False
    losses, seen_max = [], []
    for s in range(STEPS):
        x, y = data[f"data/step{s}/x"], data[f"data/step{s}/y"]
        losses.append(model.observe(x, y, x))
        if hasattr(model, "seen_so_far"):
            seen_max.append(int(model.seen_so_far.max()))
        out[f"step{s}/head.weight"] = model.net.linear.weight.detach().clone()
        out[f"step{s}/head.bias"] = model.net.linear.bias.detach().clone()
    assert len(used) == (len(injected) if task > 0 else 0), used
    out["losses"] = torch.tensor(losses, dtype=torch.float64)
    out.update({f"final/{k}": v.clone() for k, v in model.net.state_dict().items() if not k.endswith("cur_tasks")})
    files = {"er_ace": ["models/er_ace.py"], "er_ace_ada": ["models/er_ace_ada.py", "models/utils/adab2n.py"],
             "derpp": ["models/derpp.py"], "derpp_ada": ["models/derpp_ada.py", "models/utils/adab2n.py"]}[model_name]
    write_golden(name, out, repository=REPOSITORY, commit=COMMIT,
                 files=files + ["models/utils/continual_model.py", "backbone/ResNet18.py"], script=SCRIPT,
                 notes=f"{model_name} (nl={nl}): 3 observe steps in task {task} with injected buffer draws" + notes,
                 extra={"model": model_name, "nl": nl, "n_tasks": N_TASKS, "classes_per_task": CPT, "task": task,
                        "draws_used": len(used),
                        "nf": NF, "size": SIZE, "steps": STEPS, "lr": LR, "kappa": KAPPA, "lambda": LAMBD,
                        "ada_t0": ADA_T0, "alpha": ALPHA, "beta": BETA, "seen_before": seen_before})
    return seen_max


def cosine_case(aml: Path) -> None:
    with imported_from(aml, "model", "methods", "data", "utils", "buffer", "logger"):
        from model import distLinear

        seed_everything(3)
        head = distLinear(16, 10)
        feats = (torch.randn(6, 16) * 2).requires_grad_()
        up = torch.randn(6, 10)
        scores = head(feats)
        (scores * up).sum().backward()
        write_golden("aml_cosine_head", {"weight": head.L.weight.detach().clone(), "features": feats.detach(),
                                         "upstream": up, "scores": scores.detach(), "grad_features": feats.grad,
                                         "grad_weight": head.L.weight.grad.clone()},
                     repository=AML, commit=AML_COMMIT, files=["model.py (distLinear)"], script=SCRIPT,
                     notes="ER-ACE's cosine classifier (scale 10) on seeded features",
                     extra={"scale": head.scale_factor})


def task_order_case() -> None:
    """The released class-to-label map of each seed (called unbound on a stand-in ``self``)."""
    from datasets.utils.continual_dataset import ContinualDataset

    seeds = list(range(5))
    out = {}
    for seed in seeds:
        stand_in = Namespace(args=Namespace(seed=seed, no_task_shuffle=False), N_TASKS=N_TASKS,
                             N_CLASSES_PER_TASK=CPT)
        out[f"order_s{seed}"] = torch.as_tensor(ContinualDataset.get_task_order(stand_in), dtype=torch.int64)
    write_golden("adab2n_task_order", out, repository=REPOSITORY, commit=COMMIT,
                 files=["datasets/utils/continual_dataset.py", "datasets/seq_cifar10.py"], script=SCRIPT,
                 notes="get_task_order per seed; targets are remapped as order[target]", extra={"seeds": seeds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=None, help=f"a checkout of {REPOSITORY} at {COMMIT[:7]}")
    parser.add_argument("--aml-source", default=None, help=f"a checkout of {AML} at {AML_COMMIT[:7]}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    src = official_source(REPOSITORY, COMMIT, args.source)
    with imported_from(src, *PACKAGES), cwd(src):
        import datasets  # noqa: F401  (lists datasets/ relative to the cwd)

        layer_case()
        task_order_case()
        step_case("adab2n_er_ace_bn", "er_ace", "BN")
        step_case("adab2n_er_ace_ada", "er_ace_ada", "AdaB2N")
        step_case("adab2n_er_ace_ada_task0", "er_ace_ada", "AdaB2N", task=0,
                  incoming=[[1] * 8, [0, 1, 1, 1, 0, 1, 1, 1], [1, 0, 0, 0, 1, 0, 1, 1]],
                  draws=[[1, 1, 0, 1], [0, 1, 1, 0], [1, 1, 0, 1]])
        # ER-ACE's unseen-logits mask at its edges (the cases above never reach them)
        top = step_case("adab2n_er_ace_mask_max_absent", "er_ace", "BN", seen_before=MAX_ABSENT_SEEN,
                        incoming=MAX_ABSENT_INCOMING, notes="; the largest seen class (5) absent from steps 0 and 2")
        # the official state reaches the edge: the largest seen class < C-1 and absent from the batch
        assert [t < N_CLASSES - 1 and t not in y for t, y in zip(top, MAX_ABSENT_INCOMING)] == [True, False, True], top
        top = step_case("adab2n_er_ace_mask_last_class", "er_ace", "BN", task=N_TASKS - 1, seen_before=LAST_CLASS_SEEN,
                        incoming=LAST_CLASS_INCOMING, draws=LAST_CLASS_DRAWS,
                        notes="; class C-1 seen at every step (present at steps 0 and 2, absent at step 1)")
        assert top == [N_CLASSES - 1] * STEPS, top  # class C-1 seen at every step
        step_case("adab2n_derpp_bn", "derpp", "BN")
        step_case("adab2n_derpp_ada", "derpp_ada", "AdaB2N")
    cosine_case(official_source(AML, AML_COMMIT, args.aml_source))


if __name__ == "__main__":
    main()
