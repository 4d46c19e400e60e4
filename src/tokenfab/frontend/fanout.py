"""Runs the engine requests of one API request (prompts × n) and merges their output streams,
recording TTFT / inter-token / end-to-end latency as outputs arrive.

Cancellation is synchronous (`cancel()`), so it is safe from `finally` blocks of a streaming
response that the server is tearing down after a client disconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import msgspec

from tokenfab.frontend.metrics import FrontendMetrics
from tokenfab.frontend.workers import WorkerPool
from tokenfab.protocol import GenerateOutput, GenerateRequest
from tokenfab.runtime import RemoteError, ResponseStream

_END = object()
MAX_ATTEMPTS = 3
"""Workers tried for one engine request whose worker vanishes before its first output."""
MAX_MIGRATIONS = 2
"""Times one engine request may move to another worker after its worker died mid-stream."""
MIGRATION_WAIT_S = 20.0
"""How long a migration waits for a worker to take it when none is there (the runtime's
NATS server restarting drops every worker from discovery until they heartbeat again)."""

log = logging.getLogger(__name__)


class Fanout:
    def __init__(
        self,
        pool: WorkerPool,
        requests: list[GenerateRequest],
        metrics: FrontendMetrics,
        arrival: float,
    ) -> None:
        self._pool = pool
        self._requests = requests
        self._metrics = metrics
        self._arrival = arrival
        self._streams: list[ResponseStream[GenerateOutput] | None] = [None] * len(requests)
        self._last: list[float | None] = [None] * len(requests)
        self._tasks: list[asyncio.Task[None]] = []
        self.finished = [False] * len(requests)
        self._generated: list[list[int]] = [[] for _ in requests]
        """Token ids each request has produced so far (what a migration continues from)."""
        self._migrations = [0] * len(requests)

    async def start(self) -> list[GenerateOutput]:
        """Send every request and wait for each one's first output, so that admission errors
        (invalid request, queue full) surface before any response byte is sent."""
        try:
            firsts = await asyncio.gather(
                *(self._open(i, req) for i, req in enumerate(self._requests)),
                return_exceptions=True,
            )
        except BaseException:
            self.cancel()
            raise
        errors = [f for f in firsts if isinstance(f, BaseException)]
        if errors:
            self.cancel()
            remote = [e for e in errors if isinstance(e, RemoteError)]
            if remote:
                raise remote[0]
            if isinstance(errors[0], StopAsyncIteration):
                raise RemoteError("internal", "the worker ended the stream without output")
            raise errors[0]
        outs = [f for f in firsts if isinstance(f, GenerateOutput)]
        for i, out in enumerate(outs):
            self._generated[i].extend(out.token_ids)
            self._observe(i, out)
        return outs

    async def _open(self, i: int, req: GenerateRequest) -> GenerateOutput:
        """Request `i`'s stream and first output. A worker that is gone before the first
        output (its process died, or it left discovery) has produced nothing the client has
        seen, so the request goes to another worker instead of failing."""
        tried: list[str] = []
        for attempt in range(1, MAX_ATTEMPTS + 1):
            stream = await self._pool.generate(req, exclude=tried)
            self._streams[i] = stream
            try:
                first = await anext(stream)
            except RemoteError as e:
                stream.cancel()
                tried.append(stream.instance_id)
                if e.code != "unavailable" or attempt == MAX_ATTEMPTS or not self._pool.workers:
                    raise
                log.warning("request %s: %s; retrying on another worker", req.request_id, e)
                continue
            self._pool.first_output(req, first)
            return first
        raise AssertionError("unreachable")

    async def rest(self) -> AsyncIterator[tuple[int, GenerateOutput]]:
        """The outputs after the first ones, as (index, output), in arrival order."""
        queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

        async def pump(i: int, stream: ResponseStream[GenerateOutput]) -> None:
            migrated = False
            while True:
                try:
                    async for out in stream:
                        self._generated[i].extend(out.token_ids)
                        if migrated:
                            _as_continuation(out)
                        queue.put_nowait((i, out))
                except RemoteError as e:
                    if e.code != "unavailable" or not self._can_migrate(i):
                        queue.put_nowait((i, e))
                        return
                    try:
                        stream = await self._migrate(i, stream.instance_id, str(e))
                    except Exception as again:  # no worker took it: the client sees the error
                        queue.put_nowait((i, again))
                        return
                    migrated = True
                    continue
                except Exception as e:  # handed to the consumer, which raises it
                    queue.put_nowait((i, e))
                    return
                queue.put_nowait((i, _END))
                return

        loop = asyncio.get_running_loop()
        pending = 0
        for i, stream in enumerate(self._streams):
            if stream is not None and not self.finished[i]:
                self._tasks.append(loop.create_task(pump(i, stream)))
                pending += 1
        try:
            while pending:
                i, item = await queue.get()
                if item is _END:
                    pending -= 1
                    if not self.finished[i]:
                        raise RemoteError("internal", "the worker ended the stream early")
                    continue
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, GenerateOutput)
                self._observe(i, item)
                yield i, item
        finally:
            self.cancel()

    def _can_migrate(self, i: int) -> bool:
        # A grammar's state lives in the dead engine: a continuation would restart it.
        req = self._requests[i]
        return self._migrations[i] < MAX_MIGRATIONS and req.sampling.structured is None

    async def _migrate(self, i: int, dead: str, why: str) -> ResponseStream[GenerateOutput]:
        """Continue request `i` on another worker: its prompt plus the tokens generated so far
        as the new prompt, the rest of its budget as max_tokens. Greedy output continues
        exactly (the new engine's detokenizer is seeded with the last tokens, so text joins);
        a seeded sampler starts its stream afresh."""
        req = self._requests[i]
        done = self._generated[i]
        sp = req.sampling
        left = None if sp.max_tokens is None else sp.max_tokens - len(done)
        if left is not None and left < 1:
            raise RemoteError("unavailable", why)
        self._migrations[i] += 1
        cont = GenerateRequest(
            request_id=f"{req.request_id}-m{self._migrations[i]}",
            prompt_token_ids=req.prompt_token_ids + done,
            sampling=msgspec.structs.replace(
                sp,
                max_tokens=left,
                min_tokens=max(0, sp.min_tokens - len(done)),
                prompt_logprobs=None,
            ),
            cache_salt=req.cache_salt,
            lora_name=req.lora_name,
        )
        log.warning("request %s: %s; continuing on another worker", req.request_id, why)
        self._metrics.migrations.inc()
        stream = await self._generate_when_possible(cont, dead)
        self._streams[i] = stream
        return stream

    async def _generate_when_possible(
        self, req: GenerateRequest, dead: str
    ) -> ResponseStream[GenerateOutput]:
        """Send a continuation to a worker other than `dead`; while none can take it (all
        gone for a moment), retry for up to MIGRATION_WAIT_S, then with `dead` allowed too
        (it may have been cut off, not killed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MIGRATION_WAIT_S
        while True:
            exclude = [dead] if loop.time() < deadline else []
            try:
                return await self._pool.generate(req, exclude=exclude)
            except Exception as e:
                if loop.time() > deadline + MIGRATION_WAIT_S / 4:
                    raise
                log.info("request %s: no worker takes it yet (%s); waiting", req.request_id, e)
                await asyncio.sleep(0.25)

    def _observe(self, i: int, out: GenerateOutput) -> None:
        now = time.monotonic()
        m = self._metrics
        if out.token_ids:
            last = self._last[i]
            if last is None:
                m.ttft.observe(now - self._arrival)
            else:
                m.itl.observe((now - last) / len(out.token_ids))
            self._last[i] = now
            m.generation_tokens.inc(len(out.token_ids))
        if out.finish_reason is not None:
            self.finished[i] = True
            m.e2e.observe(now - self._arrival)
            m.finished.labels(out.finish_reason).inc()

    def cancel(self) -> None:
        """Stop every unfinished engine request (the workers abort them and free their KV)."""
        for stream in self._streams:
            if stream is not None:
                stream.cancel()
        for task in self._tasks:
            task.cancel()


def _as_continuation(out: GenerateOutput) -> None:
    """A continuation's counts describe its longer prompt; the client's usage keeps the
    original's."""
    if out.num_prompt_tokens:
        out.num_prompt_tokens = 0
        out.num_cached_tokens = 0
