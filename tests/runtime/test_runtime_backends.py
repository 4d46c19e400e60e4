"""The same Runtime behaviour on every backend: local, bus discovery, and NATS. Two runtimes
from one factory stand for two processes (on NATS they are two connections)."""

from __future__ import annotations

import asyncio

import pytest

from tokenfab.clock import ManualClock
from tokenfab.protocol import GenerateOutput, GenerateRequest, LoadReport
from tokenfab.runtime import RemoteError, RequestContext, Runtime
from tokenfab.runtime.bus import LocalBus
from tokenfab.runtime.bus_discovery import BusDiscovery


def _req(rid: str, tokens: list[int]) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_token_ids=tokens)


async def _echo(req: GenerateRequest, ctx: RequestContext):
    if req.request_id == "fail":
        raise RemoteError("queue_full", "full (3 waiting)")
    for i, tok in enumerate(req.prompt_token_ids):
        last = i == len(req.prompt_token_ids) - 1
        yield GenerateOutput(
            request_id=req.request_id, token_ids=[tok], finish_reason="stop" if last else None
        )


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_discovery_across_runtimes(make_runtime) -> None:
    server, client = await make_runtime(), await make_runtime()
    reg = await server.register("worker", "w-1", metadata={"max_model_len": 512}, lease_ttl=5)

    async def listed() -> bool:
        return [i.instance_id for i in await client.instances("worker")] == ["w-1"]

    await _wait_for(listed)
    (info,) = await client.instances("worker")
    assert info.metadata == {"max_model_len": 512}
    watch = client.watch("worker")
    first = await asyncio.wait_for(anext(watch), 5)
    assert (first.kind, first.instance.instance_id) == ("added", "w-1")
    await reg.close()
    gone = await asyncio.wait_for(anext(watch), 5)
    assert (gone.kind, gone.instance.instance_id) == ("removed", "w-1")
    await watch.aclose()


async def test_streaming_call_errors_and_events(make_runtime) -> None:
    server, client = await make_runtime(), await make_runtime()
    reg = await server.register("worker", "w-1")
    await reg.serve("generate", GenerateRequest, _echo)
    outs = [
        o async for o in await client.call("w-1", "generate", _req("a", [1, 2, 3]), GenerateOutput)
    ]
    assert [o.token_ids for o in outs] == [[1], [2], [3]] and outs[-1].finish_reason == "stop"
    with pytest.raises(RemoteError) as err:
        async for _ in await client.call("w-1", "generate", _req("fail", [1]), GenerateOutput):
            pass
    assert err.value.code == "queue_full"

    sub = await client.subscribe("load", LoadReport)
    rep = LoadReport(
        worker_id="w-1", running=1, waiting=0, kv_blocks_used=2, kv_blocks_total=9, timestamp=0.0
    )
    await asyncio.sleep(0.05)  # on NATS the subscription must reach the server first
    await server.publish("load", rep)
    assert await asyncio.wait_for(anext(sub), 5) == rep
    sub.close()
    await reg.close()


async def test_cancel_propagates_to_the_handler(make_runtime) -> None:
    server, client = await make_runtime(), await make_runtime()
    reg = await server.register("worker", "w-1")
    cleaned = asyncio.Event()

    async def endless(req: GenerateRequest, ctx: RequestContext):
        try:
            i = 0
            while True:
                yield GenerateOutput(request_id=req.request_id, token_ids=[i])
                i += 1
                await asyncio.sleep(0.005)
        finally:
            cleaned.set()

    ep = await reg.serve("generate", GenerateRequest, endless)
    stream = await client.call("w-1", "generate", _req("r", [1]), GenerateOutput)
    assert [(await anext(stream)).token_ids for _ in range(3)] == [[0], [1], [2]]
    stream.cancel()
    await asyncio.wait_for(cleaned.wait(), 10)

    async def idle() -> bool:
        return ep.active == 0

    await _wait_for(idle)
    await reg.close()


async def test_bus_discovery_expires_silent_instances() -> None:
    clock = ManualClock()
    bus = LocalBus()
    owner = BusDiscovery(bus, "ns", clock=clock, sweep_interval=None, probe_wait=0.01)
    viewer = BusDiscovery(bus, "ns", clock=clock, sweep_interval=None, probe_wait=0.01)
    owner_rt, viewer_rt = Runtime(bus, owner, "ns"), Runtime(bus, viewer, "ns")
    await owner_rt.register("worker", "w-1", lease_ttl=5, keepalive=False)
    await owner_rt.register("worker", "w-2", lease_ttl=5, keepalive=False)
    assert sorted(i.instance_id for i in await viewer_rt.instances("worker")) == ["w-1", "w-2"]
    clock.advance(4)
    reg2_lease = 2
    assert await owner.keepalive(reg2_lease)  # w-2 heartbeats, w-1 stays silent
    await asyncio.sleep(0.01)
    clock.advance(2)
    assert [i.instance_id for i in await viewer_rt.instances("worker")] == ["w-2"]
    await owner_rt.close()
    await viewer.close()
