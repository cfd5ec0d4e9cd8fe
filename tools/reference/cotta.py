"""Goldens ``cotta``, ``tent`` and ``bn_adapt``: the released CoTTA / TENT / BN-adapt wrappers on a tiny case.

Official code: ``qinenergy/cotta`` @ ``c212a20`` (CIFAR code): ``cifar/cotta.py`` (``configure_model``,
``collect_params``, ``CoTTA.forward_and_adapt``, ``get_tta_transforms``, ``update_ema_variables``),
``cifar/my_transforms.py`` (``ColorJitterPro``, ``GaussianNoise``, ``Clip``), ``cifar/tent.py``
(``configure_model``, ``collect_params``, ``Tent``), ``cifar/norm.py`` (``Norm``); the optimiser set-up
is that of ``cifar/cifar10c.py::setup_optimizer`` (Adam, lr 1e-3, betas (0.9, 0.999), no weight decay).

Case (all three goldens): a tiny BatchNorm CNN (``tiny_bn_cnn`` below; conv 3->8, BN, ReLU, conv 8->16
stride 2, BN, ReLU, global average pool, linear 16->10; conv layers without bias as in ResNets, since a bias before BN gets a zero gradient that Adam would amplify; 1,6k parameters) with seeded weights, non-trivial
BN affine parameters and running statistics (stored as ``init.*``), adapted over 4 test batches of 10
seeded smooth 32x32 uint8 images (``images``, fed as ``x / 255``: the model has no input normalisation,
so clbench's ``Preprocess`` is mean 0, std 1).  One update per batch (``STEPS=1``), continual (no reset).

* ``cotta``: ``CoTTA(model, Adam, steps=1, episodic=False, mt_alpha=0.99, rst_m=0.1, ap=<between the
  batches' anchor confidences>)``: ``ap`` is chosen so that 2 of the 4 batches take the
  augmentation-averaged pseudo-label (mean anchor confidence < ap) and 2 the teacher's plain output
  (``gated``); ``rst_m`` is 0.1 (the CIFAR config's 0.01 would restore ~16 of the 1,6k weights per step)
  and ``mt_alpha`` 0.99 (the wrapper's default; config 0.999) so that restore and EMA move visibly.
  Stored per step t: the global torch RNG state before the step (``rng_before.t``) and right after
  ``optimizer.step()`` (``rng_restore.t``, the state the restore masks are drawn from; captured by an
  optimizer step post-hook), the student's logits before the update (``student_logits``), the returned
  prediction (``outputs``: the pseudo-label), the restore masks (``restore_mask.t``, all weights
  concatenated), and the student and teacher (EMA) parameters after the step.  The stochastic parts
  (32 augmentations with random parameters, Bernoulli restore masks) are checked with **matched RNG**:
  the test loads ``rng_before.t`` into the global RNG (clbench's augmentation draws its parameters from
  it in the official order) and ``rng_restore.t`` into the strategy's restore generator.
* ``tent``: ``Tent(model, Adam(collect_params(model)))``: per step the returned logits and every
  parameter after the step (only BN affine ones move).
* ``bn_adapt``: ``Norm(model)`` (eps 1e-5, momentum 0.1, running statistics kept and updated but unused
  in train mode): per step the logits and the running statistics after the step.

Patches applied from the outside (CPU, current torchvision): ``torch.Tensor.cuda`` is the identity (the
restore mask calls ``.cuda()``; the patched call also records the mask); ``cotta.transforms`` is the
torchvision module with ``RandomAffine`` accepting the removed ``resample=``/``fillcolor=`` keywords
(mapped to ``interpolation=BILINEAR``, ``fill=0``, which is what torchvision < 0.13 did with them);
``print`` of ``collect_params`` is silenced.  Nothing else of the official code is changed.

Run: ``python tools/reference/cotta.py [--source DIR]`` (DIR: a checkout of qinenergy/cotta at c212a20;
without it the commit is extracted from the local git mirror, see ``tools/reference/common.py``).
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

REPOSITORY, COMMIT = "qinenergy/cotta", "c212a20"
SCRIPT = "tools/reference/cotta.py"
N_STEPS, BATCH = 4, 10


def tiny_bn_cnn() -> nn.Module:
    """The test model (the same definition is in tests/test_reference_tta.py)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def initial_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    model = tiny_bn_cnn()
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = value
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(value.shape, generator=g)
        elif name.endswith("running_mean"):
            state[name] = 0.2 * torch.randn(value.shape, generator=g)
        elif ".weight" in name and value.dim() == 1:  # BN scale
            state[name] = 1.0 + 0.2 * torch.randn(value.shape, generator=g)
        else:
            fan_in = value[0].numel() if value.dim() > 1 else 16  # conv/linear weights; the linear bias
            state[name] = torch.randn(value.shape, generator=g) / fan_in ** 0.5
    return state


def images(n_batches: int = N_STEPS, batch: int = BATCH, seed: int = 1) -> torch.Tensor:
    """Smooth random uint8 images ``[n_batches, batch, 3, 32, 32]`` (colour blobs plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n_batches * batch, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    x = x + 0.1 * torch.rand(n_batches * batch, 3, 32, 32, generator=g)
    return (x.clamp(0, 1) * 255).to(torch.uint8).view(n_batches, batch, 3, 32, 32)


def _model(state: dict[str, torch.Tensor]) -> nn.Module:
    model = tiny_bn_cnn()
    model.load_state_dict(state)
    return model


def _adam(params):
    return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)  # cifar10c.setup_optimizer


def _patched_transforms():
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode

    def random_affine(*args, resample=None, fillcolor=None, **kwargs):
        kwargs.setdefault("interpolation", InterpolationMode.BILINEAR if resample is not None else InterpolationMode.NEAREST)
        kwargs.setdefault("fill", 0 if fillcolor is None else fillcolor)
        return T.RandomAffine(*args, **kwargs)

    shim = types.ModuleType("torchvision.transforms")
    shim.__dict__.update(T.__dict__)
    shim.RandomAffine = random_affine
    return shim


def run_cotta(cotta, state, x_all) -> tuple[dict[str, torch.Tensor], dict]:
    masks: list[torch.Tensor] = []

    def fake_cuda(self, *args, **kwargs):
        masks.append(self.detach().clone())
        return self

    anchor = cotta.configure_model(_model(state))
    with torch.no_grad():
        conf = [float(torch.softmax(anchor(x.float() / 255), 1).max(1)[0].mean(0)) for x in x_all]
    order = sorted(conf)
    ap = 0.5 * (order[1] + order[2])  # two batches below (augmented pseudo-label), two above
    model = cotta.configure_model(_model(state))
    with contextlib.redirect_stdout(io.StringIO()):
        params, _ = cotta.collect_params(model)
    optimizer = _adam(params)
    restore_states: list[torch.Tensor] = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: restore_states.append(torch.get_rng_state()))
    wrapper = cotta.CoTTA(model, optimizer, steps=1, episodic=False, mt_alpha=0.99, rst_m=0.1, ap=ap)
    out: dict[str, torch.Tensor] = {}
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = fake_cuda
    try:
        seed_everything(2024)
        for t, x in enumerate(x_all):
            x = x.float() / 255
            out[f"rng_before.{t}"] = torch.get_rng_state()
            with torch.no_grad():
                out[f"student_logits.{t}"] = model(x)
            masks.clear()
            out[f"outputs.{t}"] = wrapper(x).detach()
            out[f"rng_restore.{t}"] = restore_states[-1]
            out[f"restore_mask.{t}"] = torch.cat([m.flatten() for m in masks]).to(torch.uint8)
            for name, p in model.named_parameters():
                out[f"student.{t}.{name}"] = p.detach().clone()
            for name, p in wrapper.model_ema.named_parameters():
                out[f"teacher.{t}.{name}"] = p.detach().clone()
    finally:
        torch.Tensor.cuda = cuda
    extra = {"mt_alpha": 0.99, "rst_m": 0.1, "ap": ap, "anchor_confidence": conf,
             "gated": [c < ap for c in conf], "n_augmentations": 32, "lr": 1e-3, "steps": len(x_all)}
    return out, extra


def run_tent(tent, state, x_all) -> dict[str, torch.Tensor]:
    model = tent.configure_model(_model(state))
    params, _ = tent.collect_params(model)
    wrapper = tent.Tent(model, _adam(params), steps=1, episodic=False)
    out = {}
    for t, x in enumerate(x_all):
        out[f"outputs.{t}"] = wrapper(x.float() / 255).detach()
        for name, p in model.named_parameters():
            out[f"params.{t}.{name}"] = p.detach().clone()
    return out


def run_norm(norm, state, x_all) -> dict[str, torch.Tensor]:
    model = _model(state).eval()
    wrapper = norm.Norm(model)
    out = {}
    with torch.no_grad():
        for t, x in enumerate(x_all):
            out[f"outputs.{t}"] = wrapper(x.float() / 255)
            for name, s in model.state_dict().items():
                if "running" in name:
                    out[f"stats.{t}.{name}"] = s.clone()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", help="a checkout of qinenergy/cotta at c212a20")
    args = parser.parse_args()
    torch.set_num_threads(1)
    src = official_source(REPOSITORY, COMMIT, args.source) / "cifar"
    state, x_all = initial_state(), images()
    common = {"images": x_all, **{f"init.{k}": v for k, v in state.items()}}
    with imported_from(src, "cotta", "tent", "norm", "my_transforms"):
        import cotta
        import norm
        import tent

        cotta.transforms = _patched_transforms()
        golden, extra = run_cotta(cotta, state, x_all)
        write_golden("cotta", {**common, **golden}, repository=REPOSITORY, commit=COMMIT,
                     files=["cifar/cotta.py", "cifar/my_transforms.py", "cifar/cifar10c.py"], script=SCRIPT,
                     notes="CoTTA.forward_and_adapt on a tiny BN CNN, 4 batches; matched RNG for augmentations and restore",
                     extra=extra)
        write_golden("tent", {**common, **run_tent(tent, state, x_all)}, repository=REPOSITORY, commit=COMMIT,
                     files=["cifar/tent.py", "cifar/cifar10c.py"], script=SCRIPT,
                     notes="Tent (configure_model, collect_params, Adam lr 1e-3) on a tiny BN CNN, 4 batches",
                     extra={"lr": 1e-3, "steps": len(x_all)})
        write_golden("bn_adapt", {**common, **run_norm(norm, state, x_all)}, repository=REPOSITORY, commit=COMMIT,
                     files=["cifar/norm.py", "cifar/cifar10c.py"], script=SCRIPT,
                     notes="Norm (BN in train mode, momentum 0.1) on a tiny BN CNN, 4 batches",
                     extra={"steps": len(x_all)})


if __name__ == "__main__":
    main()
