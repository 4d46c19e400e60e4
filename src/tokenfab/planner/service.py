"""The planner process: the I/O edge around `core.tick`.

Every interval it reduces the workers' latest load reports (topic `load`) and the workers
in discovery (their `WorkerInfo.role`) into an `Observation`, calls `tick` with the clock's
time, logs every decision with its inputs, applies moves through the workers' `set_role`
endpoint (RoleChange: drain, switch, re-announce) and shows pool sizes and targets as
Prometheus gauges. It cannot start or stop workers, so it plans a fixed fleet; add/remove
decisions (a non-fixed config) are logged, not applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge

from tokenfab.clock import Clock, MonotonicClock
from tokenfab.planner.capacity import Capacity
from tokenfab.planner.core import Decision, PlannerConfig, PlannerState, initial_state, tick
from tokenfab.planner.observe import (
    LatencySums,
    WorkerView,
    mean_latencies_ms,
    reduce_reports,
)
from tokenfab.protocol import (
    LOAD_TOPIC,
    SET_ROLE_ENDPOINT,
    WORKER_COMPONENT,
    LoadReport,
    RoleChange,
    RoleChangeStatus,
    WorkerInfo,
)
from tokenfab.runtime import Runtime

log = logging.getLogger(__name__)

TTFT_METRIC = "tokenfab_time_to_first_token_seconds"
ITL_METRIC = "tokenfab_inter_token_latency_seconds"


def parse_latency_sums(text: str) -> LatencySums:
    """The TTFT/ITL histograms' sums and counts from a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    v: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name in (TTFT_METRIC + "_sum", TTFT_METRIC + "_count",
                               ITL_METRIC + "_sum", ITL_METRIC + "_count"):  # fmt: skip
                v[sample.name] = v.get(sample.name, 0.0) + sample.value
    return LatencySums(
        ttft_sum=v.get(TTFT_METRIC + "_sum", 0.0), ttft_count=v.get(TTFT_METRIC + "_count", 0.0),
        itl_sum=v.get(ITL_METRIC + "_sum", 0.0), itl_count=v.get(ITL_METRIC + "_count", 0.0),
    )  # fmt: skip


LatencyReader = Callable[[], Awaitable[LatencySums | None]]
"""Reads the frontend's latency histograms (None: not readable now)."""


def http_latencies(url: str) -> LatencyReader:
    """Read them from a frontend's /metrics URL (a planner in its own process)."""

    async def read() -> LatencySums | None:
        import httpx

        try:
            async with httpx.AsyncClient(timeout=5) as client:
                return parse_latency_sums((await client.get(url)).text)
        except httpx.HTTPError as e:
            log.warning("planner: cannot read %s: %s", url, e)
            return None

    return read


def registry_latencies(registry: CollectorRegistry) -> LatencyReader:
    """Read them from a frontend's registry in this process (`serve --planner`)."""
    from prometheus_client import generate_latest

    async def read() -> LatencySums | None:
        return parse_latency_sums(generate_latest(registry).decode())

    return read


class PlannerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.workers = Gauge("tokenfab_planner_workers", "Workers per role", ["role"],
                             registry=registry)  # fmt: skip
        self.target = Gauge("tokenfab_planner_target_workers", "Planned workers per role",
                            ["role"], registry=registry)  # fmt: skip
        self.forecast = Gauge("tokenfab_planner_forecast_tokens_per_second",
                              "Forecast token demand per pool", ["role"], registry=registry)  # fmt: skip
        self.decisions = Counter("tokenfab_planner_decisions", "Planner decisions", ["kind"],
                                 registry=registry)  # fmt: skip


def decision_line(d: Decision) -> str:
    """One JSON log line: the decision and everything it was made from."""
    body = {"kind": d.kind, "reason": d.reason, "worker": d.worker_id,
            "from": d.from_role, "to": d.to_role, "inputs": asdict(d.inputs)}  # fmt: skip
    return json.dumps(body, default=str)


class PlannerService:
    def __init__(
        self,
        runtime: Runtime,
        config: PlannerConfig,
        capacity: Capacity,
        registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
        latencies: LatencyReader | None = None,
    ) -> None:
        """`latencies`: read each interval for the measured TTFT and ITL (None: latencies
        are not observed)."""
        self.runtime = runtime
        self.config = config
        self.clock = clock or MonotonicClock()
        self.state: PlannerState = initial_state(config, capacity)
        self.registry = registry or CollectorRegistry()
        self.metrics = PlannerMetrics(self.registry)
        self.reports: dict[str, LoadReport] = {}
        self.decisions: list[Decision] = []
        self._prev: dict[str, LoadReport] = {}
        self.read_latencies = latencies
        self._latency = LatencySums()
        self._draining: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loads = await self.runtime.subscribe(LOAD_TOPIC, LoadReport)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._consume(loads)), loop.create_task(self._loop())]

    async def _consume(self, loads) -> None:
        async for r in loads:
            self.reports[r.worker_id] = r

    async def workers(self) -> tuple[WorkerView, ...]:
        out = []
        for inst in await self.runtime.instances(WORKER_COMPONENT):
            try:
                info = msgspec.convert(inst.metadata, WorkerInfo)
            except msgspec.ValidationError:
                continue
            wid = inst.instance_id
            out.append(WorkerView(wid, info.role, draining=wid in self._draining))
        return tuple(sorted(out, key=lambda w: w.worker_id))

    async def step(self) -> list[Decision]:
        """One interval: observe, decide, log, apply."""
        views = await self.workers()
        live = {w.worker_id for w in views}
        cur = {k: v for k, v in self.reports.items() if k in live}
        ttft, itl = await self._latencies()
        obs = reduce_reports(self._prev, cur, self.config.interval_s, views,
                             ttft_ms=ttft, itl_ms=itl)  # fmt: skip
        self._prev = dict(cur)
        self.state, decisions = tick(obs, self.state, self.clock.now(), self.config)
        for d in decisions:
            # holds repeat every tick while a change waits: kept out of the info log
            level = logging.DEBUG if d.kind == "hold" else logging.INFO
            log.log(level, "planner decision %s", decision_line(d))
            self.metrics.decisions.labels(d.kind).inc()
            if d.kind == "move" and d.to_role is not None:
                asyncio.get_running_loop().create_task(self.move(d.worker_id, d.to_role))
            elif d.kind in ("add", "remove"):
                log.warning("planner: %s not applied (this planner cannot start or stop "
                            "workers): %s", d.kind, d.reason)  # fmt: skip
        for role in ("prefill", "decode"):
            self.metrics.workers.labels(role).set(obs.count(role))  # type: ignore[arg-type]
        if decisions:
            t = decisions[0].inputs
            for i, role in enumerate(("prefill", "decode")):
                self.metrics.target.labels(role).set(t.target[i])
            self.metrics.forecast.labels("prefill").set(t.prefill_forecast)
            self.metrics.forecast.labels("decode").set(t.decode_forecast)
        self.decisions += decisions
        return decisions

    async def _latencies(self) -> tuple[float | None, float | None]:
        if self.read_latencies is None:
            return None, None
        cur = await self.read_latencies()
        if cur is None:
            return None, None
        out = mean_latencies_ms(self._latency, cur)
        self._latency = cur
        return out

    async def move(self, worker_id: str, role: str) -> RoleChangeStatus | None:
        """Ask a worker to change role and follow it to the end (draining while it drains)."""
        self._draining.add(worker_id)
        last = None
        try:
            req = RoleChange(role=role)  # type: ignore[arg-type]
            async with await self.runtime.call(
                worker_id, SET_ROLE_ENDPOINT, req, RoleChangeStatus
            ) as statuses:
                async for last in statuses:
                    log.info("planner: %s %s (%d in flight) %s", worker_id, last.phase,
                             last.in_flight, last.message)  # fmt: skip
        except Exception as e:  # a worker gone mid-move: the core reports it as not done
            log.warning("planner: role change of %s failed: %s", worker_id, e)
        finally:
            self._draining.discard(worker_id)
        return last

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.step()
            except Exception:
                log.exception("planner step failed")

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def run_planner(
    runtime_url: str,
    namespace: str,
    config: PlannerConfig,
    capacity: Capacity,
    metrics_port: int | None = None,
    frontend_metrics: str | None = None,
) -> None:
    """Plan until interrupted; with `metrics_port`, serve /metrics there."""
    from prometheus_client import start_http_server

    from tokenfab.worker.launch import until_signalled

    runtime = await Runtime.connect(runtime_url, namespace)
    reader = http_latencies(frontend_metrics) if frontend_metrics else None
    service = PlannerService(runtime, config, capacity, latencies=reader)
    if metrics_port is not None:
        start_http_server(metrics_port, addr="127.0.0.1", registry=service.registry)
    try:
        await service.start()
        log.info("planner on %s: capacity %s, budget %d", runtime_url, capacity, config.budget)
        await until_signalled()
    finally:
        await service.close()
        await runtime.close()
