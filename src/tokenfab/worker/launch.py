"""Starting engines behind workers: in this process (`start_engines`), or as the body of a
worker process on a shared runtime (`run_worker`, behind `tokenfab worker` and the engine
processes `tokenfab serve` starts)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
from typing import Any

from tokenfab.config import DataPlaneConfig, EngineConfig
from tokenfab.kv.transfer import LocalDataPlane
from tokenfab.protocol import WorkerRole
from tokenfab.runtime import Runtime
from tokenfab.worker.aggregated import AggregatedWorker
from tokenfab.worker.kv_events import KVEventForwarder

log = logging.getLogger("tokenfab.worker")


async def start_engines(
    runtime: Runtime,
    engine: EngineConfig,
    count: int,
    id_prefix: str = "worker",
    roles: list[WorkerRole] | None = None,
    data_plane: LocalDataPlane | None = None,
    data: DataPlaneConfig | None = None,
) -> tuple[list[Any], list[AggregatedWorker]]:
    """Load the model once and start `count` engines, each behind a worker in its role
    (`roles[i]`, default aggregated); with `data_plane`, KV moves between them are copies."""
    from tokenfab.engine.engine import AsyncEngine
    from tokenfab.engine.model.loader import load_model
    from tokenfab.engine.threads import in_fresh_thread

    # One copy of the weights serves every engine of this process (they are read-only).
    loaded = await in_fresh_thread(load_model, engine.model, engine.dtype, engine.device)
    engines, workers = [], []
    try:
        for i in range(count):
            sink = KVEventForwarder()
            worker_id = f"{id_prefix}-{i}" if count > 1 or id_prefix == "worker" else id_prefix
            eng = AsyncEngine(engine.for_worker(worker_id, count), event_sink=sink, loaded=loaded)
            await eng.start()
            engines.append(eng)
            role: WorkerRole = roles[i] if roles else "aggregated"
            worker = AggregatedWorker(
                eng,
                runtime,
                sink,
                worker_id=worker_id,
                role=role,
                data_plane=data_plane,
                data=(data or DataPlaneConfig()).for_engine(i),
            )
            await worker.start()
            workers.append(worker)
    except BaseException:
        await stop_engines(engines, workers)
        raise
    return engines, workers


async def stop_engines(engines: list[Any], workers: list[AggregatedWorker]) -> None:
    for worker in workers:
        await worker.close()
    for engine in engines:
        await engine.shutdown()


async def until_signalled(parent_pid: int | None = None) -> None:
    """Return on SIGINT/SIGTERM, or once `parent_pid` is no longer our parent (the process
    that started us died: an orphaned engine must not keep its cores and memory)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
            return
        if parent_pid is not None and os.getppid() != parent_pid:
            log.warning("parent process %d is gone; stopping", parent_pid)
            return


def default_worker_prefix() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())
    return f"worker-{host}-{os.getpid()}"


async def run_worker(
    engine: EngineConfig,
    runtime_url: str,
    namespace: str = "default",
    worker_id: str | None = None,
    count: int = 1,
    parent_pid: int | None = None,
    role: WorkerRole = "aggregated",
    drain_grace_s: float = 10.0,
    data: DataPlaneConfig | None = None,
) -> None:
    """Engines registered on a shared runtime, until SIGINT/SIGTERM (or the parent's death).
    Then a graceful drain: no new work, up to `drain_grace_s` for the requests in flight to
    finish; the frontend migrates whatever is left when the workers leave."""
    runtime = await Runtime.connect(runtime_url, namespace)
    engines: list[Any] = []
    workers: list[AggregatedWorker] = []
    try:
        engines, workers = await start_engines(
            runtime,
            engine,
            count,
            worker_id or default_worker_prefix(),
            roles=[role] * count,
            data=data,
        )
        ids = ", ".join(w.worker_id for w in workers)
        log.info("worker(s) %s serving %s on %s", ids, engines[0].model_name, runtime_url)
        await until_signalled(parent_pid)
        if drain_grace_s > 0:
            await asyncio.gather(*(w.drain(drain_grace_s) for w in workers))
    finally:
        await stop_engines(engines, workers)
        await runtime.close()
