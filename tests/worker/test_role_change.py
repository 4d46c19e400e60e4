"""A worker's role change on the local runtime: it drains (in-flight requests finish, new
ones are refused as `unavailable`), switches and announces itself again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from tokenfab.config import EngineConfig
from tokenfab.engine.engine import AsyncEngine
from tokenfab.protocol import (
    SET_ROLE_ENDPOINT,
    WORKER_COMPONENT,
    GenerateOutput,
    GenerateRequest,
    RoleChange,
    RoleChangeStatus,
    SamplingParams,
    WorkerInfo,
)
from tokenfab.runtime import RemoteError, Runtime
from tokenfab.worker import AggregatedWorker, KVEventForwarder

pytestmark = pytest.mark.integration


@pytest.fixture
async def setup(tiny_llama: Path) -> AsyncIterator[tuple[Runtime, AggregatedWorker]]:
    rt = Runtime.local()
    sink = KVEventForwarder()
    engine = AsyncEngine(
        EngineConfig(model=str(tiny_llama), num_kv_blocks=64, max_model_len=256, num_threads=1),
        event_sink=sink,
    )
    await engine.start()
    worker = AggregatedWorker(engine, rt, sink, worker_id="w0", role="decode", load_interval=0)
    await worker.start()
    try:
        yield rt, worker
    finally:
        await worker.close()
        await engine.shutdown()
        await rt.close()


def _req(rid: str, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        prompt_token_ids=list(range(5, 45)),
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0),
    )


async def _collect(rt: Runtime, rid: str, n: int, started: asyncio.Event) -> list[GenerateOutput]:
    outs = []
    async for o in await rt.call("w0", "generate", _req(rid, n), GenerateOutput):
        outs.append(o)
        started.set()
    return outs


async def test_role_change_drains_switches_and_reannounces(setup) -> None:
    rt, worker = setup
    watch = rt.watch(WORKER_COMPONENT)
    first = await anext(watch)
    assert first.instance.metadata["role"] == "decode"
    started = asyncio.Event()
    running = asyncio.create_task(_collect(rt, "long", 60, started))
    await asyncio.wait_for(started.wait(), 60)

    statuses: list[RoleChangeStatus] = []
    change = await rt.call("w0", SET_ROLE_ENDPOINT, RoleChange(role="prefill"), RoleChangeStatus)
    statuses.append(await anext(change))
    assert statuses[0].phase == "draining" and statuses[0].in_flight == 1
    # the same drain as a shutdown's: load reports say so (routers stop choosing it)
    report = worker.load_report()
    assert report.state == "draining" and report.state_reason == "changing role to prefill"
    # while draining, a new request is refused before any output (the frontend retries it
    # on another worker)
    with pytest.raises(RemoteError) as e:
        async for _ in await rt.call("w0", "generate", _req("new", 4), GenerateOutput):
            pass
    assert e.value.code == "unavailable"
    statuses += [s async for s in change]
    assert [s.phase for s in statuses] == ["draining", "done"]
    assert statuses[-1].role == "prefill" and worker.role == "prefill"
    assert worker.load_report().state == "serving"

    # the request in flight finished whole
    outs = await running
    assert sum(len(o.token_ids) for o in outs) == 60 and outs[-1].finish_reason == "length"
    # discovery carries the new role as a new incarnation
    event = await asyncio.wait_for(anext(watch), 10)
    assert event.kind == "added" and event.instance.incarnation != first.instance.incarnation
    assert msgspec.convert(event.instance.metadata, WorkerInfo).role == "prefill"
    # and it serves in its new role
    outs = [o async for o in await rt.call("w0", "generate", _req("after", 5), GenerateOutput)]
    assert sum(len(o.token_ids) for o in outs) == 5
    await watch.aclose()


async def test_same_role_and_drain_timeout(setup) -> None:
    rt, worker = setup
    same = [s async for s in await rt.call("w0", SET_ROLE_ENDPOINT, RoleChange(role="decode"),
                                           RoleChangeStatus)]  # fmt: skip
    assert [s.phase for s in same] == ["done"] and "already" in same[0].message
    started = asyncio.Event()
    running = asyncio.create_task(_collect(rt, "long", 200, started))
    await asyncio.wait_for(started.wait(), 60)
    quick = RoleChange(role="prefill", drain_timeout_s=0.01)
    out = [s async for s in await rt.call("w0", SET_ROLE_ENDPOINT, quick, RoleChangeStatus)]
    assert [s.phase for s in out] == ["draining", "failed"]
    assert worker.role == "decode" and not worker.draining  # nothing changed, nothing lost
    assert worker.load_report().state == "serving"
    outs = await running
    assert sum(len(o.token_ids) for o in outs) == 200


async def test_the_decode_role_computes_prompts_in_small_chunks(tiny_llama: Path) -> None:
    rt = Runtime.local()
    sink = KVEventForwarder()
    config = EngineConfig(
        model=str(tiny_llama),
        num_kv_blocks=64,
        max_model_len=256,
        num_threads=1,
        max_num_batched_tokens=512,
        decode_max_prefill_tokens=16,
    )
    engine = AsyncEngine(config, event_sink=sink)
    await engine.start()
    worker = AggregatedWorker(engine, rt, sink, worker_id="w0", role="decode", load_interval=0)
    await worker.start()

    async def budget() -> int | None:
        return await engine.run_on_engine(lambda e: e.scheduler.config.max_prefill_tokens)

    try:
        assert await budget() == 16
        # a 40-token prompt in 16-token steps: 3 prefill steps, then one per token
        outs = [o async for o in await rt.call("w0", "generate", _req("a", 4), GenerateOutput)]
        assert sum(len(o.token_ids) for o in outs) == 4
        assert engine.stats().num_steps == 3 + 3
        await worker.switch_role("prefill")
        assert await budget() is None
        await worker.switch_role("decode")
        assert await budget() == 16
    finally:
        await worker.close()
        await engine.shutdown()
        await rt.close()
