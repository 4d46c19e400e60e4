"""The aggregated worker on the local runtime with a real engine on a tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tokenfab.config import EngineConfig
from tokenfab.engine.engine import AsyncEngine
from tokenfab.protocol import (
    KV_EVENTS_TOPIC,
    LOAD_TOPIC,
    WORKER_COMPONENT,
    BlockStored,
    GenerateOutput,
    GenerateRequest,
    KVEventBatch,
    KVSnapshot,
    LoadReport,
    SamplingParams,
    SnapshotRequest,
    StatsRequest,
)
from tokenfab.runtime import RemoteError, Runtime
from tokenfab.worker import AggregatedWorker, KVEventForwarder

pytestmark = pytest.mark.integration


@pytest.fixture
async def setup(tiny_llama: Path) -> AsyncIterator[tuple[Runtime, AggregatedWorker]]:
    rt = Runtime.local()
    sink = KVEventForwarder()
    engine = AsyncEngine(
        EngineConfig(model=str(tiny_llama), num_kv_blocks=64, max_model_len=256, max_waiting=2),
        event_sink=sink,
    )
    await engine.start()
    worker = AggregatedWorker(engine, rt, sink, worker_id="w0", load_interval=0.05)
    await worker.start()
    try:
        yield rt, worker
    finally:
        await worker.close()
        await engine.shutdown()
        await rt.close()


def _req(rid: str, max_tokens: int, prompt: list[int] | None = None) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt or list(range(5, 45)),
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0),
    )


async def _stats(rt: Runtime) -> LoadReport:
    async with await rt.call("w0", "stats", StatsRequest(), LoadReport) as s:
        return await anext(s)


async def test_registers_serves_and_publishes(setup) -> None:
    rt, worker = setup
    kv = await rt.subscribe(KV_EVENTS_TOPIC, KVEventBatch)
    load = await rt.subscribe(LOAD_TOPIC, LoadReport)
    (info,) = await rt.instances(WORKER_COMPONENT)
    assert info.instance_id == "w0" and info.metadata["role"] == "aggregated"
    assert info.metadata["max_model_len"] == 256 and set(info.endpoints) == {
        "generate",
        "stats",
        "kv_snapshot",
        "prefill",
        "set_role",
    }
    assert info.metadata["data_address"]  # every role serves its KV data plane

    outs = [o async for o in await rt.call("w0", "generate", _req("r1", 6), GenerateOutput)]
    assert sum(len(o.token_ids) for o in outs) == 6
    assert outs[-1].finish_reason == "length" and outs[0].num_prompt_tokens == 40

    # the 40-token prompt filled 2 blocks of 16: they were announced as stored
    batch = await asyncio.wait_for(anext(kv), 10)
    assert batch.worker_id == "w0"
    stored = [e for e in batch.events if isinstance(e, BlockStored)]
    assert stored and stored[0].token_ids[:16] == list(range(5, 21))
    report = await asyncio.wait_for(anext(load), 10)
    assert report.worker_id == "w0" and report.kv_blocks_total == 64
    assert (await _stats(rt)).generation_tokens >= 6


async def test_cancel_aborts_the_engine_request_and_frees_blocks(setup) -> None:
    rt, worker = setup
    stream = await rt.call("w0", "generate", _req("long", 200), GenerateOutput)
    for _ in range(3):
        await anext(stream)
    busy = await _stats(rt)
    assert busy.running == 1 and busy.kv_blocks_used > 0
    stream.cancel()
    for _ in range(200):  # bounded wait for the abort to reach the engine thread
        s = await _stats(rt)
        if s.running == 0 and s.kv_blocks_used == 0:
            break
        await asyncio.sleep(0.02)
    assert (s.running, s.kv_blocks_used) == (0, 0)
    assert s.generation_tokens < 200


async def test_engine_errors_become_typed_remote_errors(setup) -> None:
    rt, worker = setup
    with pytest.raises(RemoteError) as err:
        async for _ in await rt.call("w0", "generate", _req("big", 10, [1] * 300), GenerateOutput):
            pass
    assert err.value.code == "invalid_request" and "300" in err.value.message
    # still serving
    outs = [o async for o in await rt.call("w0", "generate", _req("ok", 2), GenerateOutput)]
    assert outs[-1].finish_reason == "length"


async def test_close_deregisters(setup) -> None:
    rt, worker = setup
    await worker.close()
    assert await rt.instances(WORKER_COMPONENT) == []


async def test_a_dead_engine_leaves_discovery(setup) -> None:
    rt, worker = setup
    await worker.engine.shutdown()
    for _ in range(200):  # bounded: the load loop notices within one interval (0.05 s)
        if not await rt.instances(WORKER_COMPONENT):
            break
        await asyncio.sleep(0.02)
    assert await rt.instances(WORKER_COMPONENT) == []


async def test_kv_snapshot_matches_the_published_events(setup) -> None:
    """A router that missed events resyncs from the snapshot: it holds every block the events
    announced, at the event id of the newest one."""
    from tokenfab.kv.hashing import block_hashes

    rt, worker = setup
    kv = await rt.subscribe(KV_EVENTS_TOPIC, KVEventBatch)
    prompt = list(range(100, 150))  # 3 full blocks of 16
    outs = [o async for o in await rt.call("w0", "generate", _req("s1", 2, prompt), GenerateOutput)]
    assert outs[-1].finished
    batch = await asyncio.wait_for(anext(kv), 10)
    async with await rt.call("w0", "kv_snapshot", SnapshotRequest(), KVSnapshot) as s:
        snap = await asyncio.wait_for(anext(s), 10)
    assert snap.worker_id == "w0"
    assert snap.last_event_id == batch.events[-1].event_id >= 1
    assert set(block_hashes(prompt, 16)) <= set(snap.block_hashes)
    report = await _stats(rt)
    assert report.last_event_id == snap.last_event_id and report.worker_id == "w0"
