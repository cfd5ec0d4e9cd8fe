"""eval.overlap: the periodic evaluation of iteration t runs on a weight snapshot (on a side CUDA
stream on a GPU) and gives exactly the synchronous evaluator's numbers; train.compile and
train.channels_last leave training's results unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from clbench.config import load_config
from clbench.engine import Engine, run
from clbench.registry import ClbenchError
from clbench.snapshot import WeightSnapshot, live_tensors

QUIET = ["logging.console=false", "logging.tensorboard=false", "logging.progress=false"]


def eval_records(run_dir) -> list[dict]:
    """The run's periodic-evaluation records, by iteration (times dropped)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [{k: v for k, v in r.items() if k != "time"} for r in records if r["kind"] == "eval"]
    return sorted(evals, key=lambda r: r["step"])


def run_pair(tmp_path, extra: list[str], device: str = "cpu") -> tuple[dict, dict, list, list]:
    out = []
    for overlap in (False, True):
        cfg = load_config(None, [f"output_dir={tmp_path}", f"name=o{int(overlap)}", f"device={device}", *QUIET,
                                 "eval.every=1", "eval.precision=fp32", f"eval.overlap={str(overlap).lower()}", *extra])
        out.append(run(cfg))
    return out[0], out[1], eval_records(tmp_path / "o0"), eval_records(tmp_path / "o1")


def assert_same_run(sync_summary, overlap_summary, sync_evals, overlap_evals, min_evals: int = 20):
    assert overlap_summary["status"] == "finished"
    assert len(sync_evals) == len(overlap_evals) > min_evals
    assert sync_evals == overlap_evals  # every iteration's accuracies and tracker metrics
    for key in ("acc", "forgetting", "matrix", "min_acc", "wc_acc", "wf10", "stability_gaps"):
        assert sync_summary[key] == overlap_summary[key], key


@pytest.mark.parametrize("model", ["mlp", "resnet18"])
def test_overlapped_evaluation_equals_synchronous(tmp_path, model):
    """Same seed, eval every iteration: the overlapped evaluator logs the same per-iteration
    accuracies (at the same steps) and the same summary; ResNet-18's BN running statistics
    are part of the snapshot."""
    extra = ["train.iterations=12", "scenario.n_tasks=2", f"model={model}",
             *(["model.nf=4"] if model == "resnet18" else [])]
    assert_same_run(*run_pair(tmp_path, extra))


def test_overlapped_evaluation_with_checkpoints_and_prompt_strategy(tmp_path):
    """Mid-experience checkpoints drain the pending evaluations first; a strategy with modules
    outside the model (L2P's prompt pool and keys) is snapshotted whole."""
    pytest.importorskip("timm")
    extra = ["train.iterations=8", "scenario.n_tasks=2", "scenario.classes=[0,1,2,3]", "checkpoint.every=3",
             "strategy=l2p", "strategy.pool_size=4", "strategy.top_k=2", "strategy.length=2", "train.lr=0.01",
             "model=timm", "model.arch=vit_tiny_patch16_224", "model.pretrained=false", "model.normalize=dataset",
             "model.kwargs={img_size: 8, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, in_chans: 1}"]
    torch.set_num_threads(1)
    assert_same_run(*run_pair(tmp_path, extra), min_evals=10)


def test_pending_evaluations_stay_pending_until_drained(tmp_path, monkeypatch):
    """On a CPU the overlapped pass runs at submission, so without this seam every result would
    be collected at once and draining would never matter.  Here no evaluation ever reports
    ready (``_Pending.ready`` -> False): results are collected only when the depth limit forces
    the oldest out or when the engine drains.  Then: at most ``OVERLAP_DEPTH`` are in flight (and
    that many are reached), each result is logged under its own iteration, every evaluation of
    an experience is logged before that experience's full-test record, nothing is pending when
    the evaluator's state is saved (mid-experience checkpoints), and records and tracker
    summaries equal the synchronous run's."""
    from clbench import evaluation
    from clbench.evaluation import OVERLAP_DEPTH, Evaluator

    monkeypatch.setattr(evaluation._Pending, "ready", lambda self: False)
    depths, pending_at_save, pending_at_experience_end = [], [], []
    submit, state_dict, experience_end = Evaluator.submit, Evaluator.state_dict, Evaluator.experience_end

    def counting_submit(self, iteration, n_seen):
        out = submit(self, iteration, n_seen)
        depths.append(len(self._pending))
        # a forced-out result is the oldest one, from an earlier iteration
        assert [it for it, _ in out] == sorted(it for it, _ in out) and all(it < iteration for it, _ in out)
        return out

    def checked_state_dict(self):
        if self.overlap:
            pending_at_save.append(len(self._pending))
        return state_dict(self)

    def checked_experience_end(self, experience):
        if self.overlap:
            pending_at_experience_end.append(len(self._pending))
        return experience_end(self, experience)

    monkeypatch.setattr(Evaluator, "submit", counting_submit)
    monkeypatch.setattr(Evaluator, "state_dict", checked_state_dict)
    monkeypatch.setattr(Evaluator, "experience_end", checked_experience_end)
    extra = ["train.iterations=12", "scenario.n_tasks=3", "scenario.classes=[0,1,2,3,4,5]", "checkpoint.every=5"]
    sync_summary, overlap_summary, sync_evals, overlap_evals = run_pair(tmp_path, extra)
    assert len(depths) == 36 and max(depths) == OVERLAP_DEPTH == 2  # they really stayed pending
    assert len(pending_at_experience_end) == 3 and set(pending_at_experience_end) == {0}
    # checkpoints at iterations 5, 10, 15, ... (mid-experience) and at each experience end
    assert len(pending_at_save) >= 3 + 7 and set(pending_at_save) == {0}
    assert_same_run(sync_summary, overlap_summary, sync_evals, overlap_evals, min_evals=35)
    assert [r["step"] for r in overlap_evals] == list(range(1, 37))
    # file order: an experience's periodic evaluations come before its experience-end record
    records = [json.loads(line) for line in (tmp_path / "o1" / "metrics.jsonl").read_text().splitlines()]
    ends = [i for i, r in enumerate(records) if r["kind"] == "experience"]
    assert len(ends) == 3
    for k, end in enumerate(ends):
        steps = [r["step"] for r in records[:end] if r["kind"] == "eval"]
        assert sorted(steps) == list(range(1, 12 * (k + 1) + 1)), k


def test_snapshot_swap_reads_the_captured_weights():
    """After capture, in-place updates of the live weights (an optimiser step) do not reach
    what runs inside ``swapped_in``; outside it the live weights are back."""
    torch.manual_seed(0)

    class Holder:  # a strategy-like object: a model and a module outside it
        def __init__(self):
            self.model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
            self.extra = [nn.Linear(5, 3)]

    holder = Holder()
    x = torch.randn(8, 6)
    holder.model.train()(x)  # BN running statistics move away from their init
    holder.model.eval()

    def predict():
        return holder.extra[0](holder.model(x))

    live = live_tensors(holder)
    assert len(live) == 2 + 2 + 3 + 2  # linear w/b, bn w/b + running mean/var/count, extra w/b
    before = predict().detach().clone()
    snapshot = WeightSnapshot()
    snapshot.capture(live)
    with torch.no_grad():
        for t in live:
            if t.is_floating_point():
                t.add_(0.5)
    after = predict().detach().clone()
    assert not torch.allclose(after, before)
    with snapshot.swapped_in(live):
        torch.testing.assert_close(predict(), before)
    torch.testing.assert_close(predict(), after)


def test_overlap_refuses_what_it_cannot_honour(tmp_path):
    base = [f"output_dir={tmp_path}", *QUIET, "eval.overlap=true"]
    with pytest.raises(ClbenchError, match="eval.compile=none"):
        Engine(load_config(None, [*base, "name=a", "eval.compile=default"]))
    with pytest.raises(ClbenchError, match="train.online=true"):
        Engine(load_config(None, [*base, "name=b", "train.online=true"]))
    with pytest.raises(ClbenchError, match="CUDA graphs"):
        Engine(load_config(None, [*base, "name=c", "train.compile=reduce-overhead"]))
    with pytest.raises(ClbenchError, match="train.compile 'fast' is not one of"):
        Engine(load_config(None, [f"output_dir={tmp_path}", *QUIET, "name=d", "train.compile=fast"]))


def test_compiled_training_matches_eager(tmp_path):
    """train.compile=default compiles the model's forward (CPU inductor here) and trains to the
    same losses and accuracies as eager mode."""
    pytest.importorskip("torch._inductor")
    summaries, losses = [], []
    for mode in ("none", "default"):
        cfg = load_config(None, [f"output_dir={tmp_path}", f"name={mode}", *QUIET, "train.iterations=10",
                                 "scenario.n_tasks=2", "eval.every=0", "logging.log_every=1", f"train.compile={mode}"])
        engine = Engine(cfg)
        assert (getattr(engine.model, "_compiled_call_impl", None) is not None) == (mode != "none")
        summaries.append(engine.run())
        records = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["train/loss"] for r in records if r["kind"] == "train"])
    assert len(losses[0]) == 20
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(summaries[1]["matrix"]), torch.tensor(summaries[0]["matrix"]), rtol=0, atol=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (side stream)")
def test_overlapped_evaluation_on_a_side_stream_equals_synchronous(tmp_path, monkeypatch):
    """On a GPU the evaluation runs on a side stream while training moves the weights (high
    learning rate, so every step changes predictions); each result must equal the synchronous
    evaluator's on the weights of its own iteration, computed just before submission."""
    from clbench.evaluation import Evaluator

    expected: dict[int, list[float]] = {}
    submit = Evaluator.submit

    def checked_submit(self, iteration, n_seen):
        expected[iteration] = [self.subset_accuracies(n_seen)[k] for k in range(n_seen)]
        return submit(self, iteration, n_seen)

    monkeypatch.setattr(Evaluator, "submit", checked_submit)
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=gpu", "device=cuda", *QUIET, "eval.every=1",
                             "eval.precision=fp32", "eval.overlap=true", "train.iterations=30", "scenario.n_tasks=2",
                             "model=resnet18", "model.nf=8", "train.lr=0.2"])
    assert run(cfg)["status"] == "finished"
    logged = {r["step"]: [v for k, v in sorted(r.items()) if k.startswith("eval/acc/task_")]
              for r in eval_records(tmp_path / "gpu")}
    assert len(expected) == 60 and logged.keys() == expected.keys()
    for iteration, accs in expected.items():
        assert logged[iteration] == pytest.approx(accs, abs=1e-6), iteration


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_channels_last_training_on_gpu(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=cl", "device=cuda", *QUIET, "model=resnet18",
                             "model.nf=8", "train.iterations=10", "scenario.n_tasks=2", "train.channels_last=true"])
    engine = Engine(cfg)
    summary = engine.run()
    assert summary["status"] == "finished"
    conv = next(m for m in engine.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sync debug mode)")
def test_training_step_makes_no_host_sync(tmp_path):
    """Device-resident data: fetching a batch, augmenting it and one optimiser step queue work
    on the GPU without waiting for it (torch.cuda sync debug mode raises on any sync)."""
    from clbench.engine import batch_schedule, training_samples

    cfg = load_config(None, [f"output_dir={tmp_path}", "name=s", "device=cuda", *QUIET, "model=resnet18",
                             "model.nf=8", "train.augment=crop_flip", "train.iterations=6", "scenario.n_tasks=2"])
    engine = Engine(cfg)
    exp = engine.stream[0]
    engine._prepare_experience(exp, 6)
    sample_idx, sample_exp, task_ids = training_samples([exp], engine.stream.train.x.device)
    batches = list(batch_schedule(sample_idx, sample_exp, engine.cfg, 0))
    engine._step(engine._fetch(*batches[0], [exp], task_ids))  # warm-up (lazy initialisations)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for idx, which in batches[1:5]:
            engine._step(engine._fetch(idx, which, [exp], task_ids))
    finally:
        torch.cuda.set_sync_debug_mode(0)
