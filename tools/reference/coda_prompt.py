"""Goldens for L2P++, DualPrompt and CODA-Prompt as implemented in the CODA-Prompt code, and its LR schedule.

Repository ``GT-RIPL/CODA-Prompt`` @ ``6417d4f68754be68b697c7ca2323ee61e791e1a3``; official code run here:

* ``models/zoo.py``: ``L2P`` (L2P++, ``prompt_param [pool, length, -1]``: prompts in block 0, top-5),
  ``DualPrompt`` (``[e_pool, e_length, g_length]``: G-prompt in blocks 0-1, E-prompts with **one key per
  E-prompt layer** in blocks 2-4, the task id picks the E-prompt while training), ``CodaPrompt``
  (``[pool, length, ortho_mu]``: components/keys/attention in blocks 0-4, ``gram_schmidt`` at construction
  and in ``process_task_count``), ``tensor_prompt`` (U(0, 1) init), ``ViTZoo.forward`` (query pass of the
  frozen ViT without prompts, then the prompted pass, head on the final [CLS]);
* ``models/vit.py``: ``VisionTransformer`` (prefix-tuning ``Attention``, the prompt loss summed over blocks);
* ``learners/prompt.py``: ``Prompt.update_model`` (CE over the current task's logits with the past ones at
  -inf, plus ``prompt_loss.sum()``; ``zero_grad``, ``backward``, ``step``) with the optimiser of
  ``Prompt.init_optimizer`` (Adam over ``prompt`` + ``last``, betas ``(momentum, 0.999)``);
  ``learners/default.py``: ``NormalNN.criterion``;
* ``utils/schedulers.py``: ``CosineSchedule``, stepped as ``learners/default.py`` ``learn_batch`` does
  (``if epoch > 0: self.scheduler.step()``).

The case.  Backbone: the official ``VisionTransformer`` built as ViT-Tiny/8 at 64 px (embed 192, depth 12,
3 heads) with the shared weights ``weights/vit-tiny-tinyimagenet100/vit_tiny_p8_64_tin100.safetensors``
(head dropped; the official class loads timm's key names unchanged).  ``ViTZoo`` itself hard-codes ViT-B/16
and downloads it, so its instance is assembled around that backbone (``ViTZoo.__new__`` + the attributes
its ``__init__`` sets: ``feat``, ``prompt``, ``last``, ``task_id``) and its own ``forward`` runs.  Two tasks
of two classes (4 classes, head ``Linear(192, 4)``), two Adam steps (lr 1e-3) per task (one for the
penalty case and Deep L2P++) on seeded random batches of 4 images, ``task_id`` set and ``process_task_count()`` called at task 1 as ``trainer.py`` does,
a fresh optimiser per task (``reset_optimizer``), and after each task an inference pass on 6 images.
Modules: ``L2P(192, 2, [10, 4, -1])`` (L2P++) and ``L2P(192, 2, [6, 2, 1])`` (Deep L2P++, blocks 0-4 with
their own keys; one step per task); ``DualPrompt(192, 2, [3, 4, 4])``; ``CodaPrompt(192, 2, [4, 2, 0.0])``
and ``CodaPrompt(192, 2, [4, 2, 0.5])`` (the orthogonality penalty on; same seed, so the same initial
parameters and Gram-Schmidt draws as the first, which are stored once).  The L2P/DualPrompt keys are
re-drawn from N(0, 1) after construction (U(0, 1) keys are nearly parallel and every query would pick the
same prompts; the stored initial parameters are these).

Stored per method (prefix ``<tag>/``): the module's and head's initial parameters; for task 1 of CODA-P the
parameters after ``process_task_count`` and the Gaussian draws its Gram-Schmidt made (and those of the
construction-time Gram-Schmidt of task 0's components); per step the logits
(before masking), the prompt loss, the total loss, the selected prompt indices (L2P/DualPrompt: every
``torch.topk`` the module called; CODA-P: the composition weights ``aq_k`` per block), the gradients of every
prompt/key/attention parameter and of the head after the backward, the parameters after the Adam step;
and the inference logits and selections after each task.  The schedule golden: the lr of every epoch
for K = 2, 5, 20, 50 epochs (K = 1 divides by zero in the official code).

Patched from the outside, nothing else: ``torch.Tensor.cuda`` returns a CPU copy (``vit.py`` and
``ortho_penalty`` call ``.cuda()``; a copy keeps vit.py's ``prompt_loss`` a non-leaf as on a GPU);
``torch.topk``/``torch.einsum``/``torch.randn_like`` are wrapped to *record* what the official modules
compute (indices, composition weights, Gram-Schmidt draws).
No extra packages (timm's deprecated ``timm.models.layers``/``helpers``/``registry`` shims import).

Run: ``python tools/reference/coda_prompt.py [--source DIR]`` (DIR: a checkout of the commit; default:
``models/ learners/ utils/ configs/`` extracted from the git mirror -- the local mirror lacks the blob of
``dataloaders/splits/domainnet_test.yaml``, which nothing here uses; see ``tools/reference/common.py``).  Writes
``tests/reference/coda_prompt_{l2p,l2p_deep,dualprompt,coda,schedule}.safetensors``; checked by
``tests/test_reference_prompts.py``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import imported_from, official_source, seed_everything, write_golden  # noqa: E402

REPOSITORY = "GT-RIPL/CODA-Prompt"
COMMIT = "6417d4f68754be68b697c7ca2323ee61e791e1a3"
FILES = ["models/zoo.py", "models/vit.py", "learners/prompt.py", "learners/default.py"]
WEIGHTS = Path("/work/shared/data/weights/vit-tiny-tinyimagenet100/vit_tiny_p8_64_tin100.safetensors")
SCRIPT = "tools/reference/coda_prompt.py"

DIM, N_TASKS, CLASSES_PER_TASK, BATCH, EVAL_BATCH, STEPS, LR = 192, 2, 2, 4, 6, 2, 1e-3
CASES = {  # tag: (zoo class, prompt_param, Adam steps per task)
    "l2p": ("L2P", [10, 4, -1], STEPS),
    "l2p_deep": ("L2P", [6, 2, 1], 1),
    "dualprompt": ("DualPrompt", [3, 4, 4], STEPS),
    "coda": ("CodaPrompt", [4, 2, 0.0], STEPS),
    "coda_ortho": ("CodaPrompt", [4, 2, 0.5], 1),
}
GOLDEN_OF = {"l2p": "coda_prompt_l2p", "l2p_deep": "coda_prompt_l2p_deep", "dualprompt": "coda_prompt_dualprompt", "coda": "coda_prompt_coda",
             "coda_ortho": "coda_prompt_coda"}


def load_backbone_weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(str(WEIGHTS))
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def case_inputs(seed: int = 1234) -> dict[str, torch.Tensor]:
    """The seeded batches: ``x/t{t}s{s}``, ``y/t{t}s{s}`` (classes of task t) and ``x_eval``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in range(N_TASKS):
        for s in range(STEPS):
            out[f"x/t{t}s{s}"] = torch.randn(BATCH, 3, 64, 64, generator=g)
            out[f"y/t{t}s{s}"] = t * CLASSES_PER_TASK + torch.randint(0, CLASSES_PER_TASK, (BATCH,), generator=g)
    out["x_eval"] = torch.randn(EVAL_BATCH, 3, 64, 64, generator=g)
    return out


def input_checks(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Not the images (too large): their labels and a fingerprint, so the test can confirm it regenerated
    the same batches with :func:`case_inputs`."""
    out = {k: v for k, v in inputs.items() if k.startswith("y/")}
    out.update({f"check/{k}": torch.stack([v.double().sum(), v.flatten()[:997].double().sum()])
                for k, v in inputs.items() if k.startswith("x")})
    return out


class Recorder:
    """Wraps ``torch.topk`` / ``torch.einsum`` / ``torch.randn_like`` to keep what the official code computed."""

    def __init__(self):
        self.topk: list[torch.Tensor] = []
        self.alpha: list[torch.Tensor] = []
        self.draws: list[torch.Tensor] = []
        self._orig = (torch.topk, torch.einsum, torch.randn_like)

    def __enter__(self):
        topk, einsum, randn_like = self._orig

        def rec_topk(*a, **k):
            r = topk(*a, **k)
            self.topk.append(r.indices.detach().clone())
            return r

        def rec_einsum(eq, *ops):
            r = einsum(eq, *ops)
            if eq == "bkd,kd->bk":  # CodaPrompt.forward: aq_k, the composition weights
                self.alpha.append(r.detach().clone())
            return r

        def rec_randn_like(*a, **k):
            r = randn_like(*a, **k)
            self.draws.append(r.detach().clone())
            return r

        torch.topk, torch.einsum, torch.randn_like = rec_topk, rec_einsum, rec_randn_like
        return self

    def __exit__(self, *exc):
        torch.topk, torch.einsum, torch.randn_like = self._orig

    def take(self) -> dict[str, list[torch.Tensor]]:
        out = {"topk": self.topk, "alpha": self.alpha, "draws": self.draws}
        self.topk, self.alpha, self.draws = [], [], []
        return out


def run_case(tag: str, zoo, vit_mod, learners_prompt, learners_default, inputs, backbone_sd) -> dict[str, torch.Tensor]:
    cls_name, prompt_param, steps = CASES[tag]
    out: dict[str, torch.Tensor] = {}
    seed_everything(0)
    vit = vit_mod.VisionTransformer(img_size=64, patch_size=8, embed_dim=DIM, depth=12, num_heads=3,
                                    ckpt_layer=0, drop_path_rate=0)
    vit.load_state_dict(backbone_sd)
    seed_everything(0)
    rec = Recorder()
    with rec:
        module = getattr(zoo, cls_name)(DIM, N_TASKS, prompt_param, key_dim=DIM)
    init_draws = rec.take()["draws"]  # CodaPrompt.__init__: per block P, K, A of task 0, pool/n_tasks vectors each
    if cls_name in ("L2P", "DualPrompt"):
        # tensor_prompt's U(0, 1) keys are nearly parallel, so every query picks the same prompts; N(0, 1) keys
        # (stored as the initial parameters like everything else) make the selection differ by sample and block
        with torch.no_grad():
            for layer in module.e_layers:
                getattr(module, f"e_k_{layer}").normal_()
    head = nn.Linear(DIM, N_TASKS * CLASSES_PER_TASK)
    model = zoo.ViTZoo.__new__(zoo.ViTZoo)
    nn.Module.__init__(model)
    model.feat, model.prompt, model.last, model.task_id = vit, module, head, None
    for p in vit.parameters():  # only prompt + last are optimised (Prompt.init_optimizer)
        p.requires_grad_(False)

    def params() -> dict[str, torch.Tensor]:
        d = {f"prompt.{n}": p for n, p in module.named_parameters()}
        d.update({f"last.{n}": p for n, p in head.named_parameters()})
        return d

    light = tag == "coda_ortho"  # same seed and draws as "coda": its initial parameters and draws are stored once
    if not light:
        for n, p in params().items():
            out[f"{tag}/init/{n}"] = p.detach().clone()
        if init_draws:
            pt, n_layers = module.e_pool_size // N_TASKS, len(module.e_layers)
            assert len(init_draws) == 3 * pt * n_layers, "a Gram-Schmidt restart drew extra vectors"
            for j, kind in enumerate("pka"):
                out[f"{tag}/t0/gs_draws/{kind}"] = torch.stack(
                    [torch.stack(init_draws[(3 * layer + j) * pt:(3 * layer + j + 1) * pt]) for layer in range(n_layers)])

    for t in range(N_TASKS):
        model.task_id = t  # trainer.py: self.learner.model.task_id = i
        if t > 0:
            with rec:
                module.process_task_count()  # trainer.py: at each task i > 0
            draws = rec.take()["draws"]
            if draws and not light:  # CodaPrompt.process_task_count: per block K, A, P, each pool/n_tasks vectors drawn
                pt, n_layers = len(module.e_layers) and module.e_pool_size // N_TASKS, len(module.e_layers)
                assert len(draws) == 3 * pt * n_layers, "a Gram-Schmidt restart drew extra vectors"
                for j, kind in enumerate("kap"):
                    out[f"{tag}/t{t}/gs_draws/{kind}"] = torch.stack(
                        [torch.stack(draws[(3 * layer + j) * pt:(3 * layer + j + 1) * pt]) for layer in range(n_layers)])
            for n, p in params().items():
                out[f"{tag}/t{t}/start/{n}"] = p.detach().clone()
        valid, last_valid = (t + 1) * CLASSES_PER_TASK, t * CLASSES_PER_TASK
        learner = types.SimpleNamespace(valid_out_dim=valid, last_valid_out_dim=last_valid,
                                        dw_k=torch.ones(valid + 1), criterion_fn=nn.CrossEntropyLoss(reduction="none"))
        learner.criterion = functools.partial(learners_default.NormalNN.criterion, learner)
        learner.optimizer = torch.optim.Adam(list(module.parameters()) + list(head.parameters()), lr=LR,
                                             betas=(0.9, 0.999), weight_decay=0)  # a fresh one per task
        seen: dict[str, torch.Tensor] = {}

        def recording_model(inputs_, train=False, pen=False):
            logits, prompt_loss = model(inputs_, train=train, pen=pen)
            seen["logits"], seen["prompt_loss"] = logits.detach().clone(), prompt_loss.detach().clone()
            return logits, prompt_loss

        learner.model = recording_model
        model.train()
        for s in range(steps):
            key = f"{tag}/t{t}s{s}"
            with rec:
                loss, _ = learners_prompt.Prompt.update_model(learner, inputs[f"x/t{t}s{s}"], inputs[f"y/t{t}s{s}"])
            r = rec.take()
            out[f"{key}/logits"], out[f"{key}/prompt_loss"], out[f"{key}/loss"] = seen["logits"], seen["prompt_loss"], loss
            if r["topk"]:
                out[f"{key}/topk"] = torch.stack(r["topk"])  # [calls (one per keyed block), B, k]
            if r["alpha"]:
                out[f"{key}/alpha"] = torch.stack(r["alpha"])  # [blocks, B, M']
            for n, p in params().items():
                if p.grad is not None:
                    out[f"{key}/grad/{n}"] = p.grad.detach().clone()
            for n, p in params().items():  # after the Adam step
                out[f"{key}/after/{n}"] = p.detach().clone()
        model.eval()
        with rec, torch.no_grad():
            logits = model(inputs["x_eval"])
        r = rec.take()
        out[f"{tag}/t{t}/eval/logits"] = logits
        if r["topk"]:
            out[f"{tag}/t{t}/eval/topk"] = torch.stack(r["topk"])
        if r["alpha"]:
            out[f"{tag}/t{t}/eval/alpha"] = torch.stack(r["alpha"])
    return out


def schedule_golden(schedulers) -> dict[str, torch.Tensor]:
    out = {}
    for K in (2, 5, 20, 50):
        opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=LR)
        sched = schedulers.CosineSchedule(opt, K=K)
        lrs = []
        for epoch in range(K):  # learners/default.py learn_batch
            if epoch > 0:
                sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        out[f"lr/K{K}"] = torch.tensor(lrs, dtype=torch.float64)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default=None, help="a checkout of GT-RIPL/CODA-Prompt at the pinned commit")
    args = ap.parse_args()
    src = official_source(REPOSITORY, COMMIT, args.source, paths=("models", "learners", "utils", "configs"))
    torch.set_num_threads(1)
    # vit.py / ortho_penalty call .cuda(); on CPU a copy stands for the device copy (vit.py's
    # ``torch.zeros((1,), requires_grad=True).cuda()`` must be a non-leaf, as on a GPU, for its ``+=``)
    torch.Tensor.cuda = lambda self, *a, **k: self.clone()
    inputs = case_inputs()
    backbone_sd = load_backbone_weights()
    goldens: dict[str, dict[str, torch.Tensor]] = {}
    with imported_from(src, "models", "learners", "utils", "dataloaders"):
        from models import vit as vit_mod, zoo
        from learners import default as learners_default, prompt as learners_prompt
        from utils import schedulers

        for tag in CASES:
            goldens.setdefault(GOLDEN_OF[tag], input_checks(inputs)).update(
                run_case(tag, zoo, vit_mod, learners_prompt, learners_default, inputs, backbone_sd))
        sched = schedule_golden(schedulers)
    extra = {"dim": DIM, "n_tasks": N_TASKS, "classes_per_task": CLASSES_PER_TASK, "batch": BATCH,
             "steps": STEPS, "lr": LR, "adam_betas": [0.9, 0.999], "weights": str(WEIGHTS.relative_to(WEIGHTS.parents[2])),
             "cases": {t: {"class": c, "prompt_param": p, "steps": n} for t, (c, p, n) in CASES.items()}}
    notes = ("official modules run on the shared ViT-Tiny/8 (64 px) loaded into the official VisionTransformer; "
             "inputs: case_inputs(seed 1234) (labels and a fingerprint stored); see the script's docstring")
    for name, tensors in goldens.items():
        write_golden(name, tensors, repository=REPOSITORY, commit=COMMIT, files=FILES, script=SCRIPT,
                     notes=notes, extra={**extra, "tags": [t for t in CASES if GOLDEN_OF[t] == name]})
    write_golden("coda_prompt_schedule", sched, repository=REPOSITORY, commit=COMMIT,
                 files=["utils/schedulers.py", "learners/default.py"], script=SCRIPT,
                 notes="CosineSchedule lr per epoch, stepped at the start of every epoch after the first",
                 extra={"Ks": [2, 5, 20, 50], "base_lr": LR})


if __name__ == "__main__":
    main()
