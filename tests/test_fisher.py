"""Per-sample Fisher (``clbench.regularizers.per_sample_fisher``, issue 11): equal to a loop of
per-sample backward passes on an MLP, a conv/BN network and a tiny timm ViT; no autograd graph
kept across batches (flat memory); ``vmap`` chunks within the stated memory budget; progress
reported by the EWC Fisher pass."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from clbench.regularizers import _nll, fisher_chunk_size, per_sample_fisher


def brute_force(model: nn.Module, params: dict[str, nn.Parameter], batches) -> dict[str, torch.Tensor]:
    """1/N sum_n (grad log p(y_n | x_n))^2 with one backward pass per sample, in eval mode."""
    model.eval()
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for x, y, allowed in batches:
        for i in range(len(y)):
            loss = _nll(model(x[i:i + 1]), y[i:i + 1], allowed[i:i + 1]).sum()
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                if g is not None:
                    fisher[n] += g.detach() ** 2
            count += 1
    return {n: f / count for n, f in fisher.items()}


def make_batches(shape: tuple[int, ...], classes: int, sizes: list[int], seed: int = 0, allow: int | None = None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        allowed = torch.zeros(b, classes, dtype=torch.bool)
        allowed[:, : allow or classes] = True
        out.append((torch.randn(b, *shape, generator=g), torch.randint(0, allow or classes, (b,), generator=g), allowed))
    return out


def assert_close(fisher: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert fisher.keys() == ref.keys()
    for n in ref:
        assert fisher[n].shape == ref[n].shape, n
        assert fisher[n].grad_fn is None and not fisher[n].requires_grad, n
        torch.testing.assert_close(fisher[n], ref[n], rtol=1e-4, atol=1e-9 + 1e-5 * float(ref[n].abs().max()), msg=n)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, width: int, classes: int):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def conv_bn_net(classes: int = 4) -> Classifier:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2),
                             nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.ReLU())
    for m in backbone.modules():  # non-trivial running statistics: eval mode must use them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return Classifier(backbone, 16, classes)


def test_mlp_backbone_matches_brute_force_and_has_no_graph():
    """The README's default (params: backbone, head left out but still trainable): the result used
    to carry a ``grad_fn`` (one autograd graph across all batches)."""
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU()), 12, 5)
    params = {n: p for n, p in model.named_parameters() if not n.startswith("head.")}
    batches = make_batches((20,), 5, [7, 7, 3], allow=3)  # masked logits, as in class-IL
    fisher = per_sample_fisher(model, params, batches)
    assert model.training  # mode restored
    assert all(f.grad_fn is None for f in fisher.values())
    assert_close(fisher, brute_force(model, params, batches))


def test_conv_bn_network_matches_brute_force():
    model = conv_bn_net()
    params = {n: p for n, p in model.named_parameters() if not n.startswith("head.")}  # closed form for the Linear, vmap for conv/BN
    batches = make_batches((3, 8, 8), 4, [4, 3])
    assert_close(per_sample_fisher(model, params, batches), brute_force(model, params, batches))


def tiny_vit(classes: int = 5, depth: int = 2) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, in_chans=3, num_classes=classes, embed_dim=16, depth=depth,
                            num_heads=2, mlp_ratio=2.0)
    with torch.no_grad():
        vit.pos_embed.normal_(0, 0.5)  # timm zero-initialises it: make its gradient non-trivial
    return vit


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's fallback for CPU fused attention
def test_tiny_vit_matches_brute_force():
    """Token inputs ``[B, T, D]`` (no closed form), cls token, ``[1, T, D]`` position embedding."""
    vit = tiny_vit()
    params = {n: p for n, p in vit.named_parameters() if not n.startswith("head.")}
    batches = make_batches((3, 16, 16), 5, [3, 2])
    assert_close(per_sample_fisher(vit, params, batches), brute_force(vit, params, batches))


def _largest_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) made while ``fn`` runs (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.cpu_memory_usage for e in prof.events())


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_vmap_chunks_respect_the_memory_budget():
    """Per-sample gradients of a whole batch (batch x params x 4 bytes) are never materialised at
    once: the largest allocation stays under the budget, and chunking does not change the result."""
    vit = tiny_vit(depth=1)
    params = {n: p for n, p in vit.named_parameters() if not n.startswith("head.")}
    n_params = sum(p.numel() for p in params.values())
    batches = make_batches((3, 16, 16), 5, [10])
    whole_batch = 10 * n_params * 4
    budget = n_params * 4 + 8  # 1 sample per chunk
    assert fisher_chunk_size(n_params, budget) == 1
    unchunked = per_sample_fisher(vit, params, batches, memory_bytes=whole_batch)
    holder: dict[str, dict[str, torch.Tensor]] = {}
    peak = _largest_allocation(lambda: holder.setdefault("f", per_sample_fisher(vit, params, batches, memory_bytes=budget)))
    assert peak <= budget < whole_batch / 5
    assert_close(holder["f"], unchunked)
    assert fisher_chunk_size(11_000_000, 256 * 2**20) == 6 and fisher_chunk_size(10**12, 1) == 1


def test_memory_stays_flat_over_many_batches():
    """No autograd graph links one batch to the next: earlier inputs are freed once processed,
    and the process's resident memory does not grow with the number of batches (issue 11: the
    README's EWC run grew ~117 MB per batch until OOM)."""
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.Conv2d(16, 32, 5, padding=2), nn.BatchNorm2d(32),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = Classifier(backbone, 32, 10)  # 14k vmap parameters: per-sample gradients ~0.9 MB per batch of 16
    params = {n: p for n, p in model.named_parameters() if not n.startswith("head.")}  # head trainable, left out
    refs: list[weakref.ref] = []
    rss: list[int] = []
    n_batches = 20

    def batches():
        for i in range(n_batches):
            batch = make_batches((3, 8, 8), 10, [16], seed=i)[0]
            refs.append(weakref.ref(batch[0]))
            if i >= 2:  # batch i-2 is consumed: nothing may hold its input any more
                assert refs[i - 2]() is None, f"input of batch {i - 2} is still alive: an autograd graph kept it"
            rss.append(proc.memory_info().rss)
            if i > 5:
                assert rss[-1] - rss[5] < 64 * 2**20, f"RSS grew {(rss[-1] - rss[5]) / 2**20:.0f} MB over {i - 5} batches"
            yield batch
            del batch

    fisher = per_sample_fisher(model, params, batches())
    assert len(rss) == n_batches and all(f.grad_fn is None for f in fisher.values())


# ------------------------------------------------------------------ progress of long passes


class Recorder:
    """A ``Context.progress`` that records each pass: description, announced total, items seen."""

    def __init__(self):
        self.passes: list[dict] = []

    def __call__(self, items, total=None, description=""):
        record = {"description": description, "total": total, "items": 0}
        self.passes.append(record)
        for item in items:
            record["items"] += 1
            yield item


def _digits_ctx(tmp_path, monkeypatch):
    """A real Context over the built-in digits stream (5 experiences x 2 classes)."""
    from clbench.config import load_config
    from clbench.engine import Engine

    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, ["strategy=ewc", "train.iterations=1", "logging.console=false", f"output_dir={tmp_path}"])
    return Engine(cfg)


def test_ewc_fisher_and_feature_passes_report_progress(tmp_path, monkeypatch):
    from clbench.strategy import experience_features

    engine = _digits_ctx(tmp_path, monkeypatch)
    ctx, exp = engine.ctx, engine.stream[0]
    recorder = Recorder()
    ctx.progress = recorder
    engine.strategy.cfg.fisher_batch_size = 64
    engine.strategy.after_experience(exp, ctx)
    n = exp.train_idx.numel()
    assert recorder.passes == [{"description": "EWC Fisher (sample)", "total": -(-n // 64), "items": -(-n // 64)}]
    assert engine.strategy.reg.active and all(f.grad_fn is None for f in engine.strategy.reg.importance.values())
    feats, labels = experience_features(engine.model, exp, ctx, 100)
    assert recorder.passes[-1] == {"description": "features", "total": -(-n // 100), "items": -(-n // 100)}
    assert feats.shape[0] == labels.shape[0] == n


def test_key_fitting_reports_progress_and_keeps_its_result():
    from clbench.strategies.kv_bottleneck import KeyValueBottleneck

    z = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    keys = []
    recorder = Recorder()
    for progress in (None, recorder):
        kv = KeyValueBottleneck(8, 2, 16, 3, 4, torch.Generator().manual_seed(1))
        args = (z, 3, 64, 0.9, 1e-5, 0.1, torch.Generator().manual_seed(2))
        kv.fit_keys(*args) if progress is None else kv.fit_keys(*args, progress=progress)
        keys.append(kv.keys.clone())
    assert recorder.passes == [{"description": "key fitting", "total": 3 * 5, "items": 3 * 5}]
    torch.testing.assert_close(keys[0], keys[1], rtol=0, atol=0)  # same random draws, same keys


def test_console_pass_progress_plain_and_bar():
    import io

    from rich.console import Console

    from clbench.logging.console import PassProgress

    out = io.StringIO()
    plain = PassProgress(console=Console(file=out, force_terminal=False, width=200), plain_interval=0.0)
    assert plain.interactive is False
    assert list(plain(range(3), total=3, description="EWC Fisher")) == [0, 1, 2]
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["  EWC Fisher 1/3", "  EWC Fisher 2/3", "  EWC Fisher 3/3"]
    assert lines[3].startswith("  EWC Fisher done: 3/3 in ")
    bar = PassProgress(console=Console(file=io.StringIO(), force_terminal=True, force_interactive=True, width=100))
    assert bar.interactive is True
    assert list(bar(iter("abc"), total=3, description="features")) == ["a", "b", "c"]


def test_slca_classifier_alignment_reports_its_epochs_and_keeps_its_result():
    from clbench.alignment import AlignmentConfig, align_classifier, class_gaussians

    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(60, 4, generator=g), torch.arange(3).repeat(20)
    means, covs = class_gaussians(feats, labels, [0, 1, 2])
    head = torch.nn.Linear(4, 3)
    cfg = AlignmentConfig(epochs=3, samples_per_class=8)
    blocks = [torch.tensor([0, 1]), torch.tensor([2])]
    recorder, heads = Recorder(), []
    for progress in (None, recorder):
        heads.append(align_classifier(head, means, covs, torch.arange(3), blocks, torch.ones(3), cfg,
                                      torch.Generator().manual_seed(1), progress=progress))
    assert recorder.passes == [{"description": "classifier alignment", "total": 3, "items": 3}]
    torch.testing.assert_close(heads[0].weight, heads[1].weight, rtol=0, atol=0)
    assert not torch.equal(heads[0].weight, head.weight)  # it trained
