"""Golden for MVP (Moon et al., ICCV 2023) from the official code, on the shared ViT-Tiny/8.

Repository ``KHU-AGI/Si-Blurry`` at commit ``61bd5eb`` (HEAD ``c90d6d7`` does not parse:
``models/mvp.py`` has a duplicated ``if`` line).  Official code exercised:

* ``models/mvp.py::MVP`` -- built by its own ``__init__`` (``torch.randn`` keys / G- and E-prompts,
  masks at -1; pool ``task_num=10`` as ``get_model`` leaves it), ``forward_features`` (query =
  [CLS] before the last block since ``scripts/mvp.sh`` does not pass ``--use_last_layer``;
  usage-scaled selection ``distance * (count + 1)``; the contrastive key loss with the code's
  ``[B, B, M]`` mass broadcast; the count update), ``prompt_tuning`` (tokens appended per block
  and dropped after it), ``forward_head``.
* ``methods/mvp.py::MVP`` (the trainer) -- ``add_new_class`` (from ``methods/_trainer.py``),
  ``online_train`` (``model_forward`` -> instance mask ``2 sigmoid(mask)``, exposure mask,
  ``loss_fn`` with ``_compute_grads`` / ``_get_ignore`` (per-sample autograd) / ``_get_compensation``
  (AFS, margin 0.5), the focal term with alpha 0.5 and **gamma 2.0** (the argparse defaults in
  ``configuration/config.py``), the batch-mean ``nll_loss`` it weights), backward, and the Adam
  step of ``utils/train_utils.py::select_optimizer("adam", 5e-3)`` with the constant
  ``select_scheduler("default")`` -- ``online_iter=3`` calls per incoming batch, as ``online_step``
  does (its memory part is skipped: ``MEM_SIZE=0`` for MVP in ``scripts/mvp.sh``).

Case: the backbone is the shared ViT-Tiny/8 at 64 px
(``shared/data/weights/vit-tiny-tinyimagenet100``, registered in timm under the name
``clbench_ref_vit_tiny_p8_64`` for ``MVP(backbone_name=...)``, head of 10 classes re-initialised),
G-prompt length 2 in blocks 0-1, E-prompt length 2 in blocks 2-4 (shortened from 5 / 20 to keep
the file small), pool 3 (``task_num``; 10 in the paper), ``use_mask`` / ``use_contrastiv`` /
``use_afs`` / ``use_gsf`` on as in ``scripts/mvp.sh``; 10 classes, two incoming batches of 4
seeded random 64x64 RGB uint8 images (a colour per image plus blocky noise; ImageNet-normalised)
with labels [0 1 2 3] then [2 4 5 4] (exposure order = label order; classes 6-9 never exposed),
3 Adam steps each.  The state is one from later in a stream, so that the usage scaling and the
mass broadcast matter: usage counts [6, 2, 0] and keys = the queries of the first 3 images plus
N(0, 0.05^2) noise (set after ``__init__``; the prompts, masks and head keep their official
initialisation).  Stored: the initial parameters and counts, per step the selected
E-prompt of each sample (read off the prompts handed to ``prompt_func``), the key loss
(``similarity_loss``), the training logits, ``ign`` / ``cps`` (from ``_get_score``), the loss, the
usage counts; the gradients of step 0 and the parameters after step 0 and after the last step.

Second golden ``mvp_usage_selection`` (the training run above never needs the usage scaling to pick
its prompts): after the run, the initial parameters are restored and the official
``forward_features`` runs in eval mode (counts not updated) on both batches with the usage counts
``SELECTION_COUNTS`` set in ``model.count``, and once with ``use_contrastiv`` off (the code's
``mass = 1.``: the plain nearest key).  Stored: the counts, per batch and count vector the selected
E-prompts and ``similarity_loss``, the plain selections; the script asserts every count vector
flips some selection against the plain one.

Patched from outside (CPU, no packages beyond clbench's): ``randaugment`` and
``torch_optimizer`` are stub modules (imported, unused on this path); the trainer object is made
with ``__new__`` and given the attributes ``_Trainer.__init__`` / ``setup_distributed_model`` /
``setup_dataset`` would set (no dataset, no process group); ``train_transform`` is the identity
(inputs are already normalised tensors); AMP off.

Run: ``python tools/reference/mvp.py [--source DIR]``.  Test: ``tests/test_reference_mvp.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import imported_from, official_source, seed_everything, write_golden  # noqa: E402
from si_blurry import stub_packages  # noqa: E402

REPOSITORY, COMMIT = "KHU-AGI/Si-Blurry", "61bd5eb"
FILES = ["models/mvp.py", "methods/mvp.py", "methods/_trainer.py", "utils/train_utils.py",
         "configuration/config.py", "scripts/mvp.sh"]
WEIGHTS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "weights" / "vit-tiny-tinyimagenet100" / \
    "vit_tiny_p8_64_tin100.safetensors"
N_CLASSES, POOL, G_LEN, E_LEN, G_LAYERS, E_LAYERS = 10, 3, 2, 2, (0, 1), (2, 3, 4)
LABELS = [[0, 1, 2, 3], [2, 4, 5, 4]]
ONLINE_ITER, LR = 3, 5e-3
INIT_COUNT = [6.0, 2.0, 0.0]
# usage counts for the selection golden: each flips the official selection of some query against the
# plain nearest key (asserted), several of them by margins of >= 8 % of the scaled distance
SELECTION_COUNTS = [INIT_COUNT, [0.0, 2.0, 12.0], [4.0, 11.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 9.0]]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PARAMS = ["key", "mask", "g_prompts", "e_prompts", "backbone.head.weight", "backbone.head.bias"]


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> ImageNet-normalised floats (the test does exactly the same)."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def random_images(n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` uint8 64x64 RGB images: a random colour per image plus blocky 8x8 noise of random
    strength, so that the queries spread over the keys."""
    colour = torch.randint(0, 256, (n, 3, 1, 1), generator=g).float()
    noise = torch.randint(-128, 128, (n, 3, 8, 8), generator=g).float().repeat_interleave(8, 2).repeat_interleave(8, 3)
    strength = torch.rand(n, 1, 1, 1, generator=g)
    return (colour + strength * noise).clamp(0, 255).round().to(torch.uint8)


def register_backbone(weights: Path) -> None:
    import timm
    from safetensors.torch import load_file
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if "clbench_ref_vit_tiny_p8_64" in timm.list_models():
        return

    @register_model
    def clbench_ref_vit_tiny_p8_64(pretrained=False, num_classes=1000, **kwargs):
        """The shared ViT-Tiny/8 (64 px) with a fresh ``num_classes`` head; drop rates from MVP are 0."""
        model = VisionTransformer(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3,
                                  num_classes=num_classes, drop_rate=kwargs.get("drop_rate", 0.0),
                                  drop_path_rate=kwargs.get("drop_path_rate", 0.0))
        state = {k: v.float() for k, v in load_file(str(weights)).items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert set(missing) == {"head.weight", "head.bias"} and not unexpected, (missing, unexpected)
        return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", help="a checkout of KHU-AGI/Si-Blurry at 61bd5eb")
    parser.add_argument("--weights", default=str(WEIGHTS), help="vit_tiny_p8_64_tin100.safetensors")
    args = parser.parse_args()
    src = official_source(REPOSITORY, COMMIT, args.source)
    torch.set_num_threads(1)
    register_backbone(Path(args.weights))
    stub_packages()
    with imported_from(src, "methods", "models", "utils", "datasets", "configuration"):
        import methods.mvp as method_module
        import models.mvp as model_module
        from utils.memory import Memory
        from utils.train_utils import select_optimizer, select_scheduler

        seed_everything(0)
        model = model_module.MVP(pos_g_prompt=G_LAYERS, len_g_prompt=G_LEN, pos_e_prompt=E_LAYERS, len_e_prompt=E_LEN,
                                 selection_size=1, prompt_func="prompt_tuning", task_num=POOL, num_classes=N_CLASSES,
                                 use_mask=True, use_contrastiv=True, use_last_layer=False,
                                 backbone_name="clbench_ref_vit_tiny_p8_64")
        g = torch.Generator().manual_seed(1)
        images = [random_images(len(y), g) for y in LABELS]
        with torch.no_grad():  # a state from later in a stream: prompts used unequally, keys near queries
            model.count.copy_(torch.tensor(INIT_COUNT))
            vit = model.backbone
            h = vit.pos_drop(torch.cat([vit.cls_token.expand(POOL, -1, -1),
                                        vit.patch_embed(normalise(images[0][:POOL]))], 1) + vit.pos_embed)
            for block in vit.blocks[:-1]:
                h = block(h)
            model.key.copy_(h[:, 0] + 0.05 * torch.randn(POOL, h.shape[-1], generator=g))

        tr = method_module.MVP.__new__(method_module.MVP)  # the trainer without its dataset / process setup
        tr.__dict__.update(dict(
            use_mask=True, use_contrastiv=True, use_last_layer=False, use_afs=True, use_gsf=True,
            alpha=0.5, gamma=2.0, margin=0.5,  # configuration/config.py defaults (scripts/mvp.sh sets none)
            labels=torch.empty(0), model=model, model_without_ddp=model, device=torch.device("cpu"),
            n_classes=N_CLASSES, exposed_classes=[], mask=torch.zeros(N_CLASSES) - torch.inf, memory=Memory(),
            memory_batchsize=0, temp_batchsize=len(LABELS[0]), online_iter=ONLINE_ITER, world_size=1,
            distributed=False, sched_name="default", use_amp=False, topk=1, train_transform=lambda x: x,
            lr=LR, scaler=torch.cuda.amp.GradScaler(enabled=False)))
        model.use_mask, model.use_contrastiv, model.use_last_layer = True, True, False  # setup_distributed_model
        tr.optimizer = select_optimizer("adam", LR, model)
        tr.scheduler = select_scheduler("default", tr.optimizer)

        params = dict(model.named_parameters())
        out: dict[str, torch.Tensor] = {f"init/{k}": params[k].detach().clone() for k in PARAMS}
        out["init/count"] = model.count.detach().clone()
        for b, y in enumerate(LABELS):
            out[f"images/{b}"] = images[b]
        rec: dict[str, torch.Tensor] = {}
        original_prompt_func = model.prompt_func

        def prompt_func(x, g_prompt, e_prompt, **kw):  # which E-prompt each sample got
            pool = model.e_prompts.detach().flatten(1)
            rec["idx"] = torch.cdist(e_prompt.detach().flatten(1), pool).argmin(1)
            return original_prompt_func(x, g_prompt, e_prompt, **kw)

        model.prompt_func = prompt_func
        original_score = tr._get_score

        def get_score(feat, y, mask):
            ign, cps = original_score(feat, y, mask)
            rec["ign"], rec["cps"] = ign.detach().clone(), cps.detach().clone()
            return ign, cps

        tr._get_score = get_score
        original_forward = tr.model_forward

        def model_forward(x, y):
            logit, loss = original_forward(x, y)
            rec["logits"], rec["loss"] = logit.detach().clone(), loss.detach().clone()
            rec["key_loss"] = model.similarity_loss.detach().clone()
            return logit, loss

        tr.model_forward = model_forward
        step = 0
        for b, y in enumerate(LABELS):
            labels = torch.tensor(y)
            x = normalise(images[b])
            tr.add_new_class(labels)  # online_step: exposure first, then online_iter updates
            for _ in range(ONLINE_ITER):
                tr.online_train([x.clone(), labels.clone()])
                for key in ("idx", "key_loss", "logits", "ign", "cps", "loss"):
                    out[f"step{step}/{key}"] = rec[key]
                out[f"step{step}/count"] = model.count.detach().clone()
                if step == 0:
                    for k in PARAMS:
                        out[f"grad0/{k}"] = params[k].grad.detach().clone()
                        out[f"after0/{k}"] = params[k].detach().clone()
                print(f"step {step}: idx {rec['idx'].tolist()} loss {rec['loss'].item():.6f} "
                      f"key {rec['key_loss'].item():.6f}")
                step += 1
        for k in PARAMS:
            out[f"final/{k}"] = params[k].detach().clone()
        selection = usage_selection_case(model, params, out, images, rec)
    write_golden("mvp", out, repository=REPOSITORY, commit=COMMIT, files=FILES, script="tools/reference/mvp.py",
                 notes="Official MVP model + trainer update (Adam 5e-3, online_iter 3) on the shared ViT-Tiny/8",
                 extra={"n_classes": N_CLASSES, "pool": POOL, "g_length": G_LEN, "e_length": E_LEN,
                        "g_layers": list(G_LAYERS), "e_layers": list(E_LAYERS), "labels": LABELS,
                        "online_iter": ONLINE_ITER, "lr": LR, "alpha": 0.5, "gamma": 2.0, "margin": 0.5,
                        "mean": list(MEAN), "std": list(STD), "params": PARAMS,
                        "weights": "shared/data/weights/vit-tiny-tinyimagenet100/vit_tiny_p8_64_tin100.safetensors"})
    write_golden("mvp_usage_selection", selection, repository=REPOSITORY, commit=COMMIT, files=["models/mvp.py"],
                 script="tools/reference/mvp.py",
                 notes="Official MVP forward_features (eval): E-prompt selection with usage counts that flip choices, "
                       "and with use_contrastiv off (mass 1, plain nearest key), on the mvp golden's initial state",
                 extra={"counts": SELECTION_COUNTS, "batches": len(LABELS), "golden": "mvp"})


def usage_selection_case(model, params, out, images, rec) -> dict[str, torch.Tensor]:
    """The official ``forward_features`` (eval mode: no count update) on the initial parameters of the
    training case, both batches, for each usage count vector of ``SELECTION_COUNTS``; selections read
    off the prompts handed to ``prompt_func`` (``rec["idx"]``), the key loss ``similarity_loss``; and,
    with ``use_contrastiv`` off (the code's ``mass = 1.``), the plain nearest-key selections."""
    with torch.no_grad():
        for k in PARAMS:
            params[k].copy_(out[f"init/{k}"])
    model.eval()
    sel: dict[str, torch.Tensor] = {"init/key": out["init/key"], "counts": torch.tensor(SELECTION_COUNTS)}
    flips = []
    with torch.no_grad():
        for b in range(len(LABELS)):
            x = normalise(images[b])
            model.use_contrastiv = False
            model.forward_features(x)
            model.use_contrastiv = True
            plain = sel[f"plain/{b}"] = rec["idx"].clone()
            for c, count in enumerate(SELECTION_COUNTS):
                model.count.copy_(torch.tensor(count))
                model.forward_features(x)
                assert model.count.tolist() == count  # eval: the counts stay
                sel[f"idx/{b}/{c}"] = rec["idx"].clone()
                sel[f"key_loss/{b}/{c}"] = model.similarity_loss.detach().clone()
                flips.append(int((rec["idx"] != plain).sum()))
                print(f"batch {b} counts {count}: idx {rec['idx'].tolist()} (plain {plain.tolist()})")
    per_count = [sum(flips[c::len(SELECTION_COUNTS)]) for c in range(len(SELECTION_COUNTS))]
    assert all(n > 0 for n in per_count), per_count  # every count vector flips some official selection
    return sel


if __name__ == "__main__":
    main()
