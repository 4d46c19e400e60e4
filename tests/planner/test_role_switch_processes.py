"""The planner moves a real worker process between roles under load: the worker drains its
in-flight streams (none lost, none migrated), switches, announces its new role, and then
serves requests in it."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import msgspec
import openai
import pytest

from tokenfab.config import EngineConfig, ServerConfig
from tokenfab.planner import Capacity, PlannerConfig
from tokenfab.planner.service import PlannerService
from tokenfab.protocol import WORKER_COMPONENT, LoadReport, StatsRequest, WorkerInfo
from tokenfab.serve.server import ServerThread

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STREAMS = 8
MAX_TOKENS = 80


def _stream(client: openai.OpenAI, model: str, i: int, started: threading.Event) -> int:
    chunks = client.completions.create(
        model=model, prompt=f"story {i}: once", max_tokens=MAX_TOKENS, temperature=0,
        stream=True, extra_body={"ignore_eos": True}, stream_options={"include_usage": True},
    )  # fmt: skip
    tokens = 0
    for chunk in chunks:
        if chunk.choices:
            started.set()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens


async def _roles(rt) -> dict[str, str]:
    return {
        i.instance_id: msgspec.convert(i.metadata, WorkerInfo).role
        for i in await rt.instances(WORKER_COMPONENT)
    }


async def _generated(rt, wid: str) -> int:
    async with await rt.call(wid, "stats", StatsRequest(), LoadReport) as s:
        return (await anext(s)).generation_tokens


def test_role_switch_drains_in_flight_streams_and_serves_in_new_role(tiny_llama: Path) -> None:
    engine = EngineConfig(model=str(tiny_llama), num_kv_blocks=512, max_model_len=256,
                          num_threads=1)  # fmt: skip
    config = ServerConfig(
        disagg_min_uncached_tokens=0,
        port=0,
        workers=2,
        engine_processes=True,
        router_policy="round_robin",
    )
    srv = ServerThread(engine, config)
    url = srv.start()
    try:
        assert srv.stack is not None
        rt = srv.stack.runtime
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        assert set(srv.call(_roles(rt)).values()) == {"aggregated"}
        results: list[int | BaseException] = [0] * STREAMS
        started = [threading.Event() for _ in range(STREAMS)]

        def one(i: int) -> None:
            try:
                results[i] = _stream(client, model, i, started[i])
            except BaseException as e:  # recorded: asserted below
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started)  # every stream is mid-generation
        planner = PlannerService(rt, PlannerConfig(ttft_ms=1000, itl_ms=100, budget=2),
                                 Capacity(1000, 100))  # fmt: skip
        victim = "worker-0"
        status = srv.call(planner.move(victim, "prefill"), timeout=180)
        for t in threads:
            t.join(180)
        assert status is not None and status.phase == "done" and status.role == "prefill"
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert results == [MAX_TOKENS] * STREAMS  # none lost, none cut short
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        migrated = [float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("tokenfab_request_migrations_total")]  # fmt: skip
        assert not migrated or migrated[0] == 0  # drained, not failed over
        assert srv.call(_roles(rt))[victim] == "prefill"
        # the switched worker serves in its new role: it computes each prompt and its first
        # token, and the aggregated worker decodes (disaggregated serving)
        before = srv.call(_generated(rt, victim))
        for i in range(4):
            out = client.completions.create(model=model, prompt=f"after {i}", max_tokens=5,
                                            temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
            assert out.usage.completion_tokens == 5
        assert srv.call(_generated(rt, victim)) >= before + 4
    finally:
        srv.stop()
