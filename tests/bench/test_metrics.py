"""Metrics math on known inputs."""

from __future__ import annotations

import math

import pytest

from tokenfab.bench.metrics import RequestResult, Slo, percentile, summarize


def test_percentile_matches_linear_interpolation() -> None:
    vals = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(vals, 50) == 3.0
    assert percentile(vals, 0) == 1.0 and percentile(vals, 100) == 5.0
    assert percentile(vals, 90) == pytest.approx(4.6)
    assert percentile([1.0, 2.0], 25) == pytest.approx(1.25)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(vals, 101)


def _ok(i: int, ttft: float, e2e: float, n: int, start: float = 0.0) -> RequestResult:
    itl = (e2e - ttft) / (n - 1)
    return RequestResult(
        i, start, 10, n, ok=True, ttft=ttft, e2e=e2e, itls=[itl] * (n - 1), output_tokens=n
    )


def test_summary_throughput_latency_and_goodput() -> None:
    results = [
        _ok(0, ttft=0.1, e2e=1.1, n=11),  # tpot 100 ms
        _ok(1, ttft=0.3, e2e=0.8, n=11),  # tpot 50 ms, ttft too slow
        _ok(2, ttft=0.1, e2e=0.6, n=11),  # tpot 50 ms -> good
        RequestResult(3, 0.0, 10, 11, error="HTTP 503: queue full"),
    ]
    s = summarize(results, duration_s=2.0, slo=Slo(ttft_ms=200, itl_ms=60))
    assert (s.requests, s.completed, s.failed) == (4, 3, 1)
    assert s.request_throughput == pytest.approx(1.5)
    assert s.output_token_throughput == pytest.approx(33 / 2)
    assert s.input_token_throughput == pytest.approx(30 / 2)
    assert s.goodput == pytest.approx(0.5)  # only request 2 meets both limits
    assert s.slo_attainment == pytest.approx(0.25)
    assert s.ttft_ms.p50 == pytest.approx(100) and s.ttft_ms.max == pytest.approx(300)
    assert s.tpot_ms.p50 == pytest.approx(50)
    assert s.itl_ms.count == 30
    assert s.errors == {"HTTP N: queue full": 1}


def test_goodput_without_slo_counts_every_completed_request() -> None:
    s = summarize([_ok(0, 0.1, 1.1, 11), _ok(1, 5.0, 9.0, 11)], duration_s=4.0)
    assert s.goodput == pytest.approx(0.5) and s.slo_attainment == 1.0


def test_server_usage_counts_take_precedence_over_sent_prompt_length() -> None:
    r = _ok(0, 0.1, 1.1, 11)
    r.prompt_tokens = 12  # e.g. a BOS token added by the server
    assert summarize([r], 1.0).input_token_throughput == 12
