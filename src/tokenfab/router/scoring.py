"""Which worker should take a request: a cost per worker from its prefix overlap and load.

All costs are in KV blocks, so prefill (compute) and decode (memory) terms add up:

    prefill = blocks of the prompt the worker must compute (not cached or pending there)
            + blocks it holds below G1 (host, disk, remote) times that tier's cost: loading
              one is cheaper than computing it, dearer than a G1 hit (TIER_COST)
            + blocks already queued for prefill there that this request does not share
    decode  = blocks active there (in use, plus pending from recent routes)
            + the request's own new blocks (those it cannot share there)
    cost    = overlap_weight * prefill + decode

Why the two refinements over "uncached + queued" and "active": a request whose prefix another
in-flight request is computing on worker A rides on that computation, and shares its blocks.
Counting that queued prefill and those active blocks against A (and charging nothing for the
blocks the request would allocate elsewhere) makes A look worse than an idle worker, so a burst
of one new prefix would spread over every worker and compute the prefix everywhere.

The lowest cost wins; ties go to the less loaded worker (fewer requests, then fewer active
blocks), then to a seeded random choice. With a temperature > 0 the worker is sampled from a
softmax over the costs normalized to [0, 1] instead, which spreads load at the price of hits.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

TIER_COST: dict[str, float] = {"host": 0.1, "disk": 0.25, "remote": 0.5}
"""Cost of loading a block from a tier below G1, as a fraction of recomputing it. Estimates
from the tiers' measured reads (benchmarks/kv_tiers.py: a 360 KiB SmolLM2 block loads from
host memory in well under 0.1 ms and from a cold disk in ~1 ms, where computing its 16 tokens
takes milliseconds on CPU), padded for the transfer's share of a step and G4's network."""


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What the router knows about one candidate worker for one request."""

    worker_id: str
    overlap_blocks: int = 0
    """Leading blocks of the request cached on the worker or pending there."""
    pending_overlap_blocks: int = 0
    """Of `overlap_blocks`, those only pending: routed there, not yet confirmed cached (they are
    being computed, and are part of the worker's queued prefill)."""
    queued_prefill_tokens: int = 0
    """Prompt tokens waiting for prefill: reported by the worker plus pending routes."""
    active_blocks: int = 0
    """KV blocks in use: reported by the worker plus pending routes."""
    num_requests: int = 0
    """Running + waiting requests, plus routes the worker has not reported yet."""
    lower_overlap_blocks: int = 0
    """Blocks after `overlap_blocks` the worker holds in tiers below G1."""
    lower_overlap_cost: float = 0.0
    """Their load cost in recompute-blocks (each block's cheapest tier's TIER_COST)."""


@dataclass(frozen=True, slots=True)
class WorkerScore:
    worker_id: str
    overlap_blocks: int
    prefill_blocks: float
    decode_blocks: float
    cost: float
    probability: float
    """Chance this worker was picked (1.0/0.0 at temperature 0, or split among tied ones)."""


@dataclass(frozen=True, slots=True)
class ScoreDecision:
    worker_id: str
    scores: tuple[WorkerScore, ...]
    """Every candidate's score, sorted by worker id: for logging and tests."""


def prefill_blocks(load: WorkerLoad, num_prompt_tokens: int, block_size: int) -> float:
    held = load.overlap_blocks + load.lower_overlap_blocks
    uncached = max(0, num_prompt_tokens - held * block_size) / block_size
    uncached += load.lower_overlap_cost
    queued = load.queued_prefill_tokens / block_size
    # The pending part of the match is queued prefill this request shares, not a queue ahead
    # of it (at most what is queued: reports and pending routes may disagree for a while).
    shared = min(float(load.pending_overlap_blocks), queued)
    return uncached + queued - shared


def decode_blocks(load: WorkerLoad, num_prompt_tokens: int, block_size: int) -> float:
    own_blocks = -(-num_prompt_tokens // block_size)
    return float(load.active_blocks + max(0, own_blocks - load.overlap_blocks))


def score_workers(
    loads: Sequence[WorkerLoad], num_prompt_tokens: int, block_size: int, overlap_weight: float
) -> list[tuple[WorkerLoad, float, float, float]]:
    """(load, prefill, decode, cost) per worker, in the order given."""
    out: list[tuple[WorkerLoad, float, float, float]] = []
    for load in loads:
        prefill = prefill_blocks(load, num_prompt_tokens, block_size)
        decode = decode_blocks(load, num_prompt_tokens, block_size)
        out.append((load, prefill, decode, overlap_weight * prefill + decode))
    return out


def choose(
    loads: Sequence[WorkerLoad],
    num_prompt_tokens: int,
    block_size: int,
    rng: random.Random,
    overlap_weight: float = 1.0,
    temperature: float = 0.0,
) -> ScoreDecision:
    """Pick a worker (see the module docstring). Deterministic given `rng`'s state; the
    candidates' order does not matter."""
    if not loads:
        raise ValueError("no candidate workers")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    ordered = sorted(loads, key=lambda load: load.worker_id)
    scored = score_workers(ordered, num_prompt_tokens, block_size, overlap_weight)
    costs = [cost for _, _, _, cost in scored]
    if temperature == 0.0:
        probs = argmin_probabilities(ordered, costs)
    else:
        probs = softmax_probabilities(costs, temperature)
    picked = sample_index(probs, rng)
    scores = tuple(
        WorkerScore(load.worker_id, load.overlap_blocks, prefill, decode, cost, p)
        for (load, prefill, decode, cost), p in zip(scored, probs, strict=True)
    )
    return ScoreDecision(ordered[picked].worker_id, scores)


def softmax_probabilities(costs: Sequence[float], temperature: float) -> list[float]:
    """Softmax of -cost/temperature over costs normalized to [0, 1], so the temperature means
    the same whatever the scale of the costs (equal costs: uniform)."""
    lo, hi = min(costs), max(costs)
    span = hi - lo
    if span <= 0:
        return [1.0 / len(costs)] * len(costs)
    weights = [math.exp(-((c - lo) / span) / temperature) for c in costs]
    total = sum(weights)
    return [w / total for w in weights]


def argmin_probabilities(loads: Sequence[WorkerLoad], costs: Sequence[float]) -> list[float]:
    tied = tied_best(costs, [(load.num_requests, load.active_blocks) for load in loads])
    probs = [0.0] * len(costs)
    for i in tied:
        probs[i] = 1.0 / len(tied)
    return probs


def tied_best(costs: Sequence[float], load_keys: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of the lowest costs (equal within 1e-9), narrowed to the least loaded of them
    (`load_keys`: requests, then active blocks), in the order given."""
    best = min(costs)
    tied = [i for i, c in enumerate(costs) if math.isclose(c, best, rel_tol=1e-9, abs_tol=1e-9)]
    if len(tied) > 1:
        # Ties go to the less loaded worker: fewer requests, then fewer active blocks.
        least = min(load_keys[i] for i in tied)
        tied = [i for i in tied if load_keys[i] == least]
    return tied


def sample_index(probs: Sequence[float], rng: random.Random) -> int:
    """Index drawn from `probs`; draws from `rng` only when there is a real choice, so a
    router's random stream advances the same way wherever the choice is forced."""
    nonzero = [i for i, p in enumerate(probs) if p > 0.0]
    if len(nonzero) == 1:
        return nonzero[0]
    x = rng.random()
    acc = 0.0
    for i in nonzero:
        acc += probs[i]
        if x < acc:
            return i
    return nonzero[-1]


def uniform_index(n: int, rng: random.Random) -> int:
    """`sample_index` over n equal probabilities (1/n each, summed in the same order, so the
    same draw gives the same index), without building them."""
    if n == 1:
        return 0
    x = rng.random()
    p = 1.0 / n
    acc = 0.0
    for i in range(n):
        acc += p
        if x < acc:
            return i
    return n - 1
