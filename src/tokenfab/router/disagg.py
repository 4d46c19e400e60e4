"""Conditional disaggregation: whether a request's prompt is computed on a prefill worker and
its KV moved, or computed by the decode worker itself. Pure: numbers in, a decision out."""

from __future__ import annotations

from dataclasses import dataclass


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
