"""The planner process's edge on the local runtime: load reports and discovery in, a move
applied through a worker's set_role endpoint, gauges and log lines out."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import msgspec
import pytest

from tokenfab.clock import ManualClock
from tokenfab.planner import Capacity, PlannerConfig
from tokenfab.planner.service import PlannerService
from tokenfab.protocol import (
    LOAD_TOPIC,
    SET_ROLE_ENDPOINT,
    WORKER_COMPONENT,
    LoadReport,
    RoleChange,
    RoleChangeStatus,
    WorkerInfo,
)
from tokenfab.runtime import RequestContext, Runtime


class FakeWorker:
    """A worker's discovery entry and control endpoint, without an engine."""

    def __init__(self, rt: Runtime, wid: str, role: str) -> None:
        self.rt, self.wid, self.role = rt, wid, role
        self.reg = None

    def info(self) -> dict:
        return msgspec.to_builtins(WorkerInfo(model="m", max_model_len=64, block_size=16,
                                              role=self.role))  # type: ignore[arg-type]  # fmt: skip

    async def start(self) -> None:
        self.reg = await self.rt.register(
            WORKER_COMPONENT, self.wid, metadata=self.info(), lease_ttl=30,
            handlers={SET_ROLE_ENDPOINT: (RoleChange, self._set_role)},
        )  # fmt: skip

    async def _set_role(self, req: RoleChange, ctx: RequestContext) -> AsyncIterator:
        yield RoleChangeStatus(worker_id=self.wid, role=self.role, phase="draining")
        self.role = req.role
        await self.reg.reannounce(self.info())
        yield RoleChangeStatus(worker_id=self.wid, role=self.role, phase="done")


@pytest.fixture
async def rt() -> AsyncIterator[Runtime]:
    runtime = Runtime.local()
    yield runtime
    await runtime.close()


async def test_step_moves_a_decode_worker_to_prefill(rt: Runtime, caplog) -> None:
    roles = {"w0": "prefill", "w1": "decode", "w2": "decode"}
    workers = [FakeWorker(rt, w, r) for w, r in roles.items()]
    for w in workers:
        await w.start()
    clock = ManualClock()
    cfg = PlannerConfig(ttft_ms=500, itl_ms=50, budget=3, confirm_ticks=1, fixed_fleet=True)
    svc = PlannerService(rt, cfg, Capacity(1000, 100), clock=clock)
    loads = await rt.subscribe(LOAD_TOPIC, LoadReport)
    consume = asyncio.create_task(svc._consume(loads))
    # 10 s of long prompts: w0 computed 20k prompt tokens (2000 tok/s for one worker)
    await rt.publish(LOAD_TOPIC, LoadReport(worker_id="w0", requests_finished=10,
                                            prompt_tokens=20_000, prefill_tokens_computed=20_000,
                                            queued_prefill_tokens=4000))  # fmt: skip
    for w in ("w1", "w2"):
        await rt.publish(LOAD_TOPIC, LoadReport(worker_id=w, requests_finished=5,
                                                generation_tokens=100))  # fmt: skip
    for _ in range(100):
        if len(svc.reports) == 3:
            break
        await asyncio.sleep(0.01)
    clock.advance(10)
    with caplog.at_level(logging.INFO, logger="tokenfab.planner.service"):
        decisions = await svc.step()
        (move,) = [d for d in decisions if d.kind == "move"]
        assert move.from_role == "decode" and move.to_role == "prefill"
        for _ in range(200):
            if workers[1].role == "prefill" or workers[2].role == "prefill":
                break
            await asyncio.sleep(0.01)
    moved = next(w for w in workers if w.wid == move.worker_id)
    assert moved.role == "prefill"
    lines = [r.getMessage() for r in caplog.records if "planner decision" in r.getMessage()]
    logged = [json.loads(line.split("planner decision ", 1)[1]) for line in lines]
    assert [d["kind"] for d in logged] == ["unreachable", "move"]  # 2400 tok/s needs 3
    assert logged[1]["worker"] == move.worker_id and logged[1]["inputs"]["current"] == [1, 2]
    assert logged[1]["inputs"]["prefill_demand"] == pytest.approx(2400.0)  # + the backlog
    assert svc.registry.get_sample_value("tokenfab_planner_workers", {"role": "decode"}) == 2
    assert svc.registry.get_sample_value("tokenfab_planner_target_workers",
                                         {"role": "prefill"}) == 2  # fmt: skip
    # discovery now shows the move done
    views = await svc.workers()
    assert [w.role for w in views].count("prefill") == 2
    consume.cancel()


def test_measured_latencies_come_from_the_frontends_histograms() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from tokenfab.planner.observe import LatencySums, mean_latencies_ms
    from tokenfab.planner.service import parse_latency_sums

    reg = CollectorRegistry()
    ttft = Histogram("tokenfab_time_to_first_token_seconds", "t", registry=reg)
    itl = Histogram("tokenfab_inter_token_latency_seconds", "i", registry=reg)
    ttft.observe(0.2)
    first = parse_latency_sums(generate_latest(reg).decode())
    assert first == LatencySums(ttft_sum=pytest.approx(0.2), ttft_count=1.0)
    ttft.observe(0.4)
    ttft.observe(0.6)
    itl.observe(0.05)
    second = parse_latency_sums(generate_latest(reg).decode())
    assert mean_latencies_ms(first, second) == (pytest.approx(500.0), pytest.approx(50.0))
    assert mean_latencies_ms(second, second) == (None, None)  # nothing in the interval
    # a restarted frontend: counters start again
    assert mean_latencies_ms(second, first) == (pytest.approx(200.0), None)
