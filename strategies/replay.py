"""Experience replay with a reservoir buffer (Chaudhry et al. 2019, "On Tiny Episodic Memories
in Continual Learning", Alg. 1): each training batch is the incoming batch concatenated with
a batch drawn uniformly from the buffer; the incoming samples are then offered to the
reservoir (:class:`clbench.buffers.ReservoirBuffer`)."""

from dataclasses import dataclass
from typing import Any, Optional


from clbench.buffers import ReservoirBuffer
from clbench.registry import register_strategy
from clbench.strategy import Batch, Context, Strategy, StrategyConfig
from clbench.validation import bounded


@dataclass
class ReplayConfig(StrategyConfig):
    name: str = "replay"
    buffer_size: int = bounded(200, ge=0)  # samples kept over the whole stream
    replay_batch_size: Optional[int] = bounded(None, ge=1)  # buffer samples per step (default: train.batch_size)


@register_strategy("replay", config=ReplayConfig, description="Experience replay (ER) with a reservoir buffer")
class Replay(Strategy):
    """ER: loss on [current batch ; buffer batch], reservoir update with the current batch."""

    cfg: ReplayConfig

    def setup(self, model, ctx: Context) -> None:
        super().setup(model, ctx)
        self.buffer = ReservoirBuffer(self.cfg.buffer_size, seed=ctx.seed)

    def prepare_batch(self, batch: Batch, ctx: Context) -> Batch:
        if len(self.buffer) == 0:
            return batch
        stored = self.buffer.sample(self.cfg.replay_batch_size or len(batch))
        return batch.cat(Batch(stored["x"], stored["y"], stored["task"]))

    def after_step(self, batch: Batch, ctx: Context) -> None:
        self.buffer.add(x=batch.x, y=batch.y, task=batch.task)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.load_state_dict(state["buffer"])
