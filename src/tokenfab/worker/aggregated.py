"""The aggregated worker: one engine doing prefill and decode, served on the runtime.

It registers as a `worker` instance (metadata: model, context length, KV pool), serves
`generate` (GenerateRequest in, a stream of GenerateOutput out; a cancelled call aborts the
engine request) and `stats` (a fresh LoadReport), and publishes KVEventBatch on `kv_events` and
periodic LoadReport on `load`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from tokenfab.engine.errors import EngineDeadError, InvalidRequestError, QueueFullError
from tokenfab.protocol import (
    KV_EVENTS_TOPIC,
    LOAD_TOPIC,
    WORKER_COMPONENT,
    GenerateOutput,
    GenerateRequest,
    KVEvent,
    KVEventBatch,
    LoadReport,
    StatsRequest,
)
from tokenfab.runtime import Registration, RemoteError, RequestContext, Runtime
from tokenfab.worker.kv_events import KVEventForwarder

log = logging.getLogger(__name__)


def load_report(worker_id: str, stats: Any) -> LoadReport:
    """A LoadReport from an engine's stats object."""

    def get(name: str) -> int:
        return int(getattr(stats, name, 0) or 0)

    return LoadReport(
        worker_id=worker_id,
        running=get("running"),
        waiting=get("waiting"),
        kv_blocks_used=get("kv_blocks_used"),
        kv_blocks_total=get("kv_blocks_total"),
        timestamp=time.time(),
        num_preemptions=get("num_preemptions"),
        prefix_cache_queries=get("prefix_cache_queries"),
        prefix_cache_hits=get("prefix_cache_hits"),
        prompt_tokens=get("prompt_tokens"),
        generation_tokens=get("generation_tokens"),
    )


class AggregatedWorker:
    def __init__(
        self,
        engine: Any,
        runtime: Runtime,
        kv_events: KVEventForwarder | None = None,
        *,
        worker_id: str | None = None,
        load_interval: float = 1.0,
        lease_ttl: float = 10.0,
    ) -> None:
        """`engine` is a started AsyncEngine; `kv_events` the sink it was built with."""
        self.engine = engine
        self.runtime = runtime
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self._kv_events = kv_events
        self._load_interval = load_interval
        self._lease_ttl = lease_ttl
        self._registration: Registration | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def metadata(self) -> dict[str, Any]:
        cfg = getattr(self.engine, "config", None)
        inner = getattr(self.engine, "engine", None)  # AsyncEngine's LLMEngine
        return {
            "role": "aggregated",
            "model": str(getattr(self.engine, "model_name", "")),
            "model_path": str(getattr(getattr(inner, "loaded", None), "path", "") or ""),
            "max_model_len": int(self.engine.max_model_len),
            "block_size": int(getattr(cfg, "block_size", 16)),
            "kv_blocks_total": int(getattr(self.engine.stats(), "kv_blocks_total", 0) or 0),
        }

    async def start(self) -> None:
        reg = await self.runtime.register(
            WORKER_COMPONENT,
            self.worker_id,
            endpoints=["generate", "stats"],
            metadata=self.metadata(),
            lease_ttl=self._lease_ttl,
        )
        self._registration = reg
        await reg.serve("generate", GenerateRequest, self._generate)
        await reg.serve("stats", StatsRequest, self._stats)
        loop = asyncio.get_running_loop()
        if self._kv_events is not None:
            self._tasks.append(loop.create_task(self._publish_kv_events(self._kv_events.bind())))
        if self._load_interval > 0:
            self._tasks.append(loop.create_task(self._publish_load()))
        log.info("worker %s serving %s", self.worker_id, self.metadata()["model"])

    async def _generate(
        self, request: GenerateRequest, ctx: RequestContext
    ) -> AsyncIterator[GenerateOutput]:
        finished = False
        try:
            async with contextlib.aclosing(self.engine.generate(request)) as outputs:
                async for out in outputs:
                    finished = out.finish_reason is not None
                    yield out
        except InvalidRequestError as e:
            raise RemoteError("invalid_request", str(e)) from None
        except QueueFullError as e:
            raise RemoteError("queue_full", str(e)) from None
        except EngineDeadError as e:
            raise RemoteError("unavailable", str(e)) from None
        finally:
            if not finished:
                # The caller went away (or we failed): free the request's KV blocks now.
                with contextlib.suppress(Exception):
                    await self.engine.abort(request.request_id)

    async def _stats(self, request: StatsRequest, ctx: RequestContext) -> AsyncIterator[LoadReport]:
        yield load_report(self.worker_id, self.engine.stats())

    async def _publish_kv_events(self, queue: asyncio.Queue[list[KVEvent]]) -> None:
        while True:
            events = await queue.get()
            while not queue.empty():  # coalesce what piled up into one message
                events.extend(queue.get_nowait())
            await self.runtime.publish(
                KV_EVENTS_TOPIC, KVEventBatch(worker_id=self.worker_id, events=events)
            )

    async def _publish_load(self) -> None:
        while True:
            if not getattr(self.engine, "is_running", True):
                # A dead engine must stop attracting requests: leave discovery.
                log.error("engine of %s is not running; deregistering", self.worker_id)
                if self._registration is not None:
                    await self._registration.close()
                    self._registration = None
                return
            try:
                await self.runtime.publish(
                    LOAD_TOPIC, load_report(self.worker_id, self.engine.stats())
                )
            except Exception:
                log.exception("load report of %s failed", self.worker_id)
            await asyncio.sleep(self._load_interval)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._kv_events is not None:
            self._kv_events.unbind()
        if self._registration is not None:
            await self._registration.close()
            self._registration = None
