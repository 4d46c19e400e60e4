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


@dataclass(frozen=True, slots=True)
class Goodput:
    """Requests that met both limits: TTFT <= ttft limit and mean ITL (their time per output
    token after the first) <= itl limit; rates over the run's span."""

    ttft_limit_ms: float
    itl_limit_ms: float
    good_requests: int
    good_share: float
    goodput_requests_per_s: float
    goodput_tokens_per_s: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def goodput(records: list[RequestRecord], ttft_ms: float, itl_ms: float) -> Goodput:
    done = [r for r in records if r.finished is not None and r.ttft is not None]
    start = min((r.arrival for r in records), default=0.0)
    end = max((r.finished for r in done if r.finished is not None), default=start)
    span = max(end - start, 1e-9)
    good = tokens = 0
    for r in done:
        t = r.token_times
        mean_itl = (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else 0.0
        assert r.ttft is not None
        if r.ttft * 1e3 <= ttft_ms and mean_itl * 1e3 <= itl_ms:
            good += 1
            tokens += len(t)
    return Goodput(
        ttft_limit_ms=ttft_ms,
        itl_limit_ms=itl_ms,
        good_requests=good,
        good_share=good / len(records) if records else 0.0,
        goodput_requests_per_s=good / span,
        goodput_tokens_per_s=tokens / span,
    )


@dataclass(frozen=True, slots=True)
class Economics:
    """What the run's output throughput means per GPU, per megawatt and in dollars (the
    factory's catalog power and default prices, `factory/economics.py`)."""

    system: str
    gpus: int
    output_tokens_per_s_per_gpu: float
    output_tokens_per_s_per_mw: float
    usd_per_gpu_hour: float | None
    """None: the factory's price book has no default for this system."""
    usd_per_mtok: float | None

    def as_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


def economics_of(output_tokens_per_s: float, gpus: int, system: str) -> Economics:
    """Raises KeyError for a system the factory's catalog does not know."""
    from tokenfab.factory.catalog import get_system
    from tokenfab.factory.economics import load_prices, tokens_per_s_per_mw, usd_per_mtok

    gpu = get_system(system)
    prices = load_prices()
    per_gpu = output_tokens_per_s / max(gpus, 1)
    hour = prices.gpu_hour_usd.get(gpu.key)
    return Economics(
        system=gpu.key,
        gpus=gpus,
        output_tokens_per_s_per_gpu=per_gpu,
        output_tokens_per_s_per_mw=tokens_per_s_per_mw(per_gpu, gpu.allin_power_w, prices.pue),
        usd_per_gpu_hour=hour,
        usd_per_mtok=None if hour is None else usd_per_mtok(per_gpu, hour),
    )
