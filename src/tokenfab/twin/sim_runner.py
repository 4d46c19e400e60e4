"""`SimRunner`: the engine core's runner with no model. A step's duration comes from a
step-time model and its tokens are made up (no tokenizer, no logits)."""

from __future__ import annotations

from tokenfab.engine.core.batch import SampledToken, StepResult
from tokenfab.engine.core.scheduler import SchedulerOutput
from tokenfab.engine.core.sequence import Sequence
from tokenfab.protocol import SamplingParams
from tokenfab.twin.step_time import LinearStepTime

SIM_TOKEN = 1
"""Every generated token (requests run with ignore_eos; only their lengths matter)."""


class SimRunner:
    def __init__(self, num_blocks: int, block_size: int, step_time: LinearStepTime) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.step_time = step_time
        self.last_seconds = 0.0

    def validate(self, params: SamplingParams) -> None:
        return None

    def add(self, seq: Sequence) -> None:
        return None

    def drop(self, seq: Sequence) -> None:
        return None

    def execute(self, sched: SchedulerOutput) -> StepResult:
        self.last_seconds = seconds = self.step_time.seconds(sched.batch)
        tokens = [SampledToken(s.seq, SIM_TOKEN) for s in sched.scheduled if s.sample]
        return StepResult(tokens=tokens, seconds=seconds)
