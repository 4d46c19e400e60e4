"""Conditional disaggregation: whether a request's prompt is computed on a prefill worker and
its KV moved, or computed by the decode worker itself. Pure: numbers in, a decision out
(`route_disagg`: the frontend's and the twin's choice of decode and prefill worker)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenfab.router.router import RouteDecision
    from tokenfab.router.scoring import WorkerLoad


@dataclass(frozen=True, slots=True)
class DisaggConfig:
    min_uncached_tokens: int = 256
    """Prompts missing fewer tokens than this on the decode worker prefill there: moving the
    KV and a second hop cost more than computing a short chunk."""
    max_prefill_queue_tokens: int = 16384
    """A prefill worker with more prompt tokens queued than this is too far behind: the
    decode worker prefills locally instead of waiting."""
    hold_s: float = 30.0
    """How long a prefill worker holds blocks for a decode worker that has not pulled them."""


def should_prefill_remotely(
    config: DisaggConfig, uncached_tokens: int, prefill_queue_tokens: int = 0
) -> bool:
    return (
        uncached_tokens >= config.min_uncached_tokens
        and prefill_queue_tokens <= config.max_prefill_queue_tokens
    )


def route_disagg(
    route: Callable[[str, Sequence[int], int, list[str]], RouteDecision],
    worker_load: Callable[[str], WorkerLoad],
    release: Callable[[str], None],
    config: DisaggConfig,
    request_id: str,
    hashes: Sequence[int],
    num_prompt_tokens: int,
    decoders: list[str],
    prefillers: list[str],
) -> tuple[RouteDecision, RouteDecision | None]:
    """Where a request goes when there are prefill workers: (the decode worker's decision,
    the prefill worker's decision or None to prefill on the decode worker). The decode
    worker is chosen by load and its own cached prefix; a prefill worker (routed as
    `<request_id>#prefill`) by KV overlap, unless the uncached part is short or that worker's
    queue is too long. `route(request_id, hashes, tokens, candidates)`, `worker_load` and
    `release` (the router's `on_request_finished`) are the caller's router: the frontend
    passes its health-filtered routing, the twin the bare `Router`'s."""
    decision = route(request_id, hashes, num_prompt_tokens, decoders)
    uncached = num_prompt_tokens - decision.predicted_hit_tokens
    if not should_prefill_remotely(config, uncached):
        return decision, None
    pre = route(f"{request_id}#prefill", hashes, num_prompt_tokens, prefillers)
    queued = worker_load(pre.worker_id).queued_prefill_tokens - num_prompt_tokens  # minus ours
    if not should_prefill_remotely(config, uncached, queued):
        release(pre.request_id)
        return decision, None
    return decision, pre
