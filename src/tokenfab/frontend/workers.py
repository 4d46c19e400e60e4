"""The frontend's view of the workers: who is there (discovery) and which one gets a request.

The choice sits behind `WorkerSelector` so the KV-aware router can replace round-robin without
touching the API code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Protocol

from tokenfab.protocol import (
    WORKER_COMPONENT,
    GenerateOutput,
    GenerateRequest,
    LoadReport,
    StatsRequest,
)
from tokenfab.runtime import InstanceInfo, InstanceUnavailable, ResponseStream, Runtime

log = logging.getLogger(__name__)


class WorkerSelector(Protocol):
    def choose(self, workers: Sequence[InstanceInfo], request: GenerateRequest) -> InstanceInfo:
        """Pick one of `workers` (never empty) for `request`."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, workers: Sequence[InstanceInfo], request: GenerateRequest) -> InstanceInfo:
        worker = workers[self._next % len(workers)]
        self._next += 1
        return worker


class WorkerPool:
    """Keeps the live worker set from discovery and sends requests to the chosen one."""

    def __init__(self, runtime: Runtime, selector: WorkerSelector | None = None) -> None:
        self.runtime = runtime
        self.selector = selector or RoundRobin()
        self._workers: dict[str, InstanceInfo] = {}
        self._active: dict[str, set[ResponseStream[GenerateOutput]]] = {}
        """Open generate streams per worker, failed at once if that worker disappears."""
        self._changed = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        for info in await self.runtime.instances(WORKER_COMPONENT):
            self._workers[info.instance_id] = info
        self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        async for event in self.runtime.watch(WORKER_COMPONENT):
            if event.kind == "added":
                wid = event.instance.instance_id
                old = self._workers.get(wid)
                if old is not None and old.incarnation != event.instance.incarnation:
                    self.forget(wid, "restarted")  # its old streams died with it
                self._workers[wid] = event.instance
                self._changed.set()
            else:
                self.forget(event.instance.instance_id, "went away")

    def forget(self, worker_id: str, reason: str) -> None:
        """Drop a worker known to be gone (discovery said so, or its process exited): its
        streams in flight fail now instead of waiting for a lease to expire. Discovery adds
        it back when it registers again."""
        self._workers.pop(worker_id, None)
        for stream in list(self._active.pop(worker_id, ())):
            stream.fail("unavailable", f"worker {worker_id} {reason}")
        self._changed.set()

    @property
    def workers(self) -> list[InstanceInfo]:
        return sorted(self._workers.values(), key=lambda w: w.instance_id)

    async def wait_for_workers(self, n: int = 1, timeout: float = 30.0) -> None:
        async def until() -> None:
            while len(self._workers) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), timeout)

    async def generate(self, request: GenerateRequest) -> ResponseStream[GenerateOutput]:
        workers = self.workers
        if not workers:
            raise InstanceUnavailable("no worker is available")
        wid = self.selector.choose(workers, request).instance_id
        stream = await self.runtime.call(wid, "generate", request, GenerateOutput)
        active = self._active.setdefault(wid, set())
        active.add(stream)
        stream.on_done(active.discard)
        return stream

    async def stats(self, timeout: float = 2.0) -> list[LoadReport]:
        """A fresh LoadReport from every worker that answers within `timeout`."""

        async def one(worker: InstanceInfo) -> LoadReport | None:
            try:
                stream = await self.runtime.call(
                    worker.instance_id, "stats", StatsRequest(), LoadReport
                )
                async with stream:
                    return await asyncio.wait_for(anext(stream), timeout)
            except Exception as e:  # a dead or slow worker must not break /metrics
                log.warning("stats from %s failed: %s", worker.instance_id, e)
                return None

        reports = await asyncio.gather(*(one(w) for w in self.workers))
        return [r for r in reports if r is not None]

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
