"""Golden for SLCA: the official learner (slow learner, class statistics, classifier alignment) over 2 tasks.

Official code: ``GengDavid/SLCA`` @ 169d4e6b91e3ca30caa717200c1944981c4426d1 (2024-08-17), run unmodified:
``models/slca.py::SLCA`` (``incremental_train``: ``_stage1_training``/``_run`` with the slow-learner param
groups and MultiStepLR, ``fc.backup()``, ``_compute_class_mean``, ``_stage2_compact_classifier``;
``after_task``: ``fc.recall()``), ``models/base.py::BaseLearner._compute_class_mean`` / ``_extract_vectors``,
``utils/inc_net.py::FinetuneIncrementalNet``, ``convs/linears.py::SimpleContinualLinear`` and
``convs/vits.py::vit_base_patch16_224_in21k`` (the constructor that deletes the checkpoint's final LayerNorm and
re-creates ``nn.LayerNorm(768)``) over ``convs/vits.py::VisionTransformer``.  ``exps/slca/*.json`` and the
module globals of ``models/slca.py`` are recorded (``extra["recipes"]``) for the repro-config test.

The case: the shared ViT-Tiny/8 (``/work/shared/data/weights/vit-tiny-tinyimagenet100``, 12 blocks, 192-d) loaded
into the **official** ``VisionTransformer`` class (all keys match), 4 classes in 2 tasks of 2, 4 seeded 64x64
uint8 images per class (stored), normalised with the ImageNet mean/std the weights expect; ``epochs=2``,
``milestones=[1]`` (x0.1 in the second epoch), lr 0.01, ``bcb_lrscale`` 1/100 (default), stage-1 batch 4 (2
iterations per epoch; the official loader's shuffled order is recorded), ``ca_epochs=5``,
``ca_with_logit_norm=0.1`` (the official 256 samples per class per epoch, 4 mini-batches of 256 per epoch).

Outside patches (behaviour-neutral, or stand-ins for what a CPU without downloads cannot do):

* ``timm.models.layers.weight_init`` (gone in timm >= 0.9) is aliased to ``timm.layers.weight_init``.
* ``convs.vits._create_vision_transformer`` (timm's ``build_model_with_cfg`` + download of the IN-21k npz) is
  replaced by: the official ``VisionTransformer(img_size=64, patch_size=8, embed_dim=192, depth=12,
  num_heads=3)`` with the shared ViT-Tiny/8 weights loaded.  The official ``vit_base_patch16_224_in21k`` body
  then runs as released (``del model.head; del model.norm; model.norm = nn.LayerNorm(768)``); its hard-coded
  768 is mapped to 192 by a proxy of ``torch.nn`` in ``convs.vits`` (every other attribute is torch.nn's).
  Separately the released constructor is run on the real ViT-B/16 architecture (random init, the same
  stand-in without weights) and its re-created norm recorded (``extra["in21k_norm"]``).
* ``DataLoader`` in ``models/base.py`` and ``models/slca.py`` runs with ``num_workers=0``; the stage-1
  ``batch_size`` global is 4; ``save_checkpoint`` is a no-op; ``_compute_accuracy`` (logging only) is a no-op
  during the classifier alignment, so no DataLoader iteration draws from the global RNG there.
* The global RNG is seeded with ``CA_SEED`` right before ``_stage2_compact_classifier``; clbench's test
  gives its alignment a generator seeded with the same value, and draws in the same order
  (``MultivariateNormal.sample`` per class = one ``randn``, then ``randperm``), so both see the same samples.
* Recording only (results unchanged): ``F.cross_entropy`` in ``models/slca.py`` (losses), ``optim.SGD``
  there (the lr of each group at every step), ``update_fc`` (initial heads), ``fc.backup`` (heads after
  stage 1), ``_extract_vectors`` (the features behind the statistics), ``_compute_class_mean`` (means, covs).

Golden ``tests/reference/slca.safetensors``: ``images``/``labels``; ``feats_init`` (features of all images
after the norm re-creation, before training); per task t: ``head_init_t{t}_w/_b``, ``order_t{t}`` (stage-1
sample order, ``[epochs * iters, batch]``), ``loss_stage1_t{t}``, ``lr_stage1_t{t}`` (``[steps, 2]``: backbone,
head), ``heads_stage1_t{t}_h{k}_w/_b`` (all heads after stage 1), ``norm_w_t{t}``/``norm_b_t{t}`` (the
re-created final LayerNorm after stage 1), ``feats_stats_t{t}`` (features of the task's classes, eval mode),
``means``/``cov_diag``/``cov_proj`` (= cov @ ``proj``)/``cov_block`` (``[:, :8, :8]``) of all 4 classes,
``ca_first`` (the first 4 rows of the first alignment mini-batch), ``loss_ca`` (20 steps), ``lr_ca``,
``aligned_h{k}_w/_b``, ``logits_aligned`` (the official network on all images after alignment) and
``recalled_h{k}_w/_b`` (after ``after_task``).

Run: ``python tools/reference/slca.py [--source DIR]`` (CPU, ~1 min; needs timm, scipy).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import imported_from, official_source, seed_everything, write_golden  # noqa: E402

REPOSITORY = "GengDavid/SLCA"
COMMIT = "169d4e6b91e3ca30caa717200c1944981c4426d1"
FILES = ["models/slca.py", "models/base.py", "utils/inc_net.py", "convs/linears.py", "convs/vits.py",
         "exps/slca/*.json"]
WEIGHTS = Path("/work/shared/data/weights/vit-tiny-tinyimagenet100/vit_tiny_p8_64_tin100.safetensors")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
N_PER_CLASS, CLASSES, TASK_SIZE = 4, 4, 2
EPOCHS, MILESTONES, BATCH, CA_EPOCHS, LOGIT_NORM = 2, [1], 4, 5, 0.1
SEED, CA_SEED = 1993, 20231
TINY = dict(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3)


def make_images() -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes x 4 images: seeded noise around a class colour (uint8 [16, 3, 64, 64])."""
    g = torch.Generator().manual_seed(7)
    colours = torch.rand(CLASSES, 3, 1, 1, generator=g) * 160 + 48
    labels = torch.arange(CLASSES).repeat_interleave(N_PER_CLASS)
    noise = torch.randn(len(labels), 3, 64, 64, generator=g) * 40
    images = (colours[labels] + noise).round().clamp(0, 255).to(torch.uint8)
    return images, labels


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class Dataset(torch.utils.data.Dataset):
    """PyCIL's dataset contract: items ``(index, image, label)``; records the order a loader reads."""

    def __init__(self, idx: np.ndarray, x: torch.Tensor, y: torch.Tensor, log: list | None):
        self.idx, self.x, self.y, self.log = idx, x, y, log

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        j = int(self.idx[i])
        if self.log is not None:
            self.log.append(j)
        return j, self.x[j], int(self.y[j])


class DataManager:
    """The ``utils/data_manager.py::DataManager`` calls ``SLCA`` makes, over the in-memory images."""

    dataset_name = "reference"

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y
        self.train_log: list[int] = []

    def get_task_size(self, task):
        return TASK_SIZE

    def get_dataset(self, indices, source, mode, appendent=None, with_raw=False, ret_data=False):
        rows = np.nonzero(np.isin(self.y.numpy(), indices))[0]
        ds = Dataset(rows, self.x, self.y, self.train_log if mode == "train" else None)
        return (self.x[rows].numpy(), self.y[rows].numpy(), ds) if ret_data else ds


def no_workers(loader_cls):
    return lambda *a, **k: loader_cls(*a, **{**k, "num_workers": 0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", help=f"a checkout of {REPOSITORY} at {COMMIT[:7]}")
    args_cli = parser.parse_args()
    src = official_source(REPOSITORY, COMMIT, args_cli.source)
    torch.set_num_threads(1)

    import timm.layers.weight_init
    import timm.models.layers  # noqa: F401  (the deprecated path the official code imports)
    from safetensors.torch import load_file

    sys.modules["timm.models.layers.weight_init"] = timm.layers.weight_init
    images, labels = make_images()
    x_all = normalise(images)
    weights = {k: v.float() for k, v in load_file(str(WEIGHTS)).items()}
    recipes = {p.stem: json.loads(p.read_text()) for p in sorted((src / "exps" / "slca").glob("*.json"))}

    with imported_from(src, "models", "utils", "convs", "evaluator", "trainer"):
        import convs.vits as vits
        import models.base as base
        import models.slca as slca
        import utils.inc_net as inc_net
        from convs.linears import SimpleContinualLinear

        recipes["_module_globals"] = {k: getattr(slca, k) for k in
                                      ("epochs", "lrate", "milestones", "lrate_decay", "batch_size", "weight_decay",
                                       "ca_epochs")}

        # ---- stand-in for timm's builder + IN-21k download; the released constructor body runs after it
        state = {"tiny": True}

        def create(variant, pretrained=False, **kwargs):
            if not state["tiny"]:  # the real ViT-B/16 architecture, random init (norm facts only)
                return vits.VisionTransformer(**kwargs)
            model = vits.VisionTransformer(**TINY, num_classes=100)
            model.load_state_dict(weights)
            vits.nn = NNProxy("torch.nn")  # for the constructor's nn.LayerNorm(768) only; restored right after
            return model

        class NNProxy(types.ModuleType):
            def __getattr__(self, name):
                return getattr(torch.nn, name)

            @staticmethod
            def LayerNorm(dim, *a, **k):  # noqa: N802  (the released nn.LayerNorm(768), on a 192-d body)
                return torch.nn.LayerNorm(192 if state["tiny"] and dim == 768 else dim, *a, **k)

        vits._create_vision_transformer = create
        state["tiny"] = False
        vit_b = vits.vit_base_patch16_224_in21k(pretrained=False)
        in21k_norm = {"type": type(vit_b.norm).__name__, "eps": vit_b.norm.eps,
                      "normalized_shape": list(vit_b.norm.normalized_shape),
                      "weight_all_one": bool((vit_b.norm.weight == 1).all()),
                      "bias_all_zero": bool((vit_b.norm.bias == 0).all()),
                      "block_norm_eps": vit_b.blocks[0].norm1.eps}
        del vit_b
        state["tiny"] = True

        base.DataLoader = no_workers(base.DataLoader)
        slca.DataLoader = no_workers(slca.DataLoader)
        slca.batch_size = BATCH

        # ---- recorders
        rec: dict[str, torch.Tensor] = {}
        phase = {"name": "stage1", "task": 0}
        losses: dict[str, list[float]] = {}
        lrs: dict[str, list[list[float]]] = {}

        def key(prefix):
            return f"{prefix}_t{phase['task']}" if phase["name"] == "stage1" else prefix

        class FRecorder(types.ModuleType):
            def __getattr__(self, name):
                return getattr(torch.nn.functional, name)

            @staticmethod
            def cross_entropy(*a, **k):
                loss = torch.nn.functional.cross_entropy(*a, **k)
                losses.setdefault(key("loss_" + phase["name"]), []).append(loss.item())
                return loss

        class SGD(torch.optim.SGD):
            def step(self, closure=None):
                lrs.setdefault(key("lr_" + phase["name"]), []).append([g["lr"] for g in self.param_groups])
                return super().step(closure)

        slca.F = FRecorder("torch.nn.functional")
        slca.optim = types.SimpleNamespace(SGD=SGD, lr_scheduler=torch.optim.lr_scheduler)

        update_fc = inc_net.FinetuneIncrementalNet.update_fc

        def recorded_update_fc(self, nb_classes, freeze_old=True):
            update_fc(self, nb_classes, freeze_old)
            lin = self.fc.heads[-1][0]
            rec[f"head_init_t{phase['task']}_w"] = lin.weight.detach().clone()
            rec[f"head_init_t{phase['task']}_b"] = lin.bias.detach().clone()

        inc_net.FinetuneIncrementalNet.update_fc = recorded_update_fc
        backup = SimpleContinualLinear.backup

        def recorded_backup(self):
            for k, head in enumerate(self.heads):
                rec[f"heads_stage1_t{phase['task']}_h{k}_w"] = head[0].weight.detach().clone()
                rec[f"heads_stage1_t{phase['task']}_h{k}_b"] = head[0].bias.detach().clone()
            backup(self)

        SimpleContinualLinear.backup = recorded_backup

        seed_everything(SEED)
        learner = slca.SLCA({"prefix": "ref", "model_name": "slca", "model_postfix": "ref", "memory_size": 0,
                             "memory_per_class": 0, "fixed_memory": False, "device": [torch.device("cpu")],
                             "convnet_type": "vit-b-p16", "seed": SEED, "run_id": 0, "epochs": EPOCHS,
                             "milestones": MILESTONES, "ca_epochs": CA_EPOCHS, "ca_with_logit_norm": LOGIT_NORM})
        vits.nn = torch.nn
        learner.save_checkpoint = lambda *a, **k: None
        convnet = learner._network.convnet
        assert type(convnet.norm) is torch.nn.LayerNorm and convnet.norm.normalized_shape == (192,)
        with torch.no_grad():
            rec["feats_init"] = learner._network.extract_vector(x_all)

        extract = learner._extract_vectors
        feats_log: list[np.ndarray] = []

        def recorded_extract(loader):
            vectors, targets = extract(loader)
            feats_log.append(vectors)
            return vectors, targets

        learner._extract_vectors = recorded_extract
        compute_accuracy = learner._compute_accuracy
        stage2 = learner._stage2_compact_classifier
        first_ca: list[torch.Tensor] = []
        forward = inc_net.FinetuneIncrementalNet.forward

        def recorded_forward(self, x, bcb_no_grad=False, fc_only=False):
            if fc_only and not first_ca:
                first_ca.append(x[:4].detach().clone())
            return forward(self, x, bcb_no_grad, fc_only)

        inc_net.FinetuneIncrementalNet.forward = recorded_forward

        def seeded_stage2(task_size):
            phase["name"] = "ca"
            learner._compute_accuracy = lambda *a, **k: 0.0  # logging only; keeps the global RNG untouched
            torch.manual_seed(CA_SEED)
            try:
                stage2(task_size)
            finally:
                learner._compute_accuracy = compute_accuracy
                phase["name"] = "stage1"

        learner._stage2_compact_classifier = seeded_stage2
        dm = DataManager(x_all, labels)
        for task in range(2):
            phase["task"] = task
            dm.train_log.clear()
            feats_log.clear()
            learner.incremental_train(dm)
            order = torch.tensor(dm.train_log).view(EPOCHS * (2 * N_PER_CLASS // BATCH), BATCH)
            rec[f"order_t{task}"] = order
            rec[f"feats_stats_t{task}"] = torch.from_numpy(np.concatenate(feats_log))
            rec[f"norm_w_t{task}"] = convnet.norm.weight.detach().clone()
            rec[f"norm_b_t{task}"] = convnet.norm.bias.detach().clone()
            if task == 1:
                for k, head in enumerate(learner._network.fc.heads):
                    rec[f"aligned_h{k}_w"] = head[0].weight.detach().clone()
                    rec[f"aligned_h{k}_b"] = head[0].bias.detach().clone()
                learner._network.eval()
                with torch.no_grad():
                    rec["logits_aligned"] = learner._network(x_all)["logits"]
            learner.after_task()
        for k, head in enumerate(learner._network.fc.heads):
            rec[f"recalled_h{k}_w"] = head[0].weight.detach().clone()
            rec[f"recalled_h{k}_b"] = head[0].bias.detach().clone()
        inc_net.FinetuneIncrementalNet.forward = forward
        inc_net.FinetuneIncrementalNet.update_fc = update_fc
        SimpleContinualLinear.backup = backup

        means = torch.from_numpy(learner._class_means)  # float64 [4, 192]
        covs = learner._class_covs.double()  # the official store is float32
        proj = torch.randn(192, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        rec.update(means=means, cov_diag=torch.diagonal(covs, dim1=1, dim2=2).clone(), proj=proj,
                   cov_proj=covs @ proj, cov_block=covs[:, :8, :8].clone(), ca_first=first_ca[0])

    for name, values in losses.items():
        rec[name] = torch.tensor(values, dtype=torch.float64)
    for name, values in lrs.items():
        rec[name] = torch.tensor(values, dtype=torch.float64)
    rec["images"], rec["labels"] = images, labels
    print({k: tuple(v.shape) for k, v in rec.items()})
    print("stage-1 losses", losses, "\nlrs", {k: v[:: 2] for k, v in lrs.items()})
    write_golden(
        "slca", rec, repository=REPOSITORY, commit=COMMIT, files=FILES, script="tools/reference/slca.py",
        notes="official SLCA learner on the shared ViT-Tiny/8 (official VisionTransformer class, final LayerNorm "
              "re-created by the released in21k constructor), 2 tasks x 2 classes, 4 images per class",
        extra={"seed": SEED, "ca_seed": CA_SEED, "epochs": EPOCHS, "milestones": MILESTONES, "batch": BATCH,
               "lr": slca.lrate, "gamma": slca.lrate_decay, "weight_decay": slca.weight_decay,
               "bcb_lrscale": learner.bcb_lrscale, "ca_epochs": CA_EPOCHS, "logit_norm": LOGIT_NORM,
               "task_size": TASK_SIZE, "mean": MEAN, "std": STD, "weights": str(WEIGHTS),
               "in21k_norm": in21k_norm, "recipes": recipes})


if __name__ == "__main__":
    main()
