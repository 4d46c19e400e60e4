"""`tokenfab serve` in one process: N engines, each behind an aggregated worker, and the HTTP
frontend, all on the local runtime; plus `ServerThread`, the same stack on a background thread
(tests and benchmarks use it to get a real server on a loopback port).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import uvicorn

from tokenfab.config import EngineConfig, ServerConfig
from tokenfab.frontend.app import FrontendState, build_app
from tokenfab.frontend.workers import WorkerPool
from tokenfab.runtime import Runtime
from tokenfab.worker import AggregatedWorker, KVEventForwarder

log = logging.getLogger("tokenfab.serve")


async def start_workers(
    runtime: Runtime, engine: EngineConfig, count: int, id_prefix: str = "worker"
) -> tuple[list[Any], list[AggregatedWorker]]:
    """Load the model once and start `count` engines, each behind an aggregated worker."""
    from tokenfab.engine.engine import AsyncEngine
    from tokenfab.engine.loader import load_model

    # One copy of the weights serves every engine of this process (they are read-only).
    loaded = await asyncio.to_thread(load_model, engine.model, engine.dtype, engine.device)
    engines, workers = [], []
    for i in range(count):
        sink = KVEventForwarder()
        eng = AsyncEngine(dataclasses.replace(engine), event_sink=sink, loaded=loaded)
        await eng.start()
        engines.append(eng)
        worker_id = f"{id_prefix}-{i}" if count > 1 or id_prefix == "worker" else id_prefix
        worker = AggregatedWorker(eng, runtime, sink, worker_id=worker_id)
        await worker.start()
        workers.append(worker)
    return engines, workers


async def stop_workers(engines: list[Any], workers: list[AggregatedWorker]) -> None:
    for worker in workers:
        await worker.close()
    for engine in engines:
        await engine.shutdown()


class ServingStack:
    """Runtime + engines + workers + frontend app, started and stopped together."""

    def __init__(self, engine: EngineConfig, server: ServerConfig) -> None:
        if server.workers < 1:
            raise ValueError(f"workers must be at least 1 (got {server.workers})")
        self.engine_config = engine
        self.server_config = server
        self.runtime = Runtime.local()
        self.engines: list[Any] = []
        self.workers: list[AggregatedWorker] = []
        self.pool = WorkerPool(self.runtime)
        self.app: Any = None

    async def start(self) -> None:
        self.engines, self.workers = await start_workers(
            self.runtime, self.engine_config, self.server_config.workers
        )
        await self.pool.start()
        first = self.engines[0]
        self.app = build_app(
            FrontendState(
                pool=self.pool,
                tokenizer=first.tokenizer,
                model_name=self.server_config.served_model_name or first.model_name,
                max_model_len=first.max_model_len,
                api_key=self.server_config.api_key,
                max_body_bytes=self.server_config.max_body_bytes,
            )
        )

    async def stop(self) -> None:
        await self.pool.close()
        await stop_workers(self.engines, self.workers)
        await self.runtime.close()

    def describe(self) -> str:
        first = self.engines[0]
        stats = first.stats()
        return (
            f"model {self.app.state.tokenfab.model_name} ({first.engine.loaded.path}), "
            f"{len(self.engines)} worker(s), max_model_len {first.max_model_len}, "
            f"{stats.kv_blocks_total} KV blocks of {self.engine_config.block_size} tokens each"
        )


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _uvicorn(app: Any, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=3,
        timeout_keep_alive=30,
        lifespan="off",
    )
    return uvicorn.Server(config)


async def serve(engine: EngineConfig, server: ServerConfig, log_level: str = "info") -> None:
    """Run until interrupted (Ctrl-C / SIGTERM)."""
    sock = bind_socket(server.host, server.port)  # fail fast on a busy port, before loading
    stack = ServingStack(engine, server)
    try:
        await stack.start()
        log.info("tokenfab serving %s", stack.describe())
        log.info("OpenAI API at %s/v1 (try GET %s/v1/models)", url_of(sock), url_of(sock))
        await _uvicorn(stack.app, log_level).serve(sockets=[sock])
    finally:
        await stack.stop()
        sock.close()


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_worker(
    engine: EngineConfig,
    runtime_url: str,
    namespace: str = "default",
    worker_id: str | None = None,
    count: int = 1,
) -> None:
    """`tokenfab worker`: engines registered on a shared runtime, until SIGINT/SIGTERM."""
    runtime = await Runtime.connect(runtime_url, namespace)
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())
    prefix = worker_id or f"worker-{host}-{os.getpid()}"
    engines: list[Any] = []
    workers: list[AggregatedWorker] = []
    try:
        engines, workers = await start_workers(runtime, engine, count, prefix)
        ids = ", ".join(w.worker_id for w in workers)
        log.info("worker(s) %s serving %s on %s", ids, engines[0].model_name, runtime_url)
        await _until_signalled()
    finally:
        await stop_workers(engines, workers)
        await runtime.close()


async def build_remote_frontend(
    runtime: Runtime, server: ServerConfig, tokenizer: str | None, wait_s: float
) -> tuple[Any, WorkerPool]:
    """A frontend for workers found on a shared runtime: model name, context length and
    tokenizer come from the first worker's metadata (or `tokenizer`, a local folder)."""
    from transformers import AutoTokenizer

    pool = WorkerPool(runtime)
    await pool.start()
    if not pool.workers:
        log.info("waiting up to %.0fs for a worker to register...", wait_s)
    await pool.wait_for_workers(1, timeout=wait_s)
    meta = pool.workers[0].metadata
    path = tokenizer or str(meta.get("model_path") or "")
    if not path:
        raise RuntimeError("the worker did not say where its model is: pass --tokenizer")
    tok = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
    app = build_app(
        FrontendState(
            pool=pool,
            tokenizer=tok,
            model_name=server.served_model_name or str(meta.get("model") or Path(path).name),
            max_model_len=int(meta.get("max_model_len") or 2048),
            api_key=server.api_key,
            max_body_bytes=server.max_body_bytes,
        )
    )
    return app, pool


async def run_frontend(
    server: ServerConfig,
    runtime_url: str,
    namespace: str = "default",
    tokenizer: str | None = None,
    wait_s: float = 300.0,
    log_level: str = "info",
) -> None:
    """`tokenfab frontend`: the HTTP API in front of workers on a shared runtime."""
    sock = bind_socket(server.host, server.port)
    runtime = await Runtime.connect(runtime_url, namespace)
    pool: WorkerPool | None = None
    try:
        app, pool = await build_remote_frontend(runtime, server, tokenizer, wait_s)
        n = len(pool.workers)
        log.info(
            "tokenfab frontend for %s: %d worker(s) on %s",
            app.state.tokenfab.model_name,
            n,
            runtime_url,
        )
        log.info("OpenAI API at %s/v1 (try GET %s/v1/models)", url_of(sock), url_of(sock))
        await _uvicorn(app, log_level).serve(sockets=[sock])
    finally:
        if pool is not None:
            await pool.close()
        await runtime.close()
        sock.close()


class ServerThread:
    """The whole stack on a background thread with its own event loop, on a free loopback port
    by default. `with ServerThread(engine_cfg) as url: ...`."""

    def __init__(
        self,
        engine: EngineConfig,
        server: ServerConfig | None = None,
        log_level: str = "warning",
    ) -> None:
        self.engine_config = engine
        self.server_config = server or ServerConfig(port=0)
        self.log_level = log_level
        self.url = ""
        self.stack: ServingStack | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 300.0) -> str:
        self._thread = threading.Thread(target=self._main, name="tokenfab-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"server did not start within {timeout}s")
        if self._error is not None:
            raise RuntimeError(f"server failed to start: {self._error}") from self._error
        return self.url

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        sc = self.server_config
        sock = bind_socket(sc.host, sc.port)
        self.url = url_of(sock)
        stack = ServingStack(self.engine_config, sc)
        try:
            await stack.start()
            self.stack = stack
            self._server = _uvicorn(stack.app, self.log_level)
            serving = asyncio.ensure_future(self._server.serve(sockets=[sock]))
            while not self._server.started and not serving.done():
                await asyncio.sleep(0.01)
            self._ready.set()
            await serving
        except BaseException as e:
            self._error = e
            raise
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                await stack.stop()
            sock.close()

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's loop (e.g. to inspect engines) and return its value."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
