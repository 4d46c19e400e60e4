"""`tokenfab serve` in one process: N engines, each behind an aggregated worker, and the HTTP
frontend, all on the local runtime; plus `ServerThread`, the same stack on a background thread
(tests and benchmarks use it to get a real server on a loopback port).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import threading
from typing import Any

import uvicorn

from tokenfab.config import EngineConfig, ServerConfig
from tokenfab.frontend.app import FrontendState, build_app
from tokenfab.frontend.workers import WorkerPool
from tokenfab.runtime import Runtime
from tokenfab.worker import AggregatedWorker, KVEventForwarder

log = logging.getLogger("tokenfab.serve")


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
        from tokenfab.engine.engine import AsyncEngine
        from tokenfab.engine.loader import load_model

        cfg = self.engine_config
        # One copy of the weights serves every engine of this process (they are read-only).
        loaded = await asyncio.to_thread(load_model, cfg.model, cfg.dtype, cfg.device)
        for i in range(self.server_config.workers):
            sink = KVEventForwarder()
            engine = AsyncEngine(dataclasses.replace(cfg), event_sink=sink, loaded=loaded)
            await engine.start()
            self.engines.append(engine)
            worker = AggregatedWorker(engine, self.runtime, sink, worker_id=f"worker-{i}")
            await worker.start()
            self.workers.append(worker)
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
        for worker in self.workers:
            await worker.close()
        for engine in self.engines:
            await engine.shutdown()
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
