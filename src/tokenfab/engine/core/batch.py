"""What one step asks of a runner (`StepBatch`) and what the runner gives back (`StepResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenfab.engine.core.sequence import Sequence
from tokenfab.protocol import PositionLogprobs


@dataclass(slots=True)
class SeqChunk:
    """One sequence's share of a step."""

    token_ids: list[int]
    """The tokens to compute this step: a prefill chunk, or the single newest token in decode."""
    start_pos: int
    """Position of token_ids[0]; positions [0, start_pos) are already in the KV cache."""
    block_table: list[int]
    """Physical block ids holding positions [0, start_pos + len(token_ids)), in order."""
    sample: bool
    """Whether to return logits at the last of token_ids (false for a non-final prefill chunk)."""
    all_logits: bool = False
    """Return logits at every one of token_ids (prompt logprobs); they include the sample row."""


@dataclass(slots=True)
class StepBatch:
    chunks: list[SeqChunk]


@dataclass(slots=True)
class SampledToken:
    """The token a runner picked for one sequence this step."""

    seq: Sequence
    token_id: int
    logprobs: PositionLogprobs | None = None
    grammar_stop: bool = False
    """The request's grammar accepts nothing more after this token (structured output done)."""


@dataclass(slots=True)
class PromptLogprobs:
    """Prompt logprobs computed this step: `entries[r]` is position `first + r`'s."""

    seq: Sequence
    first: int
    entries: list[PositionLogprobs]


@dataclass
class StepResult:
    tokens: list[SampledToken] = field(default_factory=list)
    """One per scheduled sequence that samples this step and did not fail, in batch order."""
    failed: list[tuple[Sequence, str]] = field(default_factory=list)
    """Sequences the runner could not compute or sample, with the error to report."""
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    seconds: float | None = None
    """The step's modelled duration (a simulated runner); None: the engine's clock measures it."""
