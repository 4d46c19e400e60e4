"""Summaries of a simulated run: TTFT / ITL / latency percentiles and throughput."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tokenfab.bench.metrics import percentile
from tokenfab.twin.sim import RequestRecord


@dataclass(frozen=True, slots=True)
class TwinSummary:
    requests: int
    finished: int
    ttft_p50: float
    ttft_p90: float
    itl_p50: float
    itl_p90: float
    latency_p50: float
    latency_p90: float
    output_tokens_per_s: float
    virtual_seconds: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(records: list[RequestRecord]) -> TwinSummary:
    ttfts = [r.ttft for r in records if r.ttft is not None]
    itls = [x for r in records for x in r.itls()]
    done = [r for r in records if r.finished is not None]
    lat = [r.finished - r.arrival for r in done if r.finished is not None]
    start = min((r.arrival for r in records), default=0.0)
    end = max((r.finished for r in done if r.finished is not None), default=start)
    tokens = sum(len(r.token_times) for r in records)
    span = max(end - start, 1e-9)

    def p(xs: list[float], q: float) -> float:
        return percentile(xs, q) if xs else 0.0

    return TwinSummary(
        requests=len(records),
        finished=len(done),
        ttft_p50=p(ttfts, 50),
        ttft_p90=p(ttfts, 90),
        itl_p50=p(itls, 50),
        itl_p90=p(itls, 90),
        latency_p50=p(lat, 50),
        latency_p90=p(lat, 90),
        output_tokens_per_s=tokens / span,
        virtual_seconds=end - start,
    )
