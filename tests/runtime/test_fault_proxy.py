"""The runtime's NATS connection through a TCP fault proxy (tests/fault_proxy.py):
latency, resets and truncation make calls slow or fail with a clear error, never hang, and
the connection recovers by itself. (The KV data plane through the same proxy:
tests/disagg/test_data_plane_faults.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from fault_proxy import FaultProxy

from tokenfab.runtime import RemoteError, Runtime
from tokenfab.runtime.nats_server import NatsServer, nats_server_binary


class Ping(msgspec.Struct):
    n: int


async def echo(req: Ping, ctx: object) -> AsyncIterator[Ping]:
    for i in range(3):
        yield Ping(req.n + i)


async def ask(caller: Runtime, n: int, timeout: float = 10.0) -> list[int]:
    async def run() -> list[int]:
        stream = await caller.call("srv", "echo", Ping(n), Ping)
        async with stream:
            return [p.n async for p in stream]

    return await asyncio.wait_for(run(), timeout)


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[FaultProxy, Runtime, Runtime]]:
    if nats_server_binary() is None:
        pytest.skip("nats-server not installed")
    with NatsServer() as nats:
        proxy = FaultProxy("127.0.0.1", nats.port)
        addr = await proxy.start()
        server = await Runtime.connect(nats.url, namespace="fp")
        await server.register("srv", "srv", handlers={"echo": (Ping, echo)})
        caller = await Runtime.connect(f"nats://{addr}", namespace="fp")
        try:
            yield proxy, caller, server
        finally:
            await caller.close()
            await server.close()
            await proxy.close()


async def test_latency_slows_calls_but_they_complete(proxied) -> None:
    proxy, caller, _ = proxied
    assert await ask(caller, 1) == [1, 2, 3]
    proxy.faults.latency_s = 0.05
    assert await ask(caller, 10) == [10, 11, 12]


async def test_reset_connections_recover_and_calls_fail_cleanly_or_succeed(proxied) -> None:
    proxy, caller, _ = proxied
    assert await ask(caller, 1) == [1, 2, 3]
    before = proxy.connections
    assert proxy.reset_all() >= 1
    # Calls made while the client reconnects either succeed or raise a clear error; none
    # hangs (each is bounded), and the connection comes back by itself.
    outcomes = []
    for i in range(50):
        try:
            outcomes.append(await ask(caller, i, timeout=2.0))
            break
        except (RemoteError, TimeoutError) as e:
            outcomes.append(e)
            await asyncio.sleep(0.2)
    assert outcomes[-1] == [i, i + 1, i + 2]
    assert proxy.connections > before  # it reconnected through the proxy


async def test_truncated_stream_reconnects(proxied) -> None:
    proxy, caller, _ = proxied
    proxy.faults.truncate_after = 7  # the next connection dies mid-frame
    proxy.reset_all()
    for _ in range(50):
        if proxy.connections >= 3:
            break
        await asyncio.sleep(0.1)
    proxy.faults.truncate_after = None
    proxy.reset_all()
    result: list[int] | BaseException = TimeoutError()
    for _ in range(50):
        try:
            result = await ask(caller, 5, timeout=2.0)
            break
        except (RemoteError, TimeoutError) as e:
            result = e
            await asyncio.sleep(0.2)
    assert result == [5, 6, 7]
