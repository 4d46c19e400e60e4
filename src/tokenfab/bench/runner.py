"""Drive the requests: closed loop at a fixed concurrency, or open loop on arrival times
(Poisson or a trace), optionally capped by a concurrency limit; bounded by a request count and
a duration."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import httpx

from tokenfab.bench.client import ClientConfig, send_streaming
from tokenfab.bench.metrics import RequestResult
from tokenfab.bench.workload import RequestSpec

ProgressFn = Callable[[RequestResult], None]


@dataclass(frozen=True)
class RunLimits:
    concurrency: int | None = None  # max requests in flight (required for closed loop)
    num_requests: int | None = None  # stop after sending this many
    duration_s: float | None = None  # stop sending new requests after this long

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration must be > 0 s, got {self.duration_s}")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("give a request count or a duration (the run must be bounded)")


@dataclass
class RunOutcome:
    results: list[RequestResult]
    duration_s: float  # first send -> last completion


def _bounded(specs: Iterable[RequestSpec], limits: RunLimits) -> Iterator[RequestSpec]:
    it = iter(specs)
    return itertools.islice(it, limits.num_requests) if limits.num_requests else it


def _http_client(cfg: ClientConfig, concurrency: int | None) -> httpx.AsyncClient:
    n = concurrency or 1000
    return httpx.AsyncClient(
        timeout=httpx.Timeout(cfg.timeout_s, connect=30.0),
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
    )


async def run_load(
    specs: Iterable[RequestSpec],
    cfg: ClientConfig,
    limits: RunLimits,
    on_done: ProgressFn | None = None,
    client: httpx.AsyncClient | None = None,
) -> RunOutcome:
    """Send `specs` (all closed-loop or all timed) within `limits` and collect the results."""
    own = client is None
    client = client or _http_client(cfg, limits.concurrency)
    t0 = time.perf_counter()
    deadline = t0 + limits.duration_s if limits.duration_s else None
    results: list[RequestResult] = []

    async def one(spec: RequestSpec) -> None:
        r = await send_streaming(client, cfg, spec, t0)
        results.append(r)
        if on_done:
            on_done(r)

    try:
        bounded = _bounded(specs, limits)
        first = next(bounded, None)
        if first is None:
            return RunOutcome([], 0.0)
        stream = itertools.chain([first], bounded)
        if first.arrival is None:
            await _closed_loop(stream, one, limits.concurrency or 1, deadline)
        else:
            await _open_loop(stream, one, limits.concurrency, t0, deadline)
    finally:
        if own:
            await client.aclose()
    end = max((t0 + r.start + (r.e2e or 0.0) for r in results), default=t0)
    return RunOutcome(sorted(results, key=lambda r: r.index), end - t0)


async def _closed_loop(
    specs: Iterator[RequestSpec], one: Callable, concurrency: int, deadline: float | None
) -> None:
    async def worker() -> None:
        # Each worker pulls the next spec when its previous request finishes.
        for spec in specs:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            await one(spec)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open_loop(
    specs: Iterator[RequestSpec],
    one: Callable,
    concurrency: int | None,
    t0: float,
    deadline: float | None,
) -> None:
    sem = asyncio.Semaphore(concurrency) if concurrency else None
    tasks: list[asyncio.Task] = []

    async def gated(spec: RequestSpec) -> None:
        if sem is None:
            await one(spec)
            return
        async with sem:
            await one(spec)

    for spec in specs:
        due = t0 + (spec.arrival or 0.0)
        if deadline is not None and due >= deadline:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(gated(spec)))
    await asyncio.gather(*tasks)
