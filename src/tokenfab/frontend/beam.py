"""Beam search (vLLM's `use_beam_search`), run by the frontend over one-token engine calls.

Each step asks the engine for one greedy token with the top 2·width logprobs for every live
beam (the prompt plus the beam's tokens: the prefix cache makes the repeated prompt cheap),
extends each beam by each candidate, and keeps the best `width` by cumulative logprob. A
kept candidate that ends with EOS is finished; the search ends when no beam is live or the
beams reach max_tokens, and the answer is the best `width` of finished and live beams by
length-normalised score. The engine stays a one-sequence-per-request engine; beam search is
a client of it, as in vLLM's serving layer.

`advance` and `best` are pure; `search` is the I/O edge (a function that runs one-token
requests is passed in).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tokenfab.protocol import GenerateOutput, GenerateRequest, SamplingParams

MAX_WIDTH = 10
"""2·width alternatives per step must fit the engine's 20 top logprobs."""


@dataclass(frozen=True, slots=True)
class Beam:
    tokens: tuple[int, ...]
    logprob: float
    finished: bool = False


def score(beam: Beam, num_prompt_tokens: int, length_penalty: float = 1.0) -> float:
    """Cumulative logprob over (prompt + output length, not counting a final EOS)^penalty."""
    length = num_prompt_tokens + len(beam.tokens) - (1 if beam.finished else 0)
    return beam.logprob / max(length, 1) ** length_penalty


def advance(
    live: list[Beam],
    alternatives: list[list[tuple[int, float]]],
    width: int,
    eos_ids: frozenset[int],
) -> tuple[list[Beam], list[Beam]]:
    """One step: (new live beams, beams finished this step). `alternatives[i]` are live[i]'s
    candidate (token, logprob) pairs."""
    candidates = [
        Beam(beam.tokens + (token,), beam.logprob + logprob, token in eos_ids)
        for beam, options in zip(live, alternatives, strict=True)
        for token, logprob in options
    ]
    # Stable sort: equal logprobs keep the engine's order of alternatives.
    kept = sorted(candidates, key=lambda b: b.logprob, reverse=True)[:width]
    return [b for b in kept if not b.finished], [b for b in kept if b.finished]


def best(beams: list[Beam], width: int, num_prompt_tokens: int) -> list[Beam]:
    return sorted(beams, key=lambda b: score(b, num_prompt_tokens), reverse=True)[:width]


RunOne = Callable[[list[GenerateRequest]], Awaitable[list[GenerateOutput]]]
"""Runs one-token requests together and returns each one's (merged) output, in order."""


async def search(
    run: RunOne,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    width: int,
    eos_ids: frozenset[int],
    cache_salt: str | None = None,
) -> list[Beam]:
    """The `width` best beams for one prompt, at most params.max_tokens tokens each."""
    step_params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * width, ignore_eos=True)
    live = [Beam((), 0.0)]
    done: list[Beam] = []
    max_tokens = params.max_tokens or 16
    for step in range(max_tokens):
        requests = [
            GenerateRequest(
                request_id=f"{request_id}-s{step}-{i}",
                prompt_token_ids=prompt + list(beam.tokens),
                sampling=step_params,
                cache_salt=cache_salt,
            )
            for i, beam in enumerate(live)
        ]
        outputs = await run(requests)
        alternatives = [_alternatives(out) for out in outputs]
        live, finished = advance(live, alternatives, width, eos_ids)
        done.extend(finished)
        if not live:
            break
    return best(done + live, width, len(prompt))


def _alternatives(out: GenerateOutput) -> list[tuple[int, float]]:
    if out.error is not None:
        raise RuntimeError(out.error)
    if not out.logprobs:
        raise RuntimeError("beam search: the engine returned no logprobs")
    position = out.logprobs[0]
    options = [(t.token_id, t.logprob) for t in position.top]
    return options or [(position.token_id, position.logprob)]
