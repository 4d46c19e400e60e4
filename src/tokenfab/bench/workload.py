"""What to send: request specs from synthetic lengths or from a parsed trace.

Prompts are token-id lists sent to `/v1/completions` (the OpenAI API accepts `prompt` as a list
of integers, and so do vLLM and tokenfab). Token ids, unlike text, give every server exactly the
same prompt length and content whatever its detokenize/retokenize round trip does, which matters
both for comparing servers and for prefix-cache sharing in trace replay.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenfab.bench.traces import TraceRow

# Without a tokenizer we draw from this range: past the special and byte tokens that
# vocabularies put first, and within even the 512-entry vocabularies of the tiny test models.
FALLBACK_TOKEN_RANGE = (100, 500)


@dataclass(frozen=True)
class RequestSpec:
    """One request to send. `arrival` is seconds after the run starts, or None for closed loop
    (send as soon as a concurrency slot frees)."""

    index: int
    prompt: list[int]
    max_tokens: int
    arrival: float | None = None


def token_pool_from_tokenizer(path: str | Path) -> list[int]:
    """Ids of ordinary tokens: the base vocabulary minus special and added tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    excluded = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    pool = [i for i in range(tok.vocab_size) if i not in excluded]
    if not pool:
        raise ValueError(f"tokenizer at {path} has no ordinary tokens")
    return pool


def fallback_token_pool() -> list[int]:
    return list(range(*FALLBACK_TOKEN_RANGE))


def random_prompt(pool: Sequence[int], length: int, rng: random.Random) -> list[int]:
    return rng.choices(pool, k=length)


def synthetic_requests(
    pool: Sequence[int], input_len: int, output_len: int, seed: int = 0
) -> Iterator[RequestSpec]:
    """Endless stream of fixed-length random prompts (reproducible from the seed)."""
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input_len and output_len must be >= 1, got {input_len}, {output_len}")
    rng = random.Random(seed)
    index = 0
    while True:
        yield RequestSpec(index, random_prompt(pool, input_len, rng), output_len)
        index += 1


def poisson_arrivals(
    specs: Iterator[RequestSpec], rate: float, seed: int = 0
) -> Iterator[RequestSpec]:
    """Give each spec an arrival time from a Poisson process of `rate` requests per second."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    rng = random.Random(seed ^ 0x5EED)
    t = 0.0
    for spec in specs:
        yield RequestSpec(spec.index, spec.prompt, spec.max_tokens, t)
        t += rng.expovariate(rate)


@dataclass(frozen=True)
class TraceSynthesis:
    """How to turn trace rows into requests for a (small) model.

    block_tokens: tokens per Mooncake hash id (the trace uses 512); input lengths scale by
      block_tokens / trace_block_tokens so the sharing structure stays intact.
    input_scale: multiplies input lengths of traces without hash ids (Azure).
    output_scale: multiplies output lengths (all traces).
    time_scale: multiplies arrival times (0.5 = replay twice as fast).
    """

    block_tokens: int = 16
    trace_block_tokens: int = 512
    input_scale: float = 1.0
    output_scale: float = 1.0
    time_scale: float = 1.0
    max_input_len: int | None = None
    max_output_len: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_tokens < 1 or self.trace_block_tokens < 1:
            raise ValueError("block sizes must be >= 1")
        for name in ("input_scale", "output_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.time_scale < 0:
            raise ValueError(f"time_scale must be >= 0, got {self.time_scale}")


def block_tokens_for(hash_id: int, pool: Sequence[int], block_tokens: int, seed: int) -> list[int]:
    """The content of one hashed block: a pure function of (seed, hash id), so equal ids in any
    two requests give equal token blocks."""
    return random.Random(f"{seed}:{hash_id}").choices(pool, k=block_tokens)


def _scaled(value: int, scale: float, cap: int | None) -> int:
    n = max(1, round(value * scale))
    return min(n, cap) if cap is not None else n


def trace_requests(
    rows: Sequence[TraceRow], pool: Sequence[int], synth: TraceSynthesis
) -> Iterator[RequestSpec]:
    """Requests for trace rows, arrivals relative to the first row."""
    if not rows:
        return
    t0 = rows[0].timestamp_s
    block_scale = synth.block_tokens / synth.trace_block_tokens
    for index, row in enumerate(rows):
        if row.hash_ids:
            length = _scaled(row.input_len, block_scale, synth.max_input_len)
            prompt = _hashed_prompt(row, index, pool, synth, length)
        else:
            length = _scaled(row.input_len, synth.input_scale, synth.max_input_len)
            prompt = random_prompt(pool, length, random.Random(f"{synth.seed}:row:{index}"))
        out = _scaled(row.output_len, synth.output_scale, synth.max_output_len)
        yield RequestSpec(index, prompt, out, (row.timestamp_s - t0) * synth.time_scale)


def _hashed_prompt(
    row: TraceRow, index: int, pool: Sequence[int], synth: TraceSynthesis, length: int
) -> list[int]:
    prompt: list[int] = []
    for hid in row.hash_ids:
        if len(prompt) >= length:
            break
        prompt.extend(block_tokens_for(hid, pool, synth.block_tokens, synth.seed))
    if len(prompt) < length:
        # Rounding can ask for a few tokens more than the blocks hold: make them unique.
        rng = random.Random(f"{synth.seed}:tail:{index}")
        prompt.extend(random_prompt(pool, length - len(prompt), rng))
    return prompt[:length]
