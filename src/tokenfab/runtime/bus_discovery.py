"""Discovery carried by the bus itself, for backends without a shared store (core NATS).

An instance announces itself `up` when registered and again at every keepalive (its lease
heartbeat), and `down` when it deregisters. Every process that lists or watches a component
keeps its own view, expiring instances whose heartbeat is older than their ttl, and on first
use sends a probe that makes every live instance announce itself at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec

from tokenfab.clock import Clock, MonotonicClock
from tokenfab.runtime.bus import Bus, BusSubscription
from tokenfab.runtime.wire import (
    Announcement,
    DiscoveryEvent,
    InstanceInfo,
    Probe,
    discovery_subject,
    probe_subject,
)

_enc = msgspec.msgpack.Encoder()
_dec_announcement = msgspec.msgpack.Decoder(Announcement)
_dec_probe = msgspec.msgpack.Decoder(Probe)
_STOP = None


@dataclass
class _View:
    entries: dict[str, tuple[InstanceInfo, float]] = field(default_factory=dict)
    """instance id -> (info, expires_at)"""
    watchers: list[asyncio.Queue[DiscoveryEvent | None]] = field(default_factory=list)
    sub: BusSubscription | None = None
    task: asyncio.Task[None] | None = None


class BusDiscovery:
    def __init__(
        self,
        bus: Bus,
        namespace: str,
        clock: Clock | None = None,
        sweep_interval: float | None = 0.5,
        probe_wait: float = 0.2,
    ) -> None:
        self._bus = bus
        self._ns = namespace
        self._clock = clock or MonotonicClock()
        self._sweep_interval = sweep_interval
        self._probe_wait = probe_wait
        self._own: dict[int, tuple[InstanceInfo, float]] = {}
        self._lease_ids = itertools.count(1)
        self._views: dict[str, _View] = {}
        self._probe_subs: dict[str, tuple[BusSubscription, asyncio.Task[None]]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ own instances

    async def put(self, info: InstanceInfo, ttl: float) -> int:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive (got {ttl})")
        for lease_id, (other, _) in list(self._own.items()):
            if (other.component, other.instance_id) == (info.component, info.instance_id):
                del self._own[lease_id]
        lease_id = next(self._lease_ids)
        self._own[lease_id] = (info, ttl)
        await self._answer_probes(info.component)
        await self._announce("up", info, ttl)
        return lease_id

    async def keepalive(self, lease_id: int) -> bool:
        own = self._own.get(lease_id)
        if own is None:
            return False
        await self._announce("up", *own)
        return True

    async def revoke(self, lease_id: int) -> None:
        own = self._own.pop(lease_id, None)
        if own is not None:
            await self._announce("down", *own)

    async def _announce(self, kind: str, info: InstanceInfo, ttl: float) -> None:
        msg = Announcement(kind=kind, instance=info, ttl=ttl)  # type: ignore[arg-type]
        await self._bus.publish(discovery_subject(self._ns, info.component), _enc.encode(msg))

    async def _answer_probes(self, component: str) -> None:
        if component in self._probe_subs:
            return
        sub = await self._bus.subscribe(probe_subject(self._ns, component))

        async def answer() -> None:
            async for _ in sub:
                for info, ttl in list(self._own.values()):
                    if info.component == component:
                        await self._announce("up", info, ttl)

        self._probe_subs[component] = (sub, asyncio.get_running_loop().create_task(answer()))

    # ------------------------------------------------------------------ views

    async def _view(self, component: str) -> _View:
        view = self._views.get(component)
        if view is not None:
            return view
        view = self._views[component] = _View()
        view.sub = await self._bus.subscribe(discovery_subject(self._ns, component))
        view.task = asyncio.get_running_loop().create_task(self._follow(view))
        if self._sweep_interval is not None and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        probe = _enc.encode(Probe(component=component))
        await self._bus.publish(probe_subject(self._ns, component), probe)
        await asyncio.sleep(self._probe_wait)  # let live instances answer the probe
        return view

    async def _follow(self, view: _View) -> None:
        assert view.sub is not None
        async for data in view.sub:
            try:
                msg = _dec_announcement.decode(data)
            except msgspec.DecodeError:
                continue
            iid = msg.instance.instance_id
            if msg.kind == "up":
                old = view.entries.get(iid)
                view.entries[iid] = (msg.instance, self._clock.now() + msg.ttl)
                if old is None or old[0].incarnation != msg.instance.incarnation:
                    self._notify(view, "added", msg.instance)
            elif (old := view.entries.get(iid)) is not None and (
                old[0].incarnation == msg.instance.incarnation
            ):  # a late `down` of an earlier incarnation must not remove its successor
                del view.entries[iid]
                self._notify(view, "removed", msg.instance)

    def _notify(self, view: _View, kind: str, info: InstanceInfo) -> None:
        event = DiscoveryEvent(kind=kind, instance=info)  # type: ignore[arg-type]
        for q in view.watchers:
            q.put_nowait(event)

    def expire(self) -> list[InstanceInfo]:
        now = self._clock.now()
        gone = []
        for view in self._views.values():
            for iid, (info, expires_at) in list(view.entries.items()):
                if expires_at <= now:
                    del view.entries[iid]
                    self._notify(view, "removed", info)
                    gone.append(info)
        return gone

    async def _sweep(self) -> None:
        assert self._sweep_interval is not None
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.expire()

    async def list(self, component: str) -> list[InstanceInfo]:
        view = await self._view(component)
        self.expire()
        return [info for info, _ in view.entries.values()]

    async def watch(self, component: str) -> AsyncIterator[DiscoveryEvent]:
        view = await self._view(component)
        self.expire()
        queue: asyncio.Queue[DiscoveryEvent | None] = asyncio.Queue()
        for info, _ in view.entries.values():
            queue.put_nowait(DiscoveryEvent(kind="added", instance=info))
        view.watchers.append(queue)
        try:
            while (event := await queue.get()) is not _STOP:
                yield event
        finally:
            with contextlib.suppress(ValueError):
                view.watchers.remove(queue)

    async def close(self) -> None:
        for lease_id in list(self._own):
            await self.revoke(lease_id)
        tasks = [t for _, t in self._probe_subs.values()]
        tasks += [v.task for v in self._views.values() if v.task is not None]
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for sub, _ in self._probe_subs.values():
            sub.unsubscribe()
        for view in self._views.values():
            if view.sub is not None:
                view.sub.unsubscribe()
            for q in view.watchers:
                q.put_nowait(_STOP)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
