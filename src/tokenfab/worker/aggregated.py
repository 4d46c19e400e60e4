"""The aggregated worker: one engine doing prefill and decode, served on the runtime.

It registers as a `worker` instance (metadata: a `WorkerInfo`), serves `generate`
(GenerateRequest in, a stream of GenerateOutput out; a cancelled call aborts the engine
request), `stats` (a fresh LoadReport) and `kv_snapshot` (its whole prefix cache, for a router
that missed events), and publishes KVEventBatch on `kv_events` and periodic LoadReport on
`load`.

It also serves `set_role` (RoleChange in, RoleChangeStatus out): the planner's control
endpoint. The worker drains (new requests are refused as `unavailable` before any output,
so the frontend sends them to another worker; the ones in flight run to the end), switches
role, and announces itself again (a new discovery incarnation carrying the new WorkerInfo).

On SIGTERM (`drain`) it drains the same way, for up to a grace period, before it leaves.
While draining, and once its engine is quarantined (NaN/Inf logits), its load reports carry
that `state`, which the frontend's health monitor acts on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec

from tokenfab.config import DataPlaneConfig
from tokenfab.engine.errors import (
    EngineDeadError,
    EngineQuarantinedError,
    InvalidRequestError,
    QueueFullError,
)
from tokenfab.kv.transfer import KVDataServer, KVTransferClient, LocalDataPlane, parse_address
from tokenfab.protocol import (
    KV_EVENTS_TOPIC,
    LOAD_TOPIC,
    SET_ROLE_ENDPOINT,
    WORKER_COMPONENT,
    GenerateOutput,
    GenerateRequest,
    KVEvent,
    KVEventBatch,
    KVSnapshot,
    LoadReport,
    PrefillRequest,
    PrefillResponse,
    RoleChange,
    RoleChangeStatus,
    SnapshotRequest,
    StatsRequest,
    WorkerInfo,
    WorkerRole,
    WorkerState,
)
from tokenfab.runtime import Registration, RemoteError, RequestContext, Runtime
from tokenfab.worker.disagg import EngineBlockSource, decode_remote, prefill
from tokenfab.worker.kv_events import KVEventForwarder

MIN_LOAD_GAP_S = 0.05
"""Load reports go out at most this often (event-driven ones included)."""

if TYPE_CHECKING:
    from tokenfab.engine.engine import AsyncEngine

log = logging.getLogger(__name__)


def load_report(worker_id: str, stats: LoadReport) -> LoadReport:
    """The engine's stats stamped with the worker's id and the time (for the event plane)."""
    return msgspec.structs.replace(stats, worker_id=worker_id, timestamp=time.time())


class AggregatedWorker:
    def __init__(
        self,
        engine: AsyncEngine,
        runtime: Runtime,
        kv_events: KVEventForwarder | None = None,
        *,
        worker_id: str | None = None,
        role: WorkerRole = "aggregated",
        load_interval: float = 0.5,
        lease_ttl: float = 2.5,
        data_plane: LocalDataPlane | None = None,
        data: DataPlaneConfig | None = None,
    ) -> None:
        """`engine` is a started AsyncEngine; `kv_events` the sink it was built with. The lease
        is short so a worker killed without a goodbye leaves discovery within ~3 s (its
        heartbeat is every lease_ttl / 3)."""
        self.engine = engine
        self.runtime = runtime
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self._kv_events = kv_events
        self.role: WorkerRole = role
        self._load_interval = load_interval
        self._load_changed = asyncio.Event()
        """Set when a request starts producing or ends: its load report goes out early."""
        self._lease_ttl = lease_ttl
        self._registration: Registration | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # KV data plane: in-process copies when given a LocalDataPlane, else TCP. Every role
        # serves one, so a role can change at runtime without restarting (planner).
        self._local_plane = data_plane
        self._data = data or DataPlaneConfig()
        self._data_server: KVDataServer | None = None
        self.data_address = ""
        self.blocks: EngineBlockSource | None = None
        self.transfers = KVTransferClient(data_plane)
        self._drain_reason: str | None = None
        """Why new requests are refused while those in flight finish (a role change, or
        SIGTERM); None while serving. One mechanism for both: see `_drain`."""
        self._in_flight = 0
        self._idle = asyncio.Event()
        """Set while no generate call is in flight (what a drain waits for)."""
        self._idle.set()

    @property
    def draining(self) -> bool:
        """New requests are refused (a role change or a shutdown is under way)."""
        return self._drain_reason is not None

    @property
    def state(self) -> tuple[WorkerState, str]:
        """What the load reports say about this worker, with the reason."""
        quarantined = self.engine.quarantined
        if quarantined is not None:
            return "quarantined", quarantined
        if self._drain_reason is not None:
            return "draining", self._drain_reason
        return "serving", ""

    def load_report(self) -> LoadReport:
        state, reason = self.state
        report = load_report(self.worker_id, self.engine.stats())
        report.state, report.state_reason = state, reason
        return report

    def info(self) -> WorkerInfo:
        engine = self.engine.engine  # AsyncEngine's LLMEngine
        cfg = engine.config
        return WorkerInfo(
            model=engine.model_name,
            model_path=str(engine.loaded.path or ""),
            max_model_len=engine.max_model_len,
            block_size=cfg.block_size,
            role=self.role,
            kv_blocks_total=engine.kv.num_blocks,
            max_num_seqs=cfg.max_num_seqs,
            data_address=self.data_address,
        )

    async def _start_data_plane(self) -> None:
        self.blocks = EngineBlockSource(self.engine)
        if self._local_plane is not None:
            self.data_address = self._local_plane.register(self.worker_id, self.blocks)
        else:
            self._data_server = KVDataServer(self.blocks, self._data.host, self._data.port)
            await self._data_server.start()
            host, port = parse_address(self._data_server.address)
            self.data_address = self._data.advertised(host, port)
        self._tasks.append(asyncio.get_running_loop().create_task(self.blocks.reap()))

    async def _apply_role_budget(self) -> None:
        """The prompt tokens a step of this role computes (EngineConfig.decode_max_prefill_tokens)."""
        cap = self.engine.config.decode_max_prefill_tokens if self.role == "decode" else None
        await self.engine.run_on_engine(lambda e: e.set_prefill_budget(cap))

    async def start(self) -> None:
        await self._apply_role_budget()
        await self._start_data_plane()
        self._registration = await self.runtime.register(
            WORKER_COMPONENT,
            self.worker_id,
            metadata=msgspec.to_builtins(self.info()),
            lease_ttl=self._lease_ttl,
            handlers={
                "generate": (GenerateRequest, self._generate),
                "stats": (StatsRequest, self._stats),
                "kv_snapshot": (SnapshotRequest, self._snapshot),
                "prefill": (PrefillRequest, self._prefill),
                SET_ROLE_ENDPOINT: (RoleChange, self._set_role),
            },
        )
        loop = asyncio.get_running_loop()
        if self._kv_events is not None:
            self._tasks.append(loop.create_task(self._publish_kv_events(self._kv_events.bind())))
        if self._load_interval > 0:
            self._tasks.append(loop.create_task(self._publish_load()))
        log.info("worker %s serving %s", self.worker_id, self.info().model)

    async def _generate(
        self, request: GenerateRequest, ctx: RequestContext
    ) -> AsyncIterator[GenerateOutput]:
        finished = False
        first = True
        state, reason = self.state
        if state != "serving":  # the frontend tries another worker
            raise RemoteError("unavailable", f"worker {self.worker_id}: {reason}")
        self._in_flight += 1
        self._idle.clear()
        try:
            outs = (
                self.engine.generate(request)
                if request.remote_prefill is None
                else decode_remote(self.engine, self.runtime, self.transfers, request)
            )
            async with contextlib.aclosing(outs) as outputs:
                async for out in outputs:
                    finished = out.finish_reason is not None
                    if first or finished:  # its prefill is done, or its blocks are freed
                        first = False
                        self._load_changed.set()
                    yield out
        except InvalidRequestError as e:
            raise RemoteError("invalid_request", str(e)) from None
        except QueueFullError as e:
            raise RemoteError("queue_full", str(e)) from None
        except EngineQuarantinedError as e:
            self._load_changed.set()  # tell the routers now
            raise RemoteError("unavailable", f"worker {self.worker_id}: {e}") from None
        except EngineDeadError as e:
            raise RemoteError("unavailable", str(e)) from None
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            if not finished:
                # The caller went away (or we failed): free the request's KV blocks now.
                with contextlib.suppress(Exception):
                    await self.engine.abort(request.request_id)

    async def _prefill(
        self, request: PrefillRequest, ctx: RequestContext
    ) -> AsyncIterator[PrefillResponse]:
        assert self.blocks is not None
        if self.draining:  # the decode worker prefills locally on "unavailable"
            raise RemoteError("unavailable", f"worker {self.worker_id} is changing role")
        # A prefill in flight counts for the drain too, so a prefill worker switched to
        # decode finishes the prompts it took before it changes role.
        self._in_flight += 1
        self._idle.clear()
        try:
            yield await prefill(self.engine, self.blocks, self.data_address, request)
        except InvalidRequestError as e:
            raise RemoteError("invalid_request", str(e)) from None
        except QueueFullError as e:
            raise RemoteError("queue_full", str(e)) from None
        except EngineDeadError as e:
            raise RemoteError("unavailable", str(e)) from None
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _set_role(
        self, request: RoleChange, ctx: RequestContext
    ) -> AsyncIterator[RoleChangeStatus]:
        def status(phase: str, message: str = "") -> RoleChangeStatus:
            return RoleChangeStatus(worker_id=self.worker_id, role=self.role, phase=phase,  # type: ignore[arg-type]
                                    in_flight=self._in_flight, message=message)  # fmt: skip

        if request.role == self.role:
            yield status("done", f"already {self.role}")
            return
        if self._drain_reason is not None:
            yield status("failed", f"the worker is already draining: {self._drain_reason}")
            return
        why = f"changing role to {request.role}"
        self._begin_drain(why)  # before the first status: no request slips in after it
        try:
            yield status("draining")
            if not await self._wait_idle(request.drain_timeout_s):
                yield status("failed", f"{self._in_flight} request(s) still running after "
                                       f"{request.drain_timeout_s:g} s; role unchanged")  # fmt: skip
                return
            old = self.role
            await self.switch_role(request.role)
            if self._registration is not None:
                await self._registration.reannounce(msgspec.to_builtins(self.info()))
            log.info("worker %s: role %s -> %s", self.worker_id, old, self.role)
        finally:
            self._undrain(why)
        yield status("done")

    async def switch_role(self, role: WorkerRole) -> None:
        """Become `role` (called drained: nothing in flight). Every worker serves both
        `generate` (decoding, pulling remote prefills) and `prefill` with its KV data plane
        up, so only the announced role changes here (and the prefill budget, see
        EngineConfig.decode_max_prefill_tokens): the frontend routes by that role."""
        self.role = role
        await self._apply_role_budget()

    async def _stats(self, request: StatsRequest, ctx: RequestContext) -> AsyncIterator[LoadReport]:
        yield self.load_report()

    async def _snapshot(
        self, request: SnapshotRequest, ctx: RequestContext
    ) -> AsyncIterator[KVSnapshot]:
        yield await self.engine.kv_snapshot(self.worker_id)

    async def _publish_kv_events(self, queue: asyncio.Queue[list[KVEvent]]) -> None:
        while True:
            events = await queue.get()
            while not queue.empty():  # coalesce what piled up into one message
                events.extend(queue.get_nowait())
            await self.runtime.publish(
                KV_EVENTS_TOPIC,
                KVEventBatch(worker_id=self.worker_id, events=events, timestamp=time.time()),
            )

    async def _publish_load(self) -> None:
        while True:
            if not self.engine.is_running:
                # A dead engine must stop attracting requests: leave discovery.
                log.error("engine of %s is not running; deregistering", self.worker_id)
                if self._registration is not None:
                    await self._registration.close()
                    self._registration = None
                return
            try:
                await self.runtime.publish(LOAD_TOPIC, self.load_report())
            except Exception:
                log.exception("load report of %s failed", self.worker_id)
            # Every interval, and soon after a request's prefill ends or it finishes: a
            # router reading a report from before that sees load that is gone.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._load_changed.wait(), self._load_interval)
            self._load_changed.clear()
            await asyncio.sleep(min(MIN_LOAD_GAP_S, self._load_interval))

    async def drain(self, grace_s: float) -> bool:
        """Graceful shutdown, first half: take no new work and wait up to `grace_s` for the
        requests in flight to finish. True if they all did; what is left when `close()`
        follows is migrated by the frontend. Overrides a role change under way (its drain
        then never ends: the worker is leaving)."""
        self._begin_drain("the worker is shutting down")
        with contextlib.suppress(Exception):  # the bus may be down; the refusals still work
            await self.runtime.publish(LOAD_TOPIC, self.load_report())
        if await self._wait_idle(grace_s):
            return True
        log.warning(
            "worker %s: %d request(s) still running after %.1fs; leaving them to migrate",
            self.worker_id, self._in_flight, grace_s,
        )  # fmt: skip
        return False

    def _begin_drain(self, reason: str) -> None:
        """Refuse new work for `reason` (a role change or a shutdown: one mechanism). The
        refusals are `unavailable` before any output, which the frontend retries on another
        worker; the next load report (sent early) says `draining`, so routers stop choosing
        this worker (a role change's drain ends with the new incarnation, or with a
        `serving` report if it fails)."""
        self._drain_reason = reason
        self._load_changed.set()

    async def _wait_idle(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the requests in flight to finish; True if they did."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _undrain(self, reason: str) -> None:
        """End the drain for `reason` (not one that replaced it, such as a shutdown)."""
        if self._drain_reason == reason:
            self._drain_reason = None
            self._load_changed.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._kv_events is not None:
            self._kv_events.unbind()
        if self._data_server is not None:
            await self._data_server.close()
            self._data_server = None
        if self._local_plane is not None and self.data_address:
            self._local_plane.unregister(self.data_address)
        if self._registration is not None:
            await self._registration.close()
            self._registration = None
