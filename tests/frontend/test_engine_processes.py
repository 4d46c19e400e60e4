"""`tokenfab serve`'s default shape: each engine in its own process on a private runtime,
supervised (a crashed engine is restarted and its requests fail fast), and nothing left behind
when the server stops."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import openai
import pytest
from waiting import wait_until

from tokenfab.config import EngineConfig, ServerConfig
from tokenfab.serve.processes import cpu_sets
from tokenfab.serve.server import ServerThread

pytestmark = pytest.mark.integration


def test_cpu_sets_split_cores_between_engines() -> None:
    assert cpu_sets(1, [0, 1]) == [None]
    assert cpu_sets(2, [0, 1]) == [[0], [1]]
    assert cpu_sets(2, [0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert cpu_sets(3, [4, 5]) == [[4], [5], [4]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def _worker_ids(url: str) -> set[str]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        line.split('worker="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("tokenfab_kv_blocks_total{")
    }


def test_crashed_engine_is_restarted_and_service_continues(tiny_llama: Path) -> None:
    engine = EngineConfig(model=str(tiny_llama), num_kv_blocks=256, max_model_len=256)
    srv = ServerThread(engine, ServerConfig(port=0, workers=2, engine_processes=True))
    url = srv.start()
    try:
        assert srv.stack is not None and srv.stack.processes is not None
        processes = srv.stack.processes
        pids = processes.pids()
        nats_pid = processes.nats._proc.pid  # type: ignore[union-attr]
        assert set(pids) == {"worker-0", "worker-1"} == _worker_ids(url)
        assert all(_alive(p) for p in [*pids.values(), nats_pid])
        assert os.getpid() not in pids.values()

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id

        def complete() -> int:
            out = client.completions.create(model=model, prompt="hello", max_tokens=5, seed=1)
            return out.usage.completion_tokens if out.usage else 0

        os.kill(pids["worker-0"], signal.SIGKILL)
        # the supervisor notices at once and the pool stops choosing the dead engine
        assert wait_until(lambda: _worker_ids(url) == {"worker-1"}, 30)
        assert [complete() for _ in range(4)] == [5] * 4
        # ... and the engine comes back under its id, in a new process
        assert wait_until(lambda: _worker_ids(url) == {"worker-0", "worker-1"}, 120)
        assert processes.pids()["worker-0"] != pids["worker-0"]
        assert [complete() for _ in range(4)] == [5] * 4
        children = [*processes.pids().values(), nats_pid]
    finally:
        srv.stop()
    assert wait_until(lambda: not any(_alive(p) for p in children), 30), "children left behind"


def test_engine_that_cannot_start_fails_startup_with_its_exit_code(tmp_path: Path) -> None:
    engine = EngineConfig(model=str(tmp_path / "no-such-model"))
    srv = ServerThread(engine, ServerConfig(port=0, engine_processes=True))
    with pytest.raises(RuntimeError, match="exited with code 1"):
        srv.start(timeout=120)
    srv.stop()


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(") ", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_command_stops_cleanly_on_signal(tiny_llama: Path, tmp_path: Path, sig) -> None:  # type: ignore[no-untyped-def]
    """The real CLI: a signal stops serving, then the engines, then the nats-server; the
    process exits 0 and leaves no child behind (uvicorn's own handling would re-raise the
    signal first and kill the engines' runtime under them)."""
    import subprocess
    import sys

    from tokenfab.runtime.nats_server import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [str(Path(sys.executable).with_name("tokenfab")), "serve", "--model", str(tiny_llama)]
    cmd += ["--port", str(port), "--kv-blocks", "128", "--max-model-len", "256"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(healthy, 120), log.read_text()[-2000:]
        body = {"model": tiny_llama.name, "prompt": "hi", "max_tokens": 3}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        children = _children_of(proc.pid)
        assert len(children) == 2  # one engine process and the nats-server
        proc.send_signal(sig)
        assert proc.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_until(lambda: not any(_alive(p) for p in children), 30)
    text = log.read_text()
    assert "Traceback" not in text and "unexpected EOF" not in text, text[-2000:]


def test_request_moves_to_another_worker_when_its_worker_is_gone(tiny_llama: Path) -> None:
    """A worker that reports itself gone (`unavailable`) before the first token has shown the
    client nothing, so the frontend sends the request to another worker: no request fails."""
    import msgspec

    from tokenfab.protocol import WORKER_COMPONENT, GenerateRequest, WorkerInfo
    from tokenfab.runtime import RemoteError

    engine = EngineConfig(model=str(tiny_llama), num_kv_blocks=256, max_model_len=256)
    config = ServerConfig(port=0, engine_processes=False, router_policy="round_robin")
    srv = ServerThread(engine, config)
    url = srv.start()
    calls = []
    try:
        stack = srv.stack
        assert stack is not None and stack.runtime is not None and stack.pool is not None

        async def add_vanishing_worker():  # type: ignore[no-untyped-def]
            reg = await stack.runtime.register(  # type: ignore[union-attr]
                WORKER_COMPONENT,
                "aaa-vanishing",
                endpoints=["generate"],
                metadata=msgspec.to_builtins(
                    WorkerInfo(model="tiny", max_model_len=256, block_size=16)
                ),
            )

            async def generate(req, ctx):  # type: ignore[no-untyped-def]
                calls.append(req.request_id)
                raise RemoteError("unavailable", "engine process exited with code -9")
                yield  # an async generator, like every handler

            await reg.serve("generate", GenerateRequest, generate)
            return reg

        reg = srv.call(add_vanishing_worker())
        assert wait_until(lambda: len(stack.pool.workers) == 2, 30)  # type: ignore[union-attr]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        for _ in range(6):
            out = client.completions.create(model=model, prompt="hello", max_tokens=4)
            assert out.usage is not None and out.usage.completion_tokens == 4
        assert len(calls) >= 2  # round-robin sent some requests to it first
        srv.call(reg.close())
    finally:
        srv.stop()


def test_service_recovers_when_its_nats_server_dies(tiny_llama: Path) -> None:
    engine = EngineConfig(model=str(tiny_llama), num_kv_blocks=128, max_model_len=256)
    srv = ServerThread(engine, ServerConfig(port=0, engine_processes=True))
    url = srv.start()
    try:
        assert srv.stack is not None and srv.stack.processes is not None
        nats = srv.stack.processes.nats
        assert nats is not None and nats._proc is not None
        old_pid = nats._proc.pid
        os.kill(old_pid, signal.SIGKILL)
        body = {"model": tiny_llama.name, "prompt": "hi", "max_tokens": 3}

        def answers() -> bool:
            try:
                r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3

        assert wait_until(answers, 60)
        assert nats._proc.pid != old_pid and nats.running()
    finally:
        srv.stop()
