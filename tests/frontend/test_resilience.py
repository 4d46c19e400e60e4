"""Chaos with real engine processes on loopback, under 16 concurrent greedy streams: a worker
stopped with SIGSTOP (a hang), a worker whose logits turn to NaN, a worker whose logits turn
silently wrong (caught by the canary), a SIGTERM drain, and the NATS server killed. Every
stream must finish with the tokens of an undisturbed run. Bounded: each run joins its client
threads with a timeout and every wait below has a deadline."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from waiting import wait_until

from tokenfab.config import EngineConfig, ServerConfig
from tokenfab.serve.server import ServerThread

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STREAMS = 16
MAX_TOKENS = 160


def _engine(model: Path, **kw: object) -> EngineConfig:
    return EngineConfig(model=str(model), num_kv_blocks=512, max_model_len=256, num_threads=1, **kw)  # type: ignore[arg-type]


def _server(model: Path, overrides: dict[str, EngineConfig] | None = None, **kw: object):
    config = ServerConfig(
        port=0, workers=2, engine_processes=True, router_policy="round_robin", **kw
    )  # type: ignore[arg-type]
    srv = ServerThread(_engine(model), config, engine_overrides=overrides)
    return srv, srv.start()


class Run:
    """16 greedy streams with per-token logprobs; `results[i]` = (token ids, logprobs)."""

    def __init__(self, url: str, max_tokens: int = MAX_TOKENS) -> None:
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id
        self.max_tokens = max_tokens
        self.results: list[tuple[list[str], list[float]] | BaseException] = [
            ([], []) for _ in range(STREAMS)
        ]
        self.started = [threading.Event() for _ in range(STREAMS)]
        self.threads = [threading.Thread(target=self._one, args=(i,)) for i in range(STREAMS)]

    def _one(self, i: int) -> None:
        try:
            chunks = self.client.completions.create(
                model=self.model, prompt=f"story number {i}: once upon a time",
                max_tokens=self.max_tokens, temperature=0, stream=True, logprobs=0,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
            )  # fmt: skip
            tokens: list[str] = []
            lps: list[float] = []
            for chunk in chunks:
                lp = chunk.choices[0].logprobs if chunk.choices else None
                if lp and lp.tokens:
                    tokens.extend(lp.tokens)
                    lps.extend(x if x is not None else 0.0 for x in lp.token_logprobs or [])
                    self.started[i].set()
            self.results[i] = (tokens, lps)
        except BaseException as e:  # recorded: the tests assert there are none
            self.results[i] = e

    def __call__(self, fault: Callable[[], None] | None = None) -> list[list[str]]:
        for t in self.threads:
            t.start()
        if fault is not None:
            assert all(e.wait(60) for e in self.started)  # every stream is mid-generation
            fault()
        for t in self.threads:
            t.join(180)
        errors = [r for r in self.results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        done = [r for r in self.results if not isinstance(r, BaseException)]
        assert all(math.isfinite(x) for _, lps in done for x in lps)  # no NaN reached a client
        return [tokens for tokens, _ in done]


def _metric(url: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.split()[-1])
    return total


@pytest.fixture(scope="module")
def baseline(tiny_llama: Path) -> list[list[str]]:
    """The undisturbed greedy tokens of the 16 streams."""
    srv, url = _server(tiny_llama)
    try:
        tokens = Run(url)()
        assert all(len(t) == MAX_TOKENS for t in tokens)
        return tokens
    finally:
        srv.stop()


def test_sigstop_hang_is_detected_its_streams_finish_elsewhere_and_sigcont_rejoins(
    tiny_llama: Path, baseline: list[list[str]]
) -> None:
    srv, url = _server(tiny_llama)
    try:
        assert srv.stack is not None and srv.stack.processes is not None and srv.stack.pool
        pool, victim = srv.stack.pool, srv.stack.processes.pid_of("worker-0")
        stopped: list[float] = []

        def stop() -> None:
            stopped.append(time.monotonic())
            os.kill(victim, signal.SIGSTOP)

        try:
            assert Run(url)(stop) == baseline
        finally:
            os.kill(victim, signal.SIGCONT)
        found = [t for t, w, _ in pool.incidents if w == "worker-0" and t >= stopped[0]]
        assert found  # drained as hung (or dropped when its lease ran out)
        print(f"SIGSTOP detected after {found[0] - stopped[0]:.2f}s: {pool.incidents}")
        assert _metric(url, "tokenfab_request_migrations_total") >= 1
        # Resumed, it serves again: round-robin sends it new requests that succeed.
        assert wait_until(lambda: bool(pool.health.routable(["worker-0"])), 30)
        before = _metric(url, "tokenfab_router_decisions_total", worker="worker-0")
        assert Run(url, max_tokens=8)() == [t[:8] for t in baseline]
        assert _metric(url, "tokenfab_router_decisions_total", worker="worker-0") > before
    finally:
        srv.stop()


def test_nan_logits_quarantine_the_worker_and_no_nan_reaches_a_client(
    tiny_llama: Path, baseline: list[list[str]]
) -> None:
    """worker-1's runner turns its logits to NaN after 40 steps (mid-stream): its engine
    throws the step away and quarantines itself, its streams continue on worker-0."""
    poisoned = _engine(tiny_llama, fault="nan", fault_after_steps=40)
    srv, url = _server(tiny_llama, {"worker-1": poisoned})
    try:
        assert srv.stack is not None and srv.stack.pool is not None
        pool = srv.stack.pool
        assert Run(url)() == baseline
        assert wait_until(lambda: pool.health.drained("worker-1") is not None, 10)
        drain = pool.health.drained("worker-1")
        assert drain is not None and drain.reason == "quarantined" and "NaN" in drain.detail
        assert _metric(url, "tokenfab_request_migrations_total") >= 1
        assert pool.health.routable(["worker-0", "worker-1"]) == ["worker-0"]
        assert _metric(url, "tokenfab_worker_drains_total", reason="quarantined") == 1
        assert Run(url, max_tokens=8)() == [t[:8] for t in baseline]  # served by worker-0
    finally:
        srv.stop()


def test_canary_catches_silently_wrong_logits(tiny_llama: Path) -> None:
    """worker-1's logits are negated after 30 steps (no NaN: plausible, wrong tokens). Both
    workers answer the canary right at first, so the right answer is known; worker-1's next
    canary answer differs and it is quarantined."""
    flipped = _engine(tiny_llama, fault="flip", fault_after_steps=30)
    srv, url = _server(tiny_llama, {"worker-1": flipped}, canary_interval_s=1.0)
    try:
        assert srv.stack is not None and srv.stack.pool is not None
        pool = srv.stack.pool
        Run(url, max_tokens=8)()  # ~30 steps of load: worker-1 goes bad
        assert wait_until(lambda: pool.health.drained("worker-1") is not None, 30)
        drain = pool.health.drained("worker-1")
        assert drain is not None and drain.reason == "canary"
        assert pool.health.drained("worker-0") is None
        assert pool.health.routable(["worker-0", "worker-1"]) == ["worker-0"]
    finally:
        srv.stop()


def test_sigterm_drain_finishes_in_flight_streams_and_loses_nothing(
    tiny_llama: Path, baseline: list[list[str]]
) -> None:
    srv, url = _server(tiny_llama, drain_grace_s=60.0)
    try:
        assert srv.stack is not None and srv.stack.processes is not None and srv.stack.pool
        pool, victim = srv.stack.pool, srv.stack.processes.pid_of("worker-0")
        assert Run(url)(lambda: os.kill(victim, signal.SIGTERM)) == baseline
        reasons = [r for _, w, r in pool.incidents if w == "worker-0"]
        assert reasons and reasons[0] == "draining"  # it said so before it left
        # Its streams finished where they were (a grace of 60 s is ample): none migrated.
        assert _metric(url, "tokenfab_request_migrations_total") == 0
    finally:
        srv.stop()


def test_nats_server_killed_and_restarted_loses_no_request(
    tiny_llama: Path, baseline: list[list[str]]
) -> None:
    srv, url = _server(tiny_llama)
    try:
        assert srv.stack is not None and srv.stack.processes is not None
        nats = srv.stack.processes.nats
        assert nats is not None and nats.pid is not None
        pid = nats.pid
        assert Run(url)(lambda: os.kill(pid, signal.SIGKILL)) == baseline
        assert nats.pid is not None and nats.pid != pid  # it was restarted
        assert Run(url, max_tokens=8)() == [t[:8] for t in baseline]  # and serves
    finally:
        srv.stop()


def test_a_hot_spare_stays_idle_then_takes_over_a_killed_worker(
    tiny_llama: Path, baseline: list[list[str]]
) -> None:
    """2 serving workers and 1 spare: the spare gets no request until a serving worker is
    killed mid-stream; then it serves (its streams and the next ones), and nothing is lost."""
    srv, url = _server(tiny_llama, spares=1)
    try:
        assert srv.stack is not None and srv.stack.processes is not None and srv.stack.pool
        pool, processes = srv.stack.pool, srv.stack.processes
        ids = ["worker-0", "worker-1", "worker-2"]
        assert sorted(processes.pids()) == ids
        assert wait_until(lambda: len(pool.workers) == 3, 30)
        serving = pool.health.routable(ids)
        assert len(serving) == 2
        (spare,) = set(ids) - set(serving)  # whichever registered last
        assert Run(url, max_tokens=8)() == [t[:8] for t in baseline]
        assert _metric(url, "tokenfab_router_decisions_total", worker=spare) == 0
        victim = processes.pid_of(serving[0])
        assert Run(url)(lambda: os.kill(victim, signal.SIGKILL)) == baseline
        assert pool.health.routable([spare]) == [spare]  # promoted
        assert Run(url, max_tokens=8)() == [t[:8] for t in baseline]
        assert _metric(url, "tokenfab_router_decisions_total", worker=spare) > 0
    finally:
        srv.stop()
