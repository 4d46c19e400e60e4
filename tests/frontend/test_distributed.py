"""The distributed shape: `tokenfab worker` and `tokenfab frontend` as separate processes that
find each other over a real NATS server; the openai client talks to the frontend."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tokenfab.runtime.nats_server import NatsServer, free_port, nats_server_binary

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(nats_server_binary() is None, reason="nats-server not installed"),
]

TOKENFAB = str(Path(sys.executable).with_name("tokenfab"))


def _wait_health(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"frontend exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"frontend not healthy: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    logs = tmp_path_factory.mktemp("cluster")
    procs: list[subprocess.Popen] = []
    with NatsServer() as nats:
        try:
            common = ["--runtime", nats.url, "--namespace", "t1"]
            wlog = logs / "worker.log"
            with open(wlog, "wb") as out:
                worker = subprocess.Popen(
                    [TOKENFAB, "worker", *common, "--model", str(tiny_llama), "--worker-id", "w-a",
                     "--kv-blocks", "128", "--max-model-len", "256"],
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            procs.append(worker)
            port = free_port()
            flog = logs / "frontend.log"
            with open(flog, "wb") as out:
                frontend = subprocess.Popen(
                    [TOKENFAB, "frontend", *common, "--port", str(port), "--wait", "120"],
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            procs.append(frontend)
            url = f"http://127.0.0.1:{port}"
            _wait_health(url, frontend, flog)
            yield {"url": url, "worker": worker, "model": tiny_llama.name}
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()


def test_openai_client_through_frontend_nats_and_worker(cluster: dict) -> None:
    client = openai.OpenAI(base_url=f"{cluster['url']}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == [cluster["model"]]
    r = client.chat.completions.create(
        model=cluster["model"],
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 5
    chunks = list(
        client.completions.create(
            model=cluster["model"], prompt="Hello", max_tokens=4, stream=True,
            extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert chunks[-1].choices[0].finish_reason == "length"
    metrics = httpx.get(f"{cluster['url']}/metrics", timeout=10).text
    assert 'tokenfab_kv_blocks_total{worker="w-a"} 128.0' in metrics


def test_frontend_notices_the_worker_leaving(cluster: dict) -> None:
    body = {"prompt": "Hi", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=cluster["url"], timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        cluster["worker"].send_signal(signal.SIGINT)  # the worker leaves mid-stream
        rest = [line for line in lines if line]
    # it drains first (no new work, up to 10 s for what it runs): the open stream finishes
    # (the only worker, so there is nowhere to migrate to) and then it leaves
    assert rest[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in rest[-2]
    cluster["worker"].wait(30)
    deadline = time.monotonic() + 20
    status = 200
    while status == 200 and time.monotonic() < deadline:
        status = httpx.get(f"{cluster['url']}/health", timeout=5).status_code
        time.sleep(0.1)
    assert status == 503
    r = httpx.post(
        f"{cluster['url']}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == 503
