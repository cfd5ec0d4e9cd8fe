"""Golden ``kv_bottleneck``: the released discrete key-value bottleneck on seeded random features.

Official code: ``ftraeuble/discrete_key_value_bottleneck`` @ ``1987958`` (``key_value_bottleneck/core.py``:
``BottleneckedEncoder`` (``prepare`` -> ``initialize_keys``, ``forward``), ``KeyValueBottleneck.forward``
(nearest-key selection, EMA k-means key update, ``expire_codes_``), ``splitters.py::RandomDownProjection``,
``utils.py`` (``ema_inplace``, ``laplace_smoothing``, ``sample_vectors``)) and
``ftraeuble/experiments_discrete_key_value_bottleneck`` @ ``abd0c7a`` (``kv_bottleneck_experiments/utils/model.py``:
``CodebookVotingLogitsDecoder``, ``ModelWrapper``, ``get_threshold_ema_dead_code``; the training loop is that of
``scripts/train.py::train`` -- zero-initialised values, ``freeze_keys``, ``activate_counts``, SGD, label-smoothed
cross-entropy, ``clip_grad_norm_`` -- re-enacted here step for step because the script itself needs wandb and
the datasets; the evaluation is ``eval_train_test_accuracy``'s ``model.eval(); deactivate_counts()``).

Case (tiny dimensions, features instead of an encoder: ``encoder=nn.Identity()``, as the code's
``input_is_embedding``): D=12 features, C=4 codebooks, J=16 key-value pairs each, d_k=3, d_v=10 (CIFAR-10's class count, which the decoder requires; the stream uses classes 0-3),
``splitting_mode=random_projection``, ``init_mode=random``, decay 0.95, eps 1e-5, dead-code threshold from
``get_threshold_ema_dead_code`` (``threshold_factor`` 0.1, batch 32, J=16 -> 0.2), topk 1, temperature 0.

1. Key fitting (``prepare(loader, epochs=2)``) on 88 seeded pretraining features (a mixture of 6 Gaussian
   blobs), batches of 32 (the last one 24) in a fresh ``torch.randperm`` order per epoch drawn from the
   global RNG (``rng_before_fit`` is the RNG state before the first draw: the test loads it into the
   strategy's generator, which then draws the same permutations and the same dead-key samples).  Stored per
   step s: the batch indices, the selected key per (sample, codebook) (``fit_ind.s``), the EMA cluster sizes
   and the keys after the step (``fit_keys.s``); initial projection and keys (``proj``, ``keys0``).
2. Continual training of the values (lr 0.3, label smoothing 0.1, grad clip 0.25 instead of the code's 1.0 so that
   clipping acts on some of these small gradients, SGD without momentum or
   weight decay): 24 labelled features, tasks [[0, 1], [2, 3]] (12 samples each), 2 epochs per task
   (``cl_epochs``=2), batches of 8 in a global-RNG permutation per epoch.  Stored per step: the batch
   indices, selected keys, logits (``train_logits.s``), loss, gradient norm before clipping and values after
   the step; after the stream the selection counters (``cluster_size_counter``).
4. The released recipes (``extra["recipes"]``): the arguments ``scripts/train.py`` receives from
   ``sweeps/icml2023/cifar10_clip_resnet50_ours_base.yaml`` and ``cifar100_split2_clip_resnet50_ours_base.yaml``
   (parsed by the official ``ArgumentParserWrapper``: ``cl_epochs`` is 2000 for CIFAR-10 by default, 500 in the
   CIFAR-100 sweep), checked against ``configs/repro/kv_bottleneck_*.yaml`` by the test.
3. Evaluation on 20 test features with ``deactivate_counts`` (never-selected keys masked): selected keys and
   logits.

Patches: none to the official code (CPU-clean).  It needs ``einops``, which clbench does not use: run the
script in a scratch venv (``python -m venv --system-site-packages V && V/bin/pip install einops``).

Run: ``V/bin/python tools/reference/kv_bottleneck.py [--source DIR] [--experiments DIR]`` (checkouts of the two
repositories at the commits above; without them the commits are extracted from the local git mirrors).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import types
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tools.reference.common import imported_from, official_source, seed_everything, write_golden  # noqa: E402

CORE, CORE_COMMIT = "ftraeuble/discrete_key_value_bottleneck", "1987958"
EXP, EXP_COMMIT = "ftraeuble/experiments_discrete_key_value_bottleneck", "abd0c7a"
SCRIPT = "tools/reference/kv_bottleneck.py"
D, C, J, DK, V = 12, 4, 16, 3, 10  # V = 10: get_class_nums(CIFAR10); the stream uses classes 0-3
N_PRE, B_PRE, INIT_EPOCHS = 88, 32, 2
N_CL, B_CL, CL_EPOCHS, TASKS = 24, 8, 2, [[0, 1], [2, 3]]
N_TEST = 20
LR, CLIP, SMOOTH = 0.3, 0.25, 0.1  # clip 0.25 (code: 1.0) so that some of these small steps are clipped


def features(seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(6, D, generator=g)
    pre = centres[torch.randint(0, 6, (N_PRE,), generator=g)] + torch.randn(N_PRE, D, generator=g)
    cl_y = torch.tensor([c for c in range(4) for _ in range(N_CL // 4)])
    class_centres = 2.0 * torch.randn(4, D, generator=g)
    cl = class_centres[cl_y] + torch.randn(N_CL, D, generator=g)
    test_y = torch.randint(0, 4, (N_TEST,), generator=g)
    test = class_centres[test_y] + torch.randn(N_TEST, D, generator=g)
    return {"pre_x": pre, "cl_x": cl, "cl_y": cl_y, "test_x": test, "test_y": test_y}


SWEEPS = {"cifar10": "sweeps/icml2023/cifar10_clip_resnet50_ours_base.yaml",
          "cifar100": "sweeps/icml2023/cifar100_split2_clip_resnet50_ours_base.yaml"}


def sweep_recipes(exp_dir: Path, argparse_utils, model_utils) -> dict[str, dict]:
    """The run arguments ``scripts/train.py`` gets from each sweep (constants; categorical: the
    ``resnet50_imagenet_v2`` backbone, ``training_mode: ood``, the first seed), parsed by the official
    ``ArgumentParserWrapper`` so that unset options (``cl_epochs`` for CIFAR-10) take its defaults."""
    import yaml

    recipes = {}
    for name, rel in SWEEPS.items():
        params = yaml.safe_load((exp_dir / rel).read_text())["parameters"]
        argv = []
        for key, spec in params.items():
            if "value" in spec:
                value = spec["value"]
            else:
                values = spec["values"]
                value = next((v for v in values if v in ("resnet50_imagenet_v2", "ood")), values[0])
            argv += [f"--{key}", str(value)]
        run = argparse_utils.ArgumentParserWrapper().parse_args(argv)
        recipes[name] = {
            "dataset_name": run.dataset_name, "pretrain_data": run.pretrain_data, "backbone": run.backbone,
            "cl_epochs": run.cl_epochs, "split_size": run.split_size, "batch_size": run.batch_size,
            "optimizer": run.optimizer, "learning_rate": run.learning_rate, "weight_decay": run.weight_decay,
            "gradient_clip": run.gradient_clip, "label_smoothing": run.label_smoothing, "values_init": run.values_init,
            "num_books": run.num_books, "num_pairs": model_utils.get_key_value_pairs_per_codebook(run),
            "dim_key": run.dim_key, "dim_value": run.dim_value, "decay": run.decay, "init_epochs": run.init_epochs,
            "init_mode": run.init_mode, "splitting_mode": run.splitting_mode, "threshold_factor": run.threshold_factor,
            "threshold_ema_dead_code": model_utils.get_threshold_ema_dead_code(run), "topk": run.topk,
            "sample_codebook_temperature": run.sample_codebook_temperature, "decoder_model": run.decoder_model,
            "training_mode": run.training_mode, "seeds": params["seed"]["values"]}
    return recipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", help=f"a checkout of {CORE} at {CORE_COMMIT}")
    parser.add_argument("--experiments", help=f"a checkout of {EXP} at {EXP_COMMIT}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    core_dir = official_source(CORE, CORE_COMMIT, args.source)
    exp_dir = official_source(EXP, EXP_COMMIT, args.experiments)
    data = features()
    out: dict[str, torch.Tensor] = dict(data)
    with imported_from(core_dir, "key_value_bottleneck"), imported_from(exp_dir, "kv_bottleneck_experiments"):
        import key_value_bottleneck.core as core
        import kv_bottleneck_experiments.utils.argparse as argparse_utils
        import kv_bottleneck_experiments.utils.model as model_utils

        recipes = sweep_recipes(exp_dir, argparse_utils, model_utils)

        run_args = types.SimpleNamespace(
            backbone="clip_vit_b32", accept_image_fmap=False, t_mode="uniform_importance", scaling_mode="free_num_keys",
            num_pairs=J, threshold_factor=0.1, batch_size=B_PRE, topk=1, ff_dropout=0.0, method="ours",
            decoder_model="codebook-voting-logits", add_distance_to_values=False, dataset_name="CIFAR10")
        threshold = model_utils.get_threshold_ema_dead_code(run_args)
        seed_everything(0)
        enc = core.BottleneckedEncoder(
            encoder=nn.Identity(), num_channels=D, num_codebooks=C, key_value_pairs_per_codebook=J, dim_keys=DK,
            dim_values=V, init_mode="random", splitting_mode="random_projection", decay=0.95, eps=1e-5,
            threshold_ema_dead_code=threshold, encoder_is_channel_last=False, concat_values_from_all_codebooks=False,
            sample_codebook_temperature=0.0, return_values_only=False, topk=1)
        bottleneck = enc.bottleneck
        out["proj"] = enc.splitter.rand_proj.clone()  # [C, D, d_k]
        out["keys0"] = bottleneck.keys.clone()

        # ---- 1. key fitting: prepare(loader, epochs) with a recording hook on the bottleneck's forward
        fit_batches: list[torch.Tensor] = []
        records: list[tuple] = []
        original_forward = bottleneck.forward

        def recording_forward(x):
            result = original_forward(x)
            records.append((result[2].reshape(x.shape[0], C).clone(), bottleneck.cluster_size.clone(), bottleneck.keys.clone()))
            return result

        bottleneck.forward = recording_forward

        class PretrainLoader:  # a shuffled loader: one global-RNG permutation per epoch
            def __iter__(self):
                perm = torch.randperm(N_PRE)
                for s in range(0, N_PRE, B_PRE):
                    fit_batches.append(perm[s:s + B_PRE])
                    yield data["pre_x"][perm[s:s + B_PRE]], None

        out["rng_before_fit"] = torch.get_rng_state()
        with contextlib.redirect_stderr(io.StringIO()):  # tqdm
            enc.prepare(loader=PretrainLoader(), epochs=INIT_EPOCHS)
        for s, (ind, cluster, keys) in enumerate(records):
            out[f"fit_batch.{s}"], out[f"fit_ind.{s}"] = fit_batches[s], ind
            out[f"fit_cluster.{s}"], out[f"fit_keys.{s}"] = cluster, keys
        n_fit = len(records)
        records.clear()
        out["keys"] = bottleneck.keys.clone()

        # ---- 2. continual training of the values (scripts/train.py: initialize_model + train)
        enc.reset_cluster_size_counter()
        enc.disable_update_keys()
        decoder = model_utils.get_decoder_module(num_codebooks=C, dim_values=V, dim_keys=DK, num_channels=D, args=run_args)
        model = model_utils.ModelWrapper(enc, decoder, run_args)
        model.train()
        bottleneck.values = nn.Parameter(torch.zeros_like(bottleneck.values))  # values_init: zeros
        bottleneck.values.requires_grad = True
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=0.0)  # train_utils.get_optimizer
        criterion = nn.CrossEntropyLoss(label_smoothing=SMOOTH)
        model.bottlenecked_encoder.freeze_keys()
        model.freeze_for_adaptation()
        model.train()
        model.bottlenecked_encoder.activate_counts()
        assert [p for p in model.parameters() if p.requires_grad] == [bottleneck.values]
        step = 0
        for classes in TASKS:
            members = torch.nonzero(torch.isin(data["cl_y"], torch.tensor(classes))).flatten()
            for _ in range(CL_EPOCHS):
                perm = members[torch.randperm(members.numel())]
                for s in range(0, perm.numel(), B_CL):
                    idx = perm[s:s + B_CL]
                    inputs, labels = data["cl_x"][idx], data["cl_y"][idx]
                    optimizer.zero_grad()
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                    optimizer.step()
                    out[f"train_batch.{step}"], out[f"train_ind.{step}"] = idx, records[-1][0]
                    out[f"train_logits.{step}"], out[f"train_loss.{step}"] = outputs.detach().clone(), loss.detach().reshape(1)
                    out[f"train_grad_norm.{step}"] = norm.detach().reshape(1)
                    out[f"values.{step}"] = bottleneck.values.detach().clone()
                    step += 1
        out["cluster_size_counter"] = bottleneck.cluster_size_counter.clone()

        # ---- 3. evaluation (eval_train_test_accuracy): eval mode, unused keys masked
        model.eval()
        model.bottlenecked_encoder.deactivate_counts()
        with torch.no_grad():
            out["test_logits"] = model(data["test_x"])
        out["test_ind"] = records[-1][0]
        bottleneck.forward = original_forward
    extra = {"D": D, "C": C, "J": J, "dk": DK, "dv": V, "decay": 0.95, "eps": 1e-5, "threshold": threshold,
             "threshold_factor": 0.1, "init_batch_size": B_PRE, "init_epochs": INIT_EPOCHS, "fit_steps": n_fit,
             "lr": LR, "grad_clip": CLIP, "label_smoothing": SMOOTH, "cl_epochs": CL_EPOCHS, "tasks": TASKS,
             "train_steps": step, "cl_batch_size": B_CL, "recipes": recipes}
    write_golden("kv_bottleneck", out, repository=CORE, commit=CORE_COMMIT,
                 files=["key_value_bottleneck/core.py", "key_value_bottleneck/splitters.py", "key_value_bottleneck/utils.py",
                        f"{EXP}@{EXP_COMMIT}:kv_bottleneck_experiments/utils/model.py",
                        f"{EXP}@{EXP_COMMIT}:scripts/train.py"],
                 script=SCRIPT, notes="key fitting (EMA k-means + dead-key expiry), value training and masked evaluation",
                 extra={**extra, "experiments_repository": EXP, "experiments_commit": EXP_COMMIT})


if __name__ == "__main__":
    main()
