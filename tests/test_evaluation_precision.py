"""The evaluator's bf16 autocast gives the fp32 accuracies within a stated tolerance."""

from __future__ import annotations

import pytest
import torch

from clbench.config import load_config
from clbench.engine import Engine
from clbench.evaluation import resolve_precision
from clbench.registry import ClbenchError

TOLERANCE = 0.02  # bf16 flips only predictions whose top-2 logits are within its rounding


@pytest.mark.parametrize("model", ["mlp", "resnet18"])
def test_bf16_accuracies_match_fp32_within_tolerance(tmp_path, model):
    overrides = [f"output_dir={tmp_path}", "name=r", "logging.console=false", "logging.tensorboard=false",
                 "checkpoint.enabled=false", "train.iterations=40", "eval.every=0", "eval.precision=fp32",
                 f"model={model}", *(["model.nf=4"] if model == "resnet18" else [])]
    engine = Engine(load_config(None, overrides))
    engine.run()
    evaluator = engine.evaluator
    fp32 = evaluator.subset_accuracies(len(engine.stream))
    evaluator.precision = "bf16"
    bf16 = evaluator.subset_accuracies(len(engine.stream))
    assert fp32.keys() == bf16.keys()
    assert sum(fp32.values()) / len(fp32) > 0.3  # a trained model, so the comparison means something
    for k in fp32:
        assert abs(fp32[k] - bf16[k]) <= TOLERANCE, (k, fp32[k], bf16[k])


def test_precision_resolution_and_errors():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ClbenchError, match="fp32, bf16"):
        resolve_precision("fp16", torch.device("cpu"))


def test_compiled_predict_sees_every_optimiser_step(tmp_path):
    """eval.compile: the compiled predict equals the eager one, also after the weights changed."""
    pytest.importorskip("torch._inductor")
    overrides = [f"output_dir={tmp_path}", "name=c", "logging.console=false", "logging.tensorboard=false",
                 "checkpoint.enabled=false", "train.iterations=5", "eval.every=0", "eval.baseline=false",
                 "eval.compile=default", "scenario.n_tasks=2"]
    engine = Engine(load_config(None, overrides))
    evaluator, model = engine.evaluator, engine.model
    x = engine.ctx.inputs(evaluator.x[:64])  # real test images of the stream
    model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(evaluator.predict_fn()(x, None), engine.strategy.predict(x, None))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # what an optimiser step does: in place
    with torch.inference_mode():
        torch.testing.assert_close(evaluator.predict_fn()(x, None), engine.strategy.predict(x, None))


def test_unknown_compile_mode_is_refused(tmp_path):
    with pytest.raises(ClbenchError, match="reduce-overhead"):
        Engine(load_config(None, [f"output_dir={tmp_path}", "name=d", "eval.compile=fast", "logging.console=false"]))
