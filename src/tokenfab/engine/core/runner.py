"""The plug between the step loop and whatever computes tokens.

`TorchRunner` (engine/torch_runner.py) runs the real model and samples; the twin's `SimRunner`
(twin/sim_runner.py) predicts the step's duration from a step-time model and makes up tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tokenfab.engine.core.batch import StepResult
    from tokenfab.engine.core.scheduler import SchedulerOutput
    from tokenfab.engine.core.sequence import Sequence
    from tokenfab.protocol import SamplingParams


class Runner(Protocol):
    block_size: int
    num_blocks: int

    def validate(self, params: SamplingParams) -> None:
        """Raise InvalidRequestError if this runner cannot serve these settings (a grammar
        that does not compile)."""
        ...

    def add(self, seq: Sequence) -> None:
        """Set up the runner's own state for a new request (its generator, grammar matcher)."""
        ...

    def drop(self, seq: Sequence) -> None:
        """Forget a finished request's state."""
        ...

    def execute(self, sched: SchedulerOutput) -> StepResult:
        """Compute the step: write the chunks' K/V, run the model, and sample a token for each
        chunk with sample=True. A chunk that cannot be computed is dropped from `sched` (its
        sequence listed in `failed`), so the rest of the step goes on."""
        ...
