"""The local runtime backend: discovery with leases, streaming calls with cancellation, events."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from tokenfab.clock import ManualClock
from tokenfab.protocol import GenerateOutput, GenerateRequest, LoadReport
from tokenfab.runtime import RemoteError, RequestContext, Runtime
from tokenfab.runtime.bus import LocalBus, subject_matches


async def test_register_list_and_lease_expiry() -> None:
    clock = ManualClock()
    rt = Runtime.local(clock=clock, sweep_interval=None)
    a = await rt.register("worker", "w-a", metadata={"model": "m"}, lease_ttl=5, keepalive=False)
    await rt.register("worker", "w-b", lease_ttl=20, keepalive=False)
    await rt.register("router", "r-1", lease_ttl=20, keepalive=False)
    ids = sorted(i.instance_id for i in await rt.instances("worker"))
    assert ids == ["w-a", "w-b"]
    assert (await rt.instances("worker"))[0].metadata == {"model": "m"}

    clock.advance(4)
    assert await rt.discovery.keepalive(a.lease_id)  # renewed until t=9
    clock.advance(4)
    assert len(await rt.instances("worker")) == 2
    clock.advance(2)  # t=10: w-a's lease ran out
    assert [i.instance_id for i in await rt.instances("worker")] == ["w-b"]
    assert not await rt.discovery.keepalive(a.lease_id)
    await rt.close()


async def test_watch_sees_snapshot_then_changes() -> None:
    clock = ManualClock()
    rt = Runtime.local(clock=clock, sweep_interval=None)
    await rt.register("worker", "w-a", lease_ttl=5, keepalive=False)
    watch = rt.watch("worker")
    first = await anext(watch)
    assert (first.kind, first.instance.instance_id) == ("added", "w-a")
    reg_b = await rt.register("worker", "w-b", lease_ttl=50, keepalive=False)
    ev = await anext(watch)
    assert (ev.kind, ev.instance.instance_id) == ("added", "w-b")
    clock.advance(6)
    rt.discovery.expire()
    ev = await anext(watch)
    assert (ev.kind, ev.instance.instance_id) == ("removed", "w-a")
    await reg_b.close()
    ev = await anext(watch)
    assert (ev.kind, ev.instance.instance_id) == ("removed", "w-b")
    await watch.aclose()
    await rt.close()


async def test_keepalive_task_keeps_instance_registered() -> None:
    rt = Runtime.local(sweep_interval=0.05)
    reg = await rt.register("worker", "w-a", lease_ttl=0.6)
    await asyncio.sleep(1.5)  # 2.5 ttls: only the keepalive task (every ttl/3) keeps it alive
    assert [i.instance_id for i in await rt.instances("worker")] == ["w-a"]
    await reg.close()
    assert await rt.instances("worker") == []
    await rt.close()


async def _echo_tokens(req: GenerateRequest, ctx: RequestContext):
    for i, tok in enumerate(req.prompt_token_ids):
        last = i == len(req.prompt_token_ids) - 1
        yield GenerateOutput(
            request_id=req.request_id, token_ids=[tok], finish_reason="stop" if last else None
        )


async def test_call_streams_typed_responses_in_order() -> None:
    rt = Runtime.local()
    reg = await rt.register("worker", "w-a", endpoints=["generate"])
    await reg.serve("generate", GenerateRequest, _echo_tokens)
    req = GenerateRequest(request_id="r1", prompt_token_ids=[5, 6, 7])
    outs = [o async for o in await rt.call("w-a", "generate", req, GenerateOutput)]
    assert [o.token_ids for o in outs] == [[5], [6], [7]]
    assert outs[-1].finish_reason == "stop" and all(isinstance(o, GenerateOutput) for o in outs)
    await reg.close()
    await rt.close()


async def test_handler_errors_arrive_typed_and_serving_continues() -> None:
    rt = Runtime.local()
    reg = await rt.register("worker", "w-a")

    async def handler(req: GenerateRequest, ctx: RequestContext):
        if req.request_id == "bad":
            raise RemoteError("queue_full", "the queue is full (4 waiting)")
        if req.request_id == "crash":
            raise RuntimeError("boom")
        yield GenerateOutput(request_id=req.request_id, finish_reason="stop")

    await reg.serve("generate", GenerateRequest, handler)
    for rid, code in [("bad", "queue_full"), ("crash", "internal")]:
        stream = await rt.call(
            "w-a", "generate", GenerateRequest(request_id=rid, prompt_token_ids=[1]), GenerateOutput
        )
        with pytest.raises(RemoteError) as err:
            async for _ in stream:
                pass
        assert err.value.code == code
    ok = [
        o
        async for o in await rt.call(
            "w-a",
            "generate",
            GenerateRequest(request_id="ok", prompt_token_ids=[1]),
            GenerateOutput,
        )
    ]
    assert ok[0].finish_reason == "stop"
    await reg.close()
    await rt.close()


async def test_calling_an_unknown_instance_fails_fast() -> None:
    rt = Runtime.local()
    with pytest.raises(RemoteError) as err:
        await rt.call(
            "nobody",
            "generate",
            GenerateRequest(request_id="r", prompt_token_ids=[1]),
            GenerateOutput,
        )
    assert err.value.code == "unavailable"
    await rt.close()


async def test_cancel_reaches_the_handler_and_runs_its_cleanup() -> None:
    rt = Runtime.local()
    reg = await rt.register("worker", "w-a")
    started, cleaned = asyncio.Event(), asyncio.Event()

    async def endless(req: GenerateRequest, ctx: RequestContext):
        started.set()
        try:
            i = 0
            while True:
                yield GenerateOutput(request_id=req.request_id, token_ids=[i])
                i += 1
                await asyncio.sleep(0.001)
        finally:
            cleaned.set()

    ep = await reg.serve("generate", GenerateRequest, endless)
    stream = await rt.call(
        "w-a", "generate", GenerateRequest(request_id="r", prompt_token_ids=[1]), GenerateOutput
    )
    got = [await anext(stream) for _ in range(3)]
    assert [o.token_ids for o in got] == [[0], [1], [2]]
    assert started.is_set() and ep.active == 1
    stream.cancel()
    await asyncio.wait_for(cleaned.wait(), 5)
    assert stream.done
    for _ in range(100):  # bounded: the task leaves the table right after its cleanup
        if ep.active == 0:
            break
        await asyncio.sleep(0.01)
    assert ep.active == 0
    # the reply subscription is gone too: nothing leaks on the bus
    assert isinstance(rt.bus, LocalBus)
    assert rt.bus.num_subscriptions() == 2  # the endpoint's call and cancel subjects
    await reg.close()
    await rt.close()


async def test_events_are_typed_and_fan_out_to_subscribers() -> None:
    rt = Runtime.local()
    s1 = await rt.subscribe("load", LoadReport)
    s2 = await rt.subscribe("load", LoadReport)
    other = await rt.subscribe("kv", LoadReport)
    rep = LoadReport(
        worker_id="w", running=1, waiting=2, kv_blocks_used=3, kv_blocks_total=4, timestamp=1.5
    )
    await rt.publish("load", rep)
    assert await anext(s1) == rep and await anext(s2) == rep
    rt.publish_soon("kv", rep)
    assert await anext(other) == rep
    s1.close()
    assert [m async for m in s1] == []
    await rt.close()


async def test_bus_carries_bytes_only_and_matches_wildcards() -> None:
    bus = LocalBus()
    with pytest.raises(TypeError):
        bus.publish_soon("a.b", GenerateOutput(request_id="x"))  # type: ignore[arg-type]
    sub = await bus.subscribe("tf.ns.events.>")
    await bus.publish("tf.ns.events.kv", msgspec.msgpack.encode(1))
    await bus.publish("tf.other.events.kv", msgspec.msgpack.encode(2))
    assert msgspec.msgpack.decode(await sub.next()) == 1
    assert subject_matches("a.*.c", "a.b.c") and not subject_matches("a.*", "a.b.c")
    assert subject_matches("a.>", "a.b.c") and not subject_matches("a.>", "a")
    await bus.close()


def test_invalid_names_are_rejected() -> None:
    with pytest.raises(ValueError):
        Runtime.local(namespace="a.b")
