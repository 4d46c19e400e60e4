"""Discovery: instances register with metadata under a lease; watchers see them come and go.

`LocalDiscovery` keeps the registry in memory (encoded as msgpack, like a NATS KV bucket would)
and reads time from an injected `Clock`, so lease expiry is testable without sleeping.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import msgspec

from tokenfab.clock import Clock, MonotonicClock
from tokenfab.runtime.wire import DiscoveryEvent, InstanceInfo


class Discovery(Protocol):
    async def put(self, info: InstanceInfo, ttl: float) -> int:
        """Register (or replace) an instance under a new lease; returns the lease id."""
        ...

    async def keepalive(self, lease_id: int) -> bool:
        """Extend a lease by its ttl; False if it already expired or was revoked."""
        ...

    async def revoke(self, lease_id: int) -> None: ...

    async def list(self, component: str) -> list[InstanceInfo]: ...

    def watch(self, component: str) -> AsyncIterator[DiscoveryEvent]:
        """The current instances as `added` events, then every change, until closed."""
        ...

    async def close(self) -> None: ...


class LeaseExpired(Exception):
    pass


@dataclass
class _Entry:
    component: str
    instance_id: str
    data: bytes
    lease_id: int
    ttl: float
    expires_at: float


_enc = msgspec.msgpack.Encoder()
_dec_info = msgspec.msgpack.Decoder(InstanceInfo)
_dec_event = msgspec.msgpack.Decoder(DiscoveryEvent)
_STOP = b""


class LocalDiscovery:
    def __init__(self, clock: Clock | None = None, sweep_interval: float | None = 1.0) -> None:
        """`sweep_interval`: how often (real seconds) a background task expires leases; None
        means only on `expire()` and on reads (what tests with a ManualClock use)."""
        self._clock = clock or MonotonicClock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._by_lease: dict[int, tuple[str, str]] = {}
        self._watchers: dict[str, list[asyncio.Queue[bytes]]] = {}
        self._lease_ids = itertools.count(1)
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None

    async def put(self, info: InstanceInfo, ttl: float) -> int:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive (got {ttl})")
        self._ensure_sweeper()
        key = (info.component, info.instance_id)
        old = self._entries.get(key)
        if old is not None:
            self._by_lease.pop(old.lease_id, None)
        lease_id = next(self._lease_ids)
        entry = _Entry(
            info.component,
            info.instance_id,
            _enc.encode(info),
            lease_id,
            ttl,
            self._clock.now() + ttl,
        )
        self._entries[key] = entry
        self._by_lease[lease_id] = key
        self._notify(info.component, "added", entry.data)
        return lease_id

    async def keepalive(self, lease_id: int) -> bool:
        self.expire()
        key = self._by_lease.get(lease_id)
        if key is None:
            return False
        entry = self._entries[key]
        entry.expires_at = self._clock.now() + entry.ttl
        return True

    async def revoke(self, lease_id: int) -> None:
        key = self._by_lease.pop(lease_id, None)
        if key is not None:
            entry = self._entries.pop(key)
            self._notify(entry.component, "removed", entry.data)

    async def list(self, component: str) -> list[InstanceInfo]:
        self.expire()
        return [
            _dec_info.decode(e.data) for e in self._entries.values() if e.component == component
        ]

    async def watch(self, component: str) -> AsyncIterator[DiscoveryEvent]:
        self.expire()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        # Snapshot and subscribe with no await in between, so no change falls in the gap.
        for e in self._entries.values():
            if e.component == component:
                queue.put_nowait(_encode_event("added", e.data))
        self._watchers.setdefault(component, []).append(queue)
        try:
            while True:
                data = await queue.get()
                if data == _STOP:
                    return
                yield _dec_event.decode(data)
        finally:
            watchers = self._watchers.get(component, [])
            if queue in watchers:
                watchers.remove(queue)

    def expire(self) -> list[InstanceInfo]:
        """Drop every instance whose lease has run out; returns them."""
        now = self._clock.now()
        gone = [e for e in self._entries.values() if e.expires_at <= now]
        for e in gone:
            del self._entries[(e.component, e.instance_id)]
            self._by_lease.pop(e.lease_id, None)
            self._notify(e.component, "removed", e.data)
        return [_dec_info.decode(e.data) for e in gone]

    def _notify(self, component: str, kind: str, info_data: bytes) -> None:
        event = _encode_event(kind, info_data)
        for queue in self._watchers.get(component, ()):
            queue.put_nowait(event)

    def _ensure_sweeper(self) -> None:
        if self._sweep_interval is not None and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        assert self._sweep_interval is not None
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.expire()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for queues in self._watchers.values():
            for q in queues:
                q.put_nowait(_STOP)


def _encode_event(kind: str, info_data: bytes) -> bytes:
    # The registry stores instances encoded; re-encode as an event without a decode round trip
    # being visible to callers (msgspec.Raw embeds the stored bytes as is).
    return _enc.encode({"kind": kind, "instance": msgspec.Raw(info_data)})
