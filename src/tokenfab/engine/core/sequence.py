"""One request's state inside the engine: its tokens, progress and block hashes.

Pure Python (no torch): the scheduler and KV cache read and update it; the twin can build
sequences without a model.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

from tokenfab.kv.hashing import hash_block, root_hash
from tokenfab.protocol import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request being served. `token_ids` is prompt + generated so far; positions
    [0, num_computed_tokens) have their K/V in the cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = 0.0
    block_size: int = 16
    extra_keys: tuple[str, ...] = ()
    lora_name: str | None = None
    max_total_tokens: int = 1 << 62
    """prompt + generated may not exceed this (the context length)."""

    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = field(init=False, default=0)
    status: SeqStatus = field(init=False, default=SeqStatus.WAITING)
    block_hashes: list[int] = field(init=False, default_factory=list)
    """Chained hashes of every full block of token_ids (computed or not), extended
    incrementally as tokens are appended."""
    num_cached_tokens: int = field(init=False, default=-1)
    """Prefix-cache hit at first admission, in tokens (-1 until admitted)."""
    num_preemptions: int = field(init=False, default=0)
    finish_reason: str | None = field(init=False, default=None)
    stop_reason: str | int | None = field(init=False, default=None)
    state: Any = field(init=False, default=None)
    """Engine-side per-request state (detokenizer, generator, ...); opaque here."""

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self._extend_hashes()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if len(self.token_ids) % self.block_size == 0:
            self._extend_hashes()

    def _extend_hashes(self) -> None:
        bs = self.block_size
        hashes = self.block_hashes
        parent = hashes[-1] if hashes else root_hash(self.extra_keys)
        for start in range(len(hashes) * bs, len(self.token_ids) - bs + 1, bs):
            parent = hash_block(parent, self.token_ids[start : start + bs])
            hashes.append(parent)

    def block_tokens(self, index: int) -> Seq[int]:
        return self.token_ids[index * self.block_size : (index + 1) * self.block_size]
