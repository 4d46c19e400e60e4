"""What the planner sees each interval: the pools and the load, reduced from the workers'
load reports (and, when given, the frontend's latency metrics).

Pure: the reduction takes two sets of reports and the seconds between them; the planner
process (the I/O edge) collects the reports and reads the clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from tokenfab.protocol import LoadReport, WorkerRole


@dataclass(frozen=True)
class WorkerView:
    """One worker as the planner knows it."""

    worker_id: str
    role: WorkerRole
    draining: bool = False
    """A role switch is under way (its in-flight requests are finishing)."""
    running: int = 0
    waiting: int = 0


@dataclass(frozen=True)
class Observation:
    """One interval of load. Rates are per second over the interval; lengths are means of
    the requests that finished in it."""

    interval_s: float
    request_rate: float
    prompt_tokens_mean: float
    output_tokens_mean: float
    prefix_hit_rate: float
    """Share of prompt tokens found in a prefix cache (they need no prefill)."""
    prefill_queue_tokens: int
    """Prompt tokens admitted or waiting but not yet computed on prefill workers (on all
    workers when there are none)."""
    decode_waiting: int
    """Requests waiting for a decode slot on decode workers."""
    workers: tuple[WorkerView, ...]
    ttft_ms: float | None = None
    """Measured mean time to first token over the interval (None: not measured)."""
    itl_ms: float | None = None
    prefill_computed_rate: float | None = None
    """Prompt tokens per second the prefill workers computed (all workers' when there are
    none; None: not reported, estimated from finished requests instead)."""

    @property
    def prefill_tokens_rate(self) -> float:
        """Prompt tokens per second that need computing (cache hits excluded)."""
        if self.prefill_computed_rate is not None:
            return self.prefill_computed_rate
        # A disaggregated request finishes twice (its prefill and its decode worker) and
        # counts its prompt on both: the engines' own count above has no such error.
        return self.request_rate * self.prompt_tokens_mean * (1.0 - self.prefix_hit_rate)

    @property
    def decode_tokens_rate(self) -> float:
        return self.request_rate * self.output_tokens_mean

    def count(self, role: WorkerRole) -> int:
        return sum(1 for w in self.workers if w.role == role)


def _delta(cur: int, prev: int) -> int:
    # A restarted engine starts its counters at 0 again: count from there.
    return cur - prev if cur >= prev else cur


def reduce_reports(
    prev: Mapping[str, LoadReport],
    cur: Mapping[str, LoadReport],
    interval_s: float,
    workers: tuple[WorkerView, ...],
    *,
    ttft_ms: float | None = None,
    itl_ms: float | None = None,
) -> Observation:
    """The observation of one interval from each worker's latest report at its start
    (`prev`) and end (`cur`). A worker without a previous report contributes its whole
    counters (it is new)."""
    if interval_s <= 0:
        raise ValueError(f"interval must be > 0 s, got {interval_s}")
    zero = LoadReport()
    role = {w.worker_id: w.role for w in workers}
    # the prefill pool's work is what prefill workers compute and queue; a decode worker's
    # own prefill of short prompts is decode-pool work (aggregated fleets: everyone's)
    split = any(r == "prefill" for r in role.values())

    def prefill_pool(wid: str) -> bool:
        return not split or role.get(wid) == "prefill"

    finished = prompt = gen = queries = hits = computed = 0
    for wid, r in cur.items():
        p = prev.get(wid, zero)
        finished += _delta(r.requests_finished, p.requests_finished)
        prompt += _delta(r.prompt_tokens, p.prompt_tokens)
        gen += _delta(r.generation_tokens, p.generation_tokens)
        queries += _delta(r.prefix_cache_queries, p.prefix_cache_queries)
        hits += _delta(r.prefix_cache_hits, p.prefix_cache_hits)
        if prefill_pool(wid):
            computed += _delta(r.prefill_tokens_computed, p.prefill_tokens_computed)
    # prompt_tokens counts requests at their first token; finished at their end: the means
    # use the finished count for both (close enough over an interval; both lag arrivals).
    n = max(finished, 1)
    return Observation(
        interval_s=interval_s,
        request_rate=finished / interval_s,
        prompt_tokens_mean=prompt / n if finished else 0.0,
        output_tokens_mean=gen / n if finished else 0.0,
        prefix_hit_rate=min(1.0, hits / queries) if queries else 0.0,
        prefill_queue_tokens=sum(
            r.queued_prefill_tokens for w, r in cur.items() if prefill_pool(w)
        ),  # fmt: skip
        decode_waiting=sum(r.waiting for w, r in cur.items() if role.get(w) == "decode"),
        workers=tuple(
            replace(w, running=cur[w.worker_id].running, waiting=cur[w.worker_id].waiting)
            if w.worker_id in cur
            else w
            for w in workers
        ),
        ttft_ms=ttft_ms,
        itl_ms=itl_ms,
        prefill_computed_rate=computed / interval_s,
    )


@dataclass(frozen=True)
class LatencySums:
    """A latency histogram's running sum (seconds) and count, as the frontend's /metrics
    shows them (`tokenfab_time_to_first_token_seconds`, `..._inter_token_latency_...`)."""

    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    itl_sum: float = 0.0
    itl_count: float = 0.0


def mean_latencies_ms(prev: LatencySums, cur: LatencySums) -> tuple[float | None, float | None]:
    """Mean TTFT and ITL (ms) over an interval from two readings (None: nothing measured;
    a restarted frontend counts from zero)."""

    def mean(s0: float, n0: float, s1: float, n1: float) -> float | None:
        if n1 < n0:
            s0 = n0 = 0.0
        return (s1 - s0) / (n1 - n0) * 1e3 if n1 > n0 else None

    return (
        mean(prev.ttft_sum, prev.ttft_count, cur.ttft_sum, cur.ttft_count),
        mean(prev.itl_sum, prev.itl_count, cur.itl_sum, cur.itl_count),
    )
