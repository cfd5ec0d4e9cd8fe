"""Golden figures for OnePrompt and VOR from the official OVOR code.

Repository ``jpmorganchase/ovor`` at commit ``4f59b75`` (2024-04-08; a fork of CODA-Prompt that adds
OnePrompt and VOR).  Official code exercised (imported from the checkout and run, never copied):

* ``learners/ood.py``: ``NPOS._generate`` / ``_boundary`` / ``_select_ood`` (virtual outlier
  synthesis, faiss exact kNN) and ``NPOS.loss`` (the energy regulariser);
* ``learners/default.py``: ``NormalNN._train_one_epoch_ood`` (the VOR head-training step: CE over
  the seen classes with the past masked + the energy terms, Adam) and ``NormalNN._train_one_epoch``,
  ``init_optimizer`` (Adam, betas (momentum, 0.999)), via ``learners/prompt.py`` ``OnePrompt``
  (``_get_learnable_params``: prompt + head);
* ``models/zoo.py``: ``OnePrompt`` (prompt module, ``tensor_prompt``'s U(0, 1) init) and
  ``ViTZoo.forward`` (one prompted forward, ``q = zeros``); ``models/vit.py``: ``VisionTransformer``
  with prefix-tuning ``Attention``; ``utils/schedulers.py``: ``CosineSchedule``.

Cases (all seeded; the golden stores every input so the test needs no RNG agreement):

``ovor_vor_outliers``: two VOR outlier syntheses on seeded class-clustered "features" (D = 32,
3 classes x 40 and 2 classes x 30 samples, K = 10, select = 8 / 80 (more than N), sample_from = 30,
cov = 0.1, num_per_class = 12 / 40): the features, the one draw of offsets, the boundary indices
``_boundary`` returns and the outliers ``_generate`` returns; and the outlier batches that
``NPOS.generate``'s loaders give the ID batches of an epoch (id_bsz 16), zipped as in
``_train_one_epoch_ood``.  The released code draws its offsets
with ``MultivariateNormal(0, I).rsample((sample_from,))`` from torch's global generator; with an
identity covariance that is exactly ``torch.randn(sample_from, D)`` (``normal_`` times the identity
Cholesky factor plus 0), so the test replays it with ``torch.Generator().manual_seed(seed)``.

``ovor_vor_step``: three VOR head-training steps of ``_train_one_epoch_ood`` (task 2 of a
10-class head: past classes 0-3, current 4-6, unseen 7-9; 12 ID features per batch with 4 outliers
each; Adam lr 1e-3): per step the loss, ``NPOS.loss``'s energy term, the head gradients, and the
head after the steps; and the lr of each of the 50 epochs of ``--epochs 0 40 10`` as the official
``NormalNN.train`` loop steps ``CosineSchedule`` (run over empty loaders).

``ovor_oneprompt``: OnePrompt (``prompt_param 10 40 10``: length 10 in blocks 0-1, 40 in blocks 2-4)
on the shared ViT-Tiny/8 (``/work/shared/data/weights/vit-tiny-tinyimagenet100``, loaded into the
official ``models/vit.py`` VisionTransformer built with img_size 64, patch 8, dim 192, depth 12,
3 heads): two epochs of two batches of 2 seeded images through ``_train_one_epoch`` (task 2 of a
10-class head, current classes 4-6, Adam lr 1e-3, ``CosineSchedule`` with K = 2 epochs): the
initial prompts (the official U(0, 1) init rounded to fp16 so that it is stored exactly) and head,
per step the logits, the loss and the gradient norms, the full prompt/head gradients of the first
step, and the parameters after the 4 steps.

Run as-is on CPU with these patches from the outside (nothing in the checkout is edited):
``torch.Tensor.cuda`` returns a copy and ``nn.Module.cuda`` the module (a CPU tensor's ``.cuda()``
is a copy too, which the in-place ``prompt_loss +=`` of ``models/vit.py`` relies on);
``NPOS``'s hard-coded 768-d ``faiss.IndexFlatL2`` and ``MultivariateNormal`` are replaced by D-d
ones after construction; learners and the ``ViTZoo`` are assembled with ``__new__`` and their
attributes (``NormalNN.__init__`` needs a GPU and ``ViTZoo.__init__`` downloads ViT-B/16 weights),
a logger stub records the losses, and ``_get_ood_samples`` (the feature pass over a dataloader of
images) is replaced by loaders over the stored features.  ``faiss`` is not a clbench dependency:
run the script in a scratch venv with ``pip install faiss-cpu`` (1.15.1 used; the released code
pins faiss-gpu 1.7.2, exact search either way).  timm: the installed 1.0 (the release pins 0.4.12;
only ``PatchEmbed``, ``DropPath`` and ``trunc_normal_`` are used, whose maths is unchanged).

Run:  python tools/reference/ovor.py [--source DIR]   (DIR: a clone of jpmorganchase/ovor at 4f59b75)
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.reference.common import imported_from, official_source, seed_everything, write_golden  # noqa: E402

REPOSITORY = "jpmorganchase/ovor"
COMMIT = "4f59b75"
SCRIPT = "tools/reference/ovor.py"
VIT_TINY = Path("/work/shared/data/weights/vit-tiny-tinyimagenet100/vit_tiny_p8_64_tin100.safetensors")

VOR_CASES = [  # name, seed, classes x samples, D, K, select, sample_from, cov, num_per_class
    dict(tag="a", seed=11, n_cls=3, per_cls=40, dim=32, K=10, select=8, sample_from=30, cov=0.1, per_class=12, id_bsz=16),
    dict(tag="b", seed=12, n_cls=2, per_cls=30, dim=32, K=10, select=80, sample_from=30, cov=0.1, per_class=40, id_bsz=16),
]


def patch_cuda() -> None:
    torch.Tensor.cuda = lambda self, *a, **k: self.clone()  # a CPU tensor's .cuda() is a copy
    nn.Module.cuda = lambda self, *a, **k: self


def id_features(case: dict) -> torch.Tensor:
    """Class-clustered 'features' with ViT-like norms (~8): class centres + per-sample noise."""
    g = torch.Generator().manual_seed(case["seed"] + 1000)
    centres = 6.0 * torch.nn.functional.normalize(torch.randn(case["n_cls"], case["dim"], generator=g), dim=1)
    noise = 2.0 * torch.randn(case["n_cls"] * case["per_cls"], case["dim"], generator=g)
    return centres.repeat_interleave(case["per_cls"], 0) + noise


def npos(ood, faiss, dim: int, **cfg):
    from torch.distributions import MultivariateNormal

    gen = ood.NPOS(cfg)
    gen.knn_idx = faiss.IndexFlatL2(dim)  # the code hard-codes 768 (ViT-B/16)
    gen.dis = MultivariateNormal(torch.zeros(dim), torch.eye(dim))
    return gen


def vor_outliers(src: Path) -> None:
    import faiss

    tensors, extra = {}, {}
    with imported_from(src, "learners", "models", "utils"):
        from learners import ood

        for case in VOR_CASES:
            t = case["tag"]
            feats = id_features(case)
            gen = npos(ood, faiss, case["dim"], K=case["K"], sample_from=case["sample_from"], select=case["select"],
                       cov=case["cov"], num_per_class=case["per_class"])
            seen = {}
            boundary = gen._boundary
            gen._boundary = lambda ids, select: seen.setdefault("ids", boundary(ids, select))
            rsample = gen.dis.rsample
            gen.dis.rsample = lambda shape: seen.setdefault("offsets", rsample(shape))
            seed_everything(case["seed"])
            outliers = gen._generate(feats, case["n_cls"])
            tensors.update({f"{t}/features": feats, f"{t}/offsets": seen["offsets"], f"{t}/boundary_ids": seen["ids"],
                            f"{t}/outliers": outliers})
            # NPOS.generate (per-class feature list -> ID loader + outlier loader), zipped as _train_one_epoch_ood does
            gen = npos(ood, faiss, case["dim"], K=case["K"], sample_from=case["sample_from"], select=case["select"],
                       cov=case["cov"], num_per_class=case["per_class"], id_bsz=case["id_bsz"])
            seed_everything(case["seed"])
            id_loader, ood_loader = gen.generate(list(feats.split(case["per_cls"])), subset_start=0)
            used = [oods[0] for (_, _), oods in zip(id_loader, ood_loader)]
            assert torch.equal(ood_loader.dataset.tensors[0], outliers)  # the same synthesis as above
            tensors[f"{t}/generate_ood_batches"] = torch.cat(used)
            tensors[f"{t}/generate_ood_batch_sizes"] = torch.tensor([len(u) for u in used])
            extra[t] = case
            distinct = len(torch.unique(outliers, dim=0))
            print(f"case {t}: {outliers.shape[0]} outliers, {distinct} distinct, norms "
                  f"{outliers.norm(dim=1).mean():.3f} (ID {feats.norm(dim=1).mean():.3f}), boundary {seen['ids'].tolist()}")
    write_golden("ovor_vor_outliers", tensors, repository=REPOSITORY, commit=COMMIT, script=SCRIPT,
                 files=["learners/ood.py", "learners/default.py"], extra={"cases": extra},
                 notes="NPOS._generate on seeded features; offsets = torch.randn(sample_from, D) after torch.manual_seed(seed)")


class _Meter:
    def __init__(self, log=None):
        self.log = log

    def reset(self):
        pass

    def add(self, value, n=1):
        if self.log is not None:
            self.log.append(value)


def _logger(losses: list) -> types.SimpleNamespace:
    return types.SimpleNamespace(train_loss=_Meter(losses), train_acc=_Meter(), memory=_Meter(), id_score=_Meter(),
                                 ood_score=_Meter(), get_memory_usage=lambda: 0, step=0)


def _learner(prompt_mod, zoo, model: nn.Module, *, out_dim: int, start: int, end: int, epochs: list, losses: list):
    learner = prompt_mod.OnePrompt.__new__(prompt_mod.OnePrompt)
    nn.Module.__init__(learner)
    learner.logger = _logger(losses)
    learner.out_dim, learner.bsz = out_dim, 4
    learner.opt_cfg = {"optimizer": "Adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 0, "scheduler": "cosine"}
    learner.subset_start, learner.subset_end, learner.epochs = start, end, epochs
    learner.model = nn.DataParallel(model)  # on a CPU-only machine: a plain pass-through to .module
    learner.criterion = nn.CrossEntropyLoss()
    return learner


def _zoo(zoo, feat: nn.Module | None, prompt: nn.Module | None, last: nn.Linear) -> nn.Module:
    model = zoo.ViTZoo.__new__(zoo.ViTZoo)
    nn.Module.__init__(model)
    model.prompt_flag = "oneprompt" if prompt is not None else False
    model.feat, model.prompt, model.last = feat, prompt, last
    return model


def _record_steps(learner, params: dict[str, nn.Parameter], grads: list) -> None:
    step = learner.optimizer.step

    def recording_step(*a, **k):
        grads.append({n: p.grad.detach().clone() for n, p in params.items()})
        return step(*a, **k)

    learner.optimizer.step = recording_step


def vor_step(src: Path) -> None:
    import faiss

    dim, out_dim, start, end, bsz, ood_bsz = 16, 10, 4, 7, 12, 4
    g = torch.Generator().manual_seed(21)
    ids = 3.0 * torch.randn(3 * bsz, dim, generator=g)
    targets = torch.randint(start, end, (3 * bsz,), generator=g)
    oods = 0.3 * torch.randn(3 * ood_bsz, dim, generator=g)
    torch.manual_seed(22)
    last = nn.Linear(dim, out_dim)
    with torch.no_grad():
        last.weight.mul_(8.0)  # energies on both sides of the margins -15 / -3
        last.bias.copy_(torch.randn(out_dim, generator=g) * 4.0)
    init = {k: v.detach().clone() for k, v in last.state_dict().items()}
    losses, grads, ood_losses = [], [], []
    with imported_from(src, "learners", "models", "utils"):
        from learners import prompt as prompt_mod
        from models import zoo
        from torch.utils.data import DataLoader, TensorDataset

        model = _zoo(zoo, None, None, last)
        from learners import ood

        # OVOR's ImageNet-R epochs 0 40 10: CosineSchedule(K=50); the VOR epoch steps the scheduler once first
        learner = _learner(prompt_mod, zoo, model, out_dim=out_dim, start=start, end=end, epochs=[0, 40, 10], losses=losses)
        learner._get_learnable_params = lambda: list(last.parameters())  # ViTZoo without prompt: the head only
        learner.init_optimizer()
        learner.ood = npos(ood, faiss, dim, lmda=0.1, thres_id=-15.0, thres_ood=-3.0)
        loss_fn = learner.ood.loss
        learner.ood.loss = lambda a, b: (lambda r: (ood_losses.append(r[0].detach().clone()), r)[1])(loss_fn(a, b))
        learner._get_ood_samples = lambda dataloader: (
            DataLoader(TensorDataset(ids, targets), batch_size=bsz, shuffle=False),
            DataLoader(TensorDataset(oods), batch_size=ood_bsz))
        _record_steps(learner, dict(last.named_parameters()), grads)
        learner._train_one_epoch_ood(None, 40)
        lr = learner.optimizer.param_groups[0]["lr"]
    schedule = vor_schedule(src, [0, 40, 10])
    print("lr per epoch (epochs 0 40 10):", [round(v, 7) for v in schedule.tolist()[:3]], "...", schedule[-1].item())
    tensors = {"ids": ids, "targets": targets, "oods": oods, "init/weight": init["weight"], "init/bias": init["bias"],
               "schedule/epochs_0_40_10": schedule,
               "loss": torch.tensor(losses), "energy_loss": torch.stack(ood_losses),
               "final/weight": last.weight.detach(), "final/bias": last.bias.detach(), "lr": torch.tensor(lr, dtype=torch.float64)}
    for i, gr in enumerate(grads):
        tensors.update({f"step{i}/grad_weight": gr["weight"], f"step{i}/grad_bias": gr["bias"]})
    print("VOR step losses", losses, "energy terms", [float(x) for x in ood_losses])
    write_golden("ovor_vor_step", tensors, repository=REPOSITORY, commit=COMMIT, script=SCRIPT,
                 files=["learners/default.py", "learners/ood.py", "learners/prompt.py", "models/zoo.py", "utils/schedulers.py"],
                 extra={"out_dim": out_dim, "subset_start": start, "subset_end": end, "id_bsz": bsz, "ood_bsz": ood_bsz,
                        "lr": 1e-3, "betas": [0.9, 0.999], "lmda": 0.1, "thres_id": -15.0, "thres_ood": -3.0},
                 notes="NormalNN._train_one_epoch_ood, 3 steps on stored features (no shuffle), Adam lr 1e-3")


def vor_schedule(src: Path, epochs: list) -> torch.Tensor:
    """The lr of each epoch as the released ``NormalNN.train`` steps ``CosineSchedule(K = sum(epochs))``
    for ``--epochs E0 E1 E2`` (regular epochs step it when epoch > 0, every VOR epoch steps it): the
    official ``train`` loop over an empty dataloader and empty outlier loaders."""
    lrs = []
    with imported_from(src, "learners", "models", "utils"):
        from learners import prompt as prompt_mod
        from models import zoo

        last = nn.Linear(2, 2)
        learner = _learner(prompt_mod, zoo, _zoo(zoo, None, None, last), out_dim=2, start=0, end=2, epochs=epochs,
                           losses=[])
        learner.logger.timer = types.SimpleNamespace(tic=lambda: None, toc=lambda: 0.0)
        learner.logger.train_time = _Meter()
        learner._get_learnable_params = lambda: list(last.parameters())
        learner._get_ood_samples = lambda dataloader: ([], [])
        for name in ("_train_one_epoch", "_train_one_epoch_ood"):
            method = getattr(learner, name)

            def recording(*a, _method=method, **k):
                out = _method(*a, **k)
                lrs.append(learner.optimizer.param_groups[0]["lr"])
                return out

            setattr(learner, name, recording)
        learner.train([], task=0)
    assert len(lrs) == sum(epochs)
    return torch.tensor(lrs, dtype=torch.float64)


def oneprompt(src: Path) -> None:
    from safetensors.torch import load_file

    out_dim, start, end, bsz, n_batches, epochs = 10, 4, 7, 2, 2, [0, 2, 0]
    g = torch.Generator().manual_seed(31)
    images = torch.randn(n_batches, bsz, 3, 64, 64, generator=g).half().float()  # stored as fp16, exactly
    targets = torch.randint(start, end, (n_batches, bsz), generator=g)
    weights = {k: v.float() for k, v in load_file(str(VIT_TINY)).items() if not k.startswith("head.")}
    losses, grads, logits = [], [], []
    with imported_from(src, "learners", "models", "utils"):
        from learners import prompt as prompt_mod
        from models import vit, zoo

        feat = vit.VisionTransformer(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3, drop_path_rate=0)
        feat.load_state_dict(weights, strict=True)
        seed_everything(32)
        prompt = zoo.OnePrompt(192, 10, [10, 40, 10])  # as ViTZoo builds it: (emb_d, n_tasks, prompt_param 10 40 10)
        last = nn.Linear(192, out_dim)
        with torch.no_grad():  # fp16-representable U(0, 1) prompts: stored as fp16 without loss
            for p in prompt.parameters():
                p.copy_(p.half().float())
        init = {f"prompt/{k}": v.detach().clone() for k, v in prompt.state_dict().items()}
        init.update({f"last/{k}": v.detach().clone() for k, v in last.state_dict().items()})
        model = _zoo(zoo, feat, prompt, last)
        for p in feat.parameters():
            p.requires_grad_(False)  # not optimised by the learner either way; saves the backbone's grads
        learner = _learner(prompt_mod, zoo, model, out_dim=out_dim, start=start, end=end, epochs=epochs, losses=losses)
        learner.init_optimizer()  # Adam over Prompt._get_learnable_params(): prompt + last, CosineSchedule(K=2)
        params = {f"prompt/{n}": p for n, p in prompt.named_parameters()}
        params.update({f"last/{n}": p for n, p in last.named_parameters()})
        _record_steps(learner, params, grads)
        last.register_forward_hook(lambda m, i, o: logits.append(o.detach().clone()))
        loader = [(images[b], targets[b], None) for b in range(n_batches)]
        model.train()
        lrs = []
        for e in range(sum(epochs)):
            learner._train_one_epoch(loader, e)
            lrs.append(learner.optimizer.param_groups[0]["lr"])
        final = {f"final/prompt/{k}": v.detach().clone() for k, v in prompt.state_dict().items()}
        final.update({f"final/last/{k}": v.detach().clone() for k, v in last.state_dict().items()})
    tensors = {"images": images.half(), "targets": targets, "loss": torch.tensor(losses),
               "lr": torch.tensor(lrs, dtype=torch.float64),
               **{f"init/{k}": v.half() if k.startswith("prompt/") else v for k, v in init.items()}, **final}
    for i, (gr, lo) in enumerate(zip(grads, logits)):  # full gradients at the first step, their norms at every step
        tensors[f"step{i}/logits"] = lo
        tensors.update({f"step{i}/grad_norm/{k}": v.norm() for k, v in gr.items()})
        if i == 0:
            tensors.update({f"step{i}/grad/{k}": v for k, v in gr.items()})
    print("OnePrompt losses", losses, "lrs", lrs)
    write_golden("ovor_oneprompt", tensors, repository=REPOSITORY, commit=COMMIT, script=SCRIPT,
                 files=["models/zoo.py", "models/vit.py", "learners/default.py", "learners/prompt.py", "utils/schedulers.py"],
                 extra={"out_dim": out_dim, "subset_start": start, "subset_end": end, "batch_size": bsz,
                        "epochs": epochs, "lr": 1e-3, "betas": [0.9, 0.999], "prompt_param": [10, 40, 10],
                        "weights": "vit-tiny-tinyimagenet100/vit_tiny_p8_64_tin100.safetensors"},
                 notes="NormalNN._train_one_epoch x 2 epochs x 2 batches; logits are the head's output before slicing")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", help=f"a clone of {REPOSITORY} at {COMMIT}")
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = official_source(REPOSITORY, COMMIT, args.source)
    patch_cuda()
    vor_outliers(src)
    vor_step(src)
    oneprompt(src)


if __name__ == "__main__":
    main()
