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


def test_prefill_and_decode_workers_swap_roles_under_load(tiny_llama: Path) -> None:
    """Disaggregated: a decode worker becomes a prefill worker and the prefill worker a
    decode worker while remote-prefilled streams run; none is lost, and each then serves in
    its new role (no restart: every worker serves both endpoints and the KV data plane)."""
    engine = EngineConfig(model=str(tiny_llama), num_kv_blocks=512, max_model_len=256,
                          num_threads=1)  # fmt: skip
    config = ServerConfig(disagg_min_uncached_tokens=0, port=0, prefill_workers=1,
                          decode_workers=2, engine_processes=True)  # fmt: skip
    srv = ServerThread(engine, config)
    url = srv.start()
    try:
        assert srv.stack is not None
        rt = srv.stack.runtime
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        assert srv.call(_roles(rt)) == {"prefill-0": "prefill", "decode-1": "decode",
                                        "decode-2": "decode"}  # fmt: skip
        planner = PlannerService(rt, PlannerConfig(ttft_ms=1000, itl_ms=100, budget=3),
                                 Capacity(1000, 100))  # fmt: skip
        results: list[int | BaseException] = [0] * STREAMS
        started = [threading.Event() for _ in range(STREAMS)]

        def one(i: int) -> None:
            try:
                results[i] = _stream(client, model, i, started[i])
            except BaseException as e:  # recorded: asserted below
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
        for t in threads[: STREAMS // 2]:
            t.start()
        assert all(e.wait(60) for e in started[: STREAMS // 2])
        to_prefill = srv.call(planner.move("decode-1", "prefill"), timeout=180)
        assert to_prefill is not None and to_prefill.phase == "done"
        for t in threads[STREAMS // 2 :]:  # more load while the old prefill worker switches
            t.start()
        to_decode = srv.call(planner.move("prefill-0", "decode"), timeout=180)
        assert to_decode is not None and to_decode.phase == "done"
        for t in threads:
            t.join(180)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert results == [MAX_TOKENS] * STREAMS  # none lost, none cut short
        # leave prefill-0 the only decode worker, so what follows must decode there
        last = srv.call(planner.move("decode-2", "prefill"), timeout=180)
        assert last is not None and last.phase == "done"
        assert srv.call(_roles(rt)) == {"prefill-0": "decode", "decode-1": "prefill",
                                        "decode-2": "prefill"}  # fmt: skip
        ids = ("prefill-0", "decode-1", "decode-2")
        before = {w: srv.call(_generated(rt, w)) for w in ids}
        for i in range(4):
            out = client.completions.create(model=model, prompt=f"after the switch {i}: a b c",
                                            max_tokens=5, temperature=0,
                                            extra_body={"ignore_eos": True})  # fmt: skip
            assert out.usage.completion_tokens == 5
        after = {w: srv.call(_generated(rt, w)) for w in ids}
        # the new prefill workers computed each prompt's first token (one token each) ...
        assert after["decode-1"] + after["decode-2"] - before["decode-1"] - before["decode-2"] >= 4
        # ... and the old prefill worker decoded the other four tokens of every request
        assert after["prefill-0"] - before["prefill-0"] >= 4 * 4
    finally:
        srv.stop()
