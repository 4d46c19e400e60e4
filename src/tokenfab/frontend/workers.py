"""The frontend's view of the workers: who is there (discovery), what they cache and how loaded
they are (KV events and load reports on the event plane), and which one gets a request (the
router's decision).

All decisions are the router's (`tokenfab.router`, a pure state machine); this module is its I/O
edge: it feeds the router what the runtime delivers, asks a worker for a snapshot of its cache
when the router has missed events, and sends each request where the router says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Sequence

import msgspec

from tokenfab.clock import Clock, MonotonicClock
from tokenfab.frontend.metrics import RouterMetrics
from tokenfab.kv.hashing import block_hashes, request_extra_keys
from tokenfab.protocol import (
    KV_EVENTS_TOPIC,
    LOAD_TOPIC,
    ROUTER_COMPONENT,
    WORKER_COMPONENT,
    GenerateOutput,
    GenerateRequest,
    KVEventBatch,
    KVSnapshot,
    LoadReport,
    RemotePrefill,
    RouteRequest,
    RouteResponse,
    SamplingParams,
    SnapshotRequest,
    StatsRequest,
    WorkerInfo,
)
from tokenfab.router.disagg import DisaggConfig, route_disagg
from tokenfab.router.health import Drain, HealthConfig, HealthMonitor
from tokenfab.router.router import NoWorkerError, RouteDecision, Router, RouterConfig
from tokenfab.runtime import (
    InstanceInfo,
    InstanceUnavailable,
    ResponseStream,
    Runtime,
    Subscription,
)

log = logging.getLogger(__name__)

HEALTH_CHECK_S = 0.25
"""How often the health monitor looks for hangs (detection lags the timeout by at most this)."""
CANARY_PROMPT = list(range(10, 42))
"""Token ids of the canary prompt (valid in any vocabulary of 42+ tokens)."""
CANARY_TOKENS = 8


def worker_info(instance: InstanceInfo) -> WorkerInfo | None:
    """The typed description a worker registered with (None if it is not one of ours)."""
    try:
        return msgspec.convert(instance.metadata, WorkerInfo)
    except msgspec.ValidationError as e:
        log.warning("ignoring %s: bad worker description (%s)", instance.instance_id, e)
        return None


class WorkerPool:
    """Keeps the live worker set from discovery, feeds the router, and sends requests to the
    worker it chooses."""

    def __init__(
        self,
        runtime: Runtime,
        router: RouterConfig | None = None,
        clock: Clock | None = None,
        external_router: bool = False,
        disagg: DisaggConfig | None = None,
        health: HealthConfig | None = None,
        active_target: int | None = None,
        canary_interval_s: float = 0.0,
    ) -> None:
        """`external_router`: ask a `tokenfab router` on the runtime instead of the embedded
        router (which still routes when none answers). `health`: hang/straggler thresholds;
        `active_target`: with hot spares, how many workers serve (None: all);
        `canary_interval_s`: how often each worker answers the canary (0: never)."""
        self.runtime = runtime
        self.clock = clock or MonotonicClock()
        self.router = Router(router or RouterConfig(), self.clock)
        self.health = HealthMonitor(health or HealthConfig(), self.clock, active_target)
        self.canary_interval_s = canary_interval_s
        self.drains: list[Drain] = []
        """Every drain verdict so far."""
        self.incidents: list[tuple[float, str, str]] = []
        """(clock time, worker id, what): every drain and every worker lost (the chaos
        benchmark reads detection times here)."""
        self._workers: dict[str, InstanceInfo] = {}
        self.infos: dict[str, WorkerInfo] = {}
        self._active: dict[str, set[ResponseStream[GenerateOutput]]] = {}
        """Open generate streams per worker, failed at once if that worker disappears."""
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._resyncing: set[str] = set()
        """Workers whose snapshot is on its way (the router's index buffers their events
        meanwhile and replays them on the snapshot)."""
        self.external_router = external_router
        self.disagg = disagg or DisaggConfig()
        self.remote_prefills = 0
        """Requests sent with a remote prefill (disaggregated), total."""
        self._warned_no_router = False
        self.event_lag_s: list[float] = []
        """Recent delays from a worker publishing KV events to the router applying them."""
        self.predicted_hit_tokens = 0
        """Prompt tokens the router expected the chosen workers to find cached (total)."""
        self.actual_hit_tokens = 0
        """Prompt tokens the workers did find cached (total, from first outputs)."""

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Subscribe before listing, so no event published after the snapshot is missed.
        events = await self.runtime.subscribe(KV_EVENTS_TOPIC, KVEventBatch)
        loads = await self.runtime.subscribe(LOAD_TOPIC, LoadReport)
        for info in await self.runtime.instances(WORKER_COMPONENT):
            self._add(info)
        self._tasks = [
            loop.create_task(self._watch()),
            loop.create_task(self._consume_events(events)),
            loop.create_task(self._consume_loads(loads)),
            loop.create_task(self._watch_health()),
        ]
        if self.canary_interval_s > 0:
            self._tasks.append(loop.create_task(self._canaries()))

    # ------------------------------------------------------------------ discovery

    async def _watch(self) -> None:
        async for event in self.runtime.watch(WORKER_COMPONENT):
            if event.kind == "added":
                wid = event.instance.instance_id
                old = self._workers.get(wid)
                if old is not None and old.incarnation != event.instance.incarnation:
                    self.forget(wid, "restarted")  # its old streams and cache died with it
                if wid not in self._workers:
                    self._add(event.instance)
            else:
                self.forget(event.instance.instance_id, "went away")

    def _add(self, instance: InstanceInfo) -> None:
        info = worker_info(instance)
        if info is None:
            return
        wid = instance.instance_id
        self._workers[wid] = instance
        self.infos[wid] = info
        self.router.add_worker(wid, info)
        self.health.add_worker(wid)
        self._changed.set()
        # A worker seen for the first time may have cached blocks already (this frontend
        # started late, or the worker was restarted): learn its state from a snapshot.
        self._resync(wid)

    def forget(self, worker_id: str, reason: str) -> None:
        """Drop a worker known to be gone (discovery said so, or its process exited): its
        streams in flight fail now instead of waiting for a lease to expire, and the router
        stops counting its cache. Discovery adds it back when it registers again."""
        if self._workers.pop(worker_id, None) is not None:
            self.incidents.append((self.clock.now(), worker_id, f"gone: {reason}"))
        self.infos.pop(worker_id, None)
        self._resyncing.discard(worker_id)
        self.router.remove_worker(worker_id)
        self.health.remove_worker(worker_id)
        for stream in list(self._active.pop(worker_id, ())):
            stream.fail("unavailable", f"worker {worker_id} {reason}")
        self._changed.set()

    @property
    def workers(self) -> list[InstanceInfo]:
        return sorted(self._workers.values(), key=lambda w: w.instance_id)

    @property
    def first_info(self) -> WorkerInfo | None:
        return self.infos[min(self.infos)] if self.infos else None

    async def wait_for_workers(self, n: int = 1, timeout: float = 30.0) -> None:
        async def until() -> None:
            while len(self._workers) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), timeout)

    # ------------------------------------------------------------------ events and load

    async def _consume_events(self, sub: Subscription[KVEventBatch]) -> None:
        async for batch in sub:
            wid = batch.worker_id
            if wid not in self._workers:
                continue  # not (yet) in discovery: its snapshot will cover these
            if batch.timestamp:
                self._note_lag(time.time() - batch.timestamp)
            if not self.router.on_kv_events(batch):
                self._resync(wid)

    async def _consume_loads(self, sub: Subscription[LoadReport]) -> None:
        async for report in sub:
            if report.worker_id not in self._workers:
                continue
            self.router.on_load(report)
            self.health.on_report(report)
            for wid in self.router.workers_needing_resync():
                self._resync(wid)

    # ------------------------------------------------------------------ health

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_CHECK_S)
            self.apply_health()

    def apply_health(self) -> None:
        """Act on the health monitor's new verdicts: a drained worker gets no new work, and
        one that hangs or is corrupt loses its requests in flight (they migrate, and the
        worker is told to abort them in case it resumes)."""
        drains, restored = self.health.check()
        for d in drains:
            self.drains.append(d)
            self.incidents.append((d.at, d.worker_id, d.reason))
            log.warning("worker %s drained (%s): %s", d.worker_id, d.reason, d.detail)
            if d.migrate:
                for stream in list(self._active.get(d.worker_id, ())):
                    stream.abandon("unavailable", f"worker {d.worker_id} {d.reason}: {d.detail}")
        for wid in restored:
            log.warning("worker %s serves again", wid)
        if restored:
            self._changed.set()

    async def _canaries(self) -> None:
        """Each worker answers the canary prompt greedily, now and every interval; the health
        monitor compares the answers (a wrong one quarantines its worker)."""
        asked: set[str] = set()
        next_round = self.clock.now()
        while True:
            due = self.clock.now() >= next_round
            ids = [
                w
                for w in sorted(self._workers)
                if (due or w not in asked) and self.health.drained(w) is None
            ]
            if due:
                next_round = self.clock.now() + self.canary_interval_s
            asked.update(ids)
            if ids:
                await asyncio.gather(*(self._canary(w) for w in ids))
            await asyncio.sleep(min(1.0, self.canary_interval_s))

    async def _canary(self, worker_id: str, timeout: float = 10.0) -> None:
        request = GenerateRequest(
            request_id=f"canary-{worker_id}-{uuid.uuid4().hex[:8]}",
            prompt_token_ids=CANARY_PROMPT,
            sampling=SamplingParams(max_tokens=CANARY_TOKENS, temperature=0.0, ignore_eos=True),
        )
        tokens: list[int] = []
        try:
            stream = await self.runtime.call(worker_id, "generate", request, GenerateOutput)
            async with stream:

                async def collect() -> None:
                    async for out in stream:
                        tokens.extend(out.token_ids)

                await asyncio.wait_for(collect(), timeout)
        except Exception as e:  # a dead or hung worker is the other detectors' business
            log.info("canary on %s got no answer: %r", worker_id, e)
            return
        if len(tokens) == CANARY_TOKENS and worker_id in self._workers:
            self.health.on_canary(worker_id, tokens)
            self.apply_health()

    def _note_lag(self, lag: float) -> None:
        self.event_lag_s.append(max(0.0, lag))
        if len(self.event_lag_s) > 256:
            del self.event_lag_s[:128]

    def _resync(self, worker_id: str) -> None:
        if worker_id in self._resyncing:
            return
        self._resyncing.add(worker_id)
        task = asyncio.get_running_loop().create_task(self._fetch_snapshot(worker_id))
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    async def _fetch_snapshot(self, worker_id: str, timeout: float = 10.0) -> None:
        snap: KVSnapshot | None = None
        try:
            stream = await self.runtime.call(
                worker_id, "kv_snapshot", SnapshotRequest(), KVSnapshot
            )
            async with stream:
                snap = await asyncio.wait_for(anext(stream), timeout)
        except Exception as e:  # the worker died or is too old to serve snapshots
            log.warning("KV snapshot of %s failed: %r", worker_id, e)
        if worker_id not in self._resyncing:
            return  # forgotten meanwhile
        self._resyncing.discard(worker_id)
        if snap is not None and not self.router.on_snapshot(snap):
            self._resync(worker_id)  # events after the snapshot had a gap too

    # ------------------------------------------------------------------ requests

    def hashes(self, request: GenerateRequest) -> list[int]:
        """The prompt's block hashes, computed as the engines compute them."""
        info = self.first_info
        if info is None:
            raise InstanceUnavailable("no worker is available")
        keys = request_extra_keys(request.lora_name, request.cache_salt)
        return block_hashes(request.prompt_token_ids, info.block_size, keys)

    def route_hashes(
        self,
        request_id: str,
        hashes: list[int],
        num_tokens: int,
        exclude: Sequence[str] = (),
        candidates: list[str] | None = None,
    ) -> RouteDecision:
        """The router's choice among `candidates` (default: the live workers minus
        `exclude`), leaving out workers the health monitor has drained or quarantined."""
        if candidates is None:
            candidates = [w for w in sorted(self._workers) if w not in exclude]
        candidates = self.health.routable(candidates)
        if not candidates:
            raise InstanceUnavailable("no worker is available")
        try:
            decision = self.router.route(request_id, hashes, num_tokens, candidates)
        except NoWorkerError as e:
            raise InstanceUnavailable(str(e)) from None
        self.predicted_hit_tokens += decision.predicted_hit_tokens
        return decision

    async def _route(self, request: GenerateRequest, exclude: Sequence[str]) -> str:
        rid, hashes, n = request.request_id, self.hashes(request), len(request.prompt_token_ids)
        if self.external_router:
            ask = RouteRequest(
                request_id=rid, block_hashes=hashes, num_prompt_tokens=n, exclude=list(exclude)
            )
            remote = await self._route_remote(ask)
            if remote is not None and self.health.routable([remote.worker_id]):
                self.predicted_hit_tokens += remote.predicted_hit_tokens
                return remote.worker_id
        return self.route_hashes(rid, hashes, n, exclude).worker_id

    async def _route_remote(
        self, request: RouteRequest, timeout: float = 5.0
    ) -> RouteResponse | None:
        """Ask a standalone router; None (route here) when none answers."""
        routers = sorted(i.instance_id for i in await self.runtime.instances(ROUTER_COMPONENT))
        for router_id in routers:
            try:
                stream = await self.runtime.call(router_id, "route", request, RouteResponse)
                async with stream:
                    return await asyncio.wait_for(anext(stream), timeout)
            except Exception as e:  # that router is gone or failed: try the next one
                log.warning("router %s did not answer: %r", router_id, e)
        if routers or not self._warned_no_router:
            log.warning("no standalone router answered; routing in the frontend")
            self._warned_no_router = True
        return None

    def _roles(self, exclude: Sequence[str]) -> tuple[list[str], list[str]]:
        """(workers that decode: aggregated and decode roles; prefill workers), live, sorted."""
        live = [w for w in sorted(self._workers) if w not in exclude and w in self.infos]
        prefill = [w for w in live if self.infos[w].role == "prefill"]
        return [w for w in live if w not in prefill], prefill

    def _route_disagg(
        self, request: GenerateRequest, decoders: list[str], prefillers: list[str]
    ) -> tuple[str, GenerateRequest]:
        """Decode worker by load and its own cached prefix; a prefill worker by KV overlap
        unless `disagg.remote_prefill` says prefilling on the decode worker is better."""
        rid, n = request.request_id, len(request.prompt_token_ids)
        decision, pre = route_disagg(
            lambda r, h, k, c: self.route_hashes(r, list(h), k, candidates=c),
            self.router.worker_load,
            self.router.on_request_finished,
            self.disagg,
            rid,
            self.hashes(request),
            n,
            decoders,
            prefillers,
        )
        if pre is None:
            return decision.worker_id, request
        hint = RemotePrefill(
            worker_id=pre.worker_id,
            min_uncached_tokens=self.disagg.min_uncached_tokens,
            hold_s=self.disagg.hold_s,
        )
        self.remote_prefills += 1
        return decision.worker_id, msgspec.structs.replace(request, remote_prefill=hint)

    async def generate(
        self, request: GenerateRequest, exclude: Sequence[str] = ()
    ) -> ResponseStream[GenerateOutput]:
        rid = request.request_id
        decoders, prefillers = self._roles(exclude)
        # Prefill workers all drained (hung, straggling): decode workers prefill themselves.
        prefillers = self.health.routable(prefillers)
        if prefillers and decoders and request.sampling.prompt_logprobs is None:
            wid, request = self._route_disagg(request, decoders, prefillers)
        else:
            wid = await self._route(request, exclude)
        try:
            stream = await self.runtime.call(wid, "generate", request, GenerateOutput)
        except BaseException:
            self.router.on_request_finished(rid)
            raise
        active = self._active.setdefault(wid, set())
        active.add(stream)
        self.health.on_stream_opened(wid)

        def done(s: ResponseStream[GenerateOutput]) -> None:
            active.discard(s)
            self.health.on_stream_closed(wid)
            self.router.on_request_finished(rid)
            self.router.on_request_finished(f"{rid}#prefill")

        stream.on_done(done)
        return stream

    def first_output(self, request: GenerateRequest, out: GenerateOutput) -> None:
        """The request's prompt is computed on its worker: its prefill no longer counts as
        queued there."""
        self.actual_hit_tokens += out.num_cached_tokens
        self.router.on_first_token(request.request_id)
        self.router.on_first_token(f"{request.request_id}#prefill")

    def router_metrics(self) -> RouterMetrics:
        lags = sorted(self.event_lag_s)
        return RouterMetrics(
            stats=self.router.stats(),
            predicted_hit_tokens=self.predicted_hit_tokens,
            actual_hit_tokens=self.actual_hit_tokens,
            event_lag_p50_s=lags[len(lags) // 2] if lags else 0.0,
            drains=dict(Counter(d.reason for d in self.drains)),
        )

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
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
