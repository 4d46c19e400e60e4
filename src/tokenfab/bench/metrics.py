"""Per-request measurements and their summary: latency percentiles, throughput, goodput.

Definitions (all latencies in the summary are milliseconds):
- TTFT: request sent -> first chunk carrying generated text.
- ITL (inter-token latency): gaps between successive text chunks of one stream, pooled over
  all requests (servers here stream one token per chunk).
- TPOT: per request, (e2e - ttft) / (output_tokens - 1).
- Goodput: completed requests per second whose TTFT <= the TTFT limit and whose TPOT (the
  mean ITL of that request) <= the ITL limit; limits left unset are not checked.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


@dataclass
class RequestResult:
    index: int
    start: float  # seconds after the run began
    prompt_len: int  # what we sent
    max_tokens: int
    ok: bool = False
    error: str | None = None
    ttft: float | None = None  # seconds
    e2e: float | None = None  # seconds
    itls: list[float] = field(default_factory=list)  # seconds
    output_tokens: int = 0
    prompt_tokens: int | None = None  # as counted by the server (usage), if reported

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (the
    numpy default); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Distribution:
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float], scale: float = 1.0) -> Distribution:
        v = [x * scale for x in values]
        if not v:
            return cls(math.nan, math.nan, math.nan, math.nan, math.nan, 0)
        return cls(
            sum(v) / len(v), percentile(v, 50), percentile(v, 90), percentile(v, 99), max(v), len(v)
        )


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None
    itl_ms: float | None = None

    def met_by(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        if self.ttft_ms is not None and (r.ttft is None or r.ttft * 1000 > self.ttft_ms):
            return False
        tpot = r.tpot
        return not (self.itl_ms is not None and tpot is not None and tpot * 1000 > self.itl_ms)


@dataclass(frozen=True)
class Summary:
    duration_s: float
    requests: int
    completed: int
    failed: int
    request_throughput: float  # completed / s
    input_token_throughput: float  # prompt tokens of completed requests / s
    output_token_throughput: float  # generated tokens / s
    total_token_throughput: float
    goodput: float  # completed requests within the SLO / s
    slo_attainment: float  # fraction of all requests within the SLO
    slo: Slo
    ttft_ms: Distribution
    itl_ms: Distribution
    tpot_ms: Distribution
    e2e_ms: Distribution
    errors: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    results: Sequence[RequestResult], duration_s: float, slo: Slo | None = None
) -> Summary:
    slo = slo or Slo()
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in done)
    good = sum(1 for r in done if slo.met_by(r))
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            # Group messages that differ only in their numbers (e.g. context-length errors).
            key = re.sub(r"\d+", "N", r.error or "unknown error")[:160]
            errors[key] = errors.get(key, 0) + 1
    rate = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    return Summary(
        duration_s=duration_s,
        requests=len(results),
        completed=len(done),
        failed=len(results) - len(done),
        request_throughput=rate(len(done)),
        input_token_throughput=rate(in_tokens),
        output_token_throughput=rate(out_tokens),
        total_token_throughput=rate(in_tokens + out_tokens),
        goodput=rate(good),
        slo_attainment=good / len(results) if results else 0.0,
        slo=slo,
        ttft_ms=Distribution.of([r.ttft for r in done if r.ttft is not None], 1000),
        itl_ms=Distribution.of([x for r in done for x in r.itls], 1000),
        tpot_ms=Distribution.of([t for r in done if (t := r.tpot) is not None], 1000),
        e2e_ms=Distribution.of([r.e2e for r in done if r.e2e is not None], 1000),
        errors=errors,
    )
