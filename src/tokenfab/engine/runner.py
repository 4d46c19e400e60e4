"""Runs one scheduled step of the model over the paged KV cache.

The interface here is the contract between the pure-Python scheduler side (kv_cache, scheduler,
engine) and the torch side (model, attention). `TorchRunner` runs the real model; a `SimRunner`
(twin) will stand in with the factory model's step times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


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


@dataclass(slots=True)
class StepBatch:
    chunks: list[SeqChunk]


class Runner(Protocol):
    block_size: int
    num_blocks: int

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Write the chunks' K/V into their blocks, run the model, and return float32 logits of
        shape [number of chunks with sample=True, vocab], in chunk order."""
        ...
