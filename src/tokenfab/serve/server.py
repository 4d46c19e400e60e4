"""HTTP serving of a deployment: `serve` (what `tokenfab serve` runs: a `ServingStack` behind
uvicorn), `run_frontend` (`tokenfab frontend`, for workers on a shared runtime) and
`ServerThread`, the same stack on a background thread and a free loopback port (tests and
benchmarks use it to get a real server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from tokenfab.config import EngineConfig, ServerConfig
from tokenfab.frontend.workers import WorkerPool
from tokenfab.runtime import Runtime
from tokenfab.serve.stack import ServingStack, build_remote_frontend

log = logging.getLogger("tokenfab.serve")


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
        engine_overrides: dict[str, EngineConfig] | None = None,
    ) -> None:
        self.engine_config = engine
        self.engine_overrides = engine_overrides
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
        stack = ServingStack(self.engine_config, sc, self.log_level, self.engine_overrides)
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
