"""The NATS backend's bus: core NATS subjects (no JetStream needed), via nats-py.

`connect("nats://host:4222")` gives a `Runtime` whose request and event planes run over NATS
and whose discovery is `BusDiscovery` (heartbeat announcements on the same server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from tokenfab.runtime.bus import QueuedSubscription

log = logging.getLogger(__name__)


class NatsSubscription(QueuedSubscription):
    def __init__(self, bus: NatsBus, subject: str) -> None:
        super().__init__(subject)
        self._bus = bus
        self._sub: Any = None

    async def _on_msg(self, msg: Any) -> None:
        self.deliver(msg.data)

    def unsubscribe(self) -> None:
        if self._close_queue() and self._sub is not None:
            self._bus._spawn(self._sub.unsubscribe())


async def _quiet(coro: Any) -> None:
    with contextlib.suppress(Exception):  # the connection may already be closing
        await coro


class NatsBus:
    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self._background: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Any) -> None:
        # Keep a reference until done (the loop holds tasks only weakly); tasks run in
        # creation order, so frames published this way keep their order.
        task = asyncio.get_running_loop().create_task(_quiet(coro))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @classmethod
    async def connect(cls, url: str, name: str = "tokenfab") -> NatsBus:
        import nats

        async def on_error(e: Exception) -> None:  # one line, not nats-py's traceback
            log.warning("nats %s: %s", url, f"{type(e).__name__}: {e}".rstrip(": "))

        conn: list[Any] = []

        async def on_disconnected() -> None:
            if conn and not (conn[0].is_closed or conn[0].is_draining):  # not our own close
                log.warning("nats %s: disconnected; reconnecting", url)

        async def on_reconnected() -> None:
            log.warning("nats %s: reconnected", url)

        nc = await nats.connect(
            url,
            name=name,
            max_reconnect_attempts=-1,
            connect_timeout=5,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
        conn.append(nc)
        return cls(nc)

    async def publish(self, subject: str, data: bytes) -> None:
        await self.nc.publish(subject, bytes(data))

    def publish_soon(self, subject: str, data: bytes) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("the bus carries bytes only (encode messages with msgspec)")
        self._spawn(self.nc.publish(subject, bytes(data)))

    async def subscribe(self, subject: str) -> NatsSubscription:
        sub = NatsSubscription(self, subject)
        sub._sub = await self.nc.subscribe(subject, cb=sub._on_msg)
        # Round trip to the server, so the subscription is live before anyone (e.g. another
        # connection calling this endpoint) can publish to it.
        await self.nc.flush()
        return sub

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # e.g. the server is already gone: nothing left to drain
                await _quiet(self.nc.close())
