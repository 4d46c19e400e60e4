"""The KV-aware router end to end: two `tokenfab worker` processes and a `tokenfab frontend`
on a real NATS server. A repeated long prefix goes to the worker that cached it (the router
learns that from the worker's KV events), and a worker killed with SIGKILL leaves the pool
within 3 s while the survivor keeps serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenfab.runtime.nats_server import NatsServer, free_port, nats_server_binary

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(nats_server_binary() is None, reason="nats-server not installed"),
]

TOKENFAB = str(Path(sys.executable).with_name("tokenfab"))
WORKERS = ("w-a", "w-b")


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _per_worker(m: dict, name: str) -> dict[str, float]:
    return {dict(k[1])["worker"]: v for k, v in m.items() if k[0] == name}


def _until(check, timeout: float, step: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    return None


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    logs = tmp_path_factory.mktemp("router")
    procs: dict[str, subprocess.Popen] = {}
    with NatsServer() as nats:
        try:
            common = ["--runtime", nats.url, "--namespace", "rt"]
            for wid in WORKERS:
                with open(logs / f"{wid}.log", "wb") as out:
                    procs[wid] = subprocess.Popen(
                        [TOKENFAB, "worker", *common, "--model", str(tiny_llama), "--worker-id",
                         wid, "--kv-blocks", "256", "--max-model-len", "512", "--num-threads", "1"],
                        stdout=out, stderr=subprocess.STDOUT,
                    )  # fmt: skip
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with open(logs / "frontend.log", "wb") as out:
                procs["frontend"] = subprocess.Popen(
                    [TOKENFAB, "frontend", *common, "--port", str(port), "--wait", "120",
                     "--router", "kv"],
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip

            def both_up() -> bool:
                try:
                    r = httpx.get(f"{url}/health", timeout=2)
                    return r.status_code == 200 and r.json()["workers"] == 2
                except httpx.HTTPError:
                    return False

            if not _until(both_up, 120, 0.3):
                raise RuntimeError((logs / "frontend.log").read_text()[-3000:])
            yield {"url": url, "procs": procs, "model": tiny_llama.name}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in procs.values():
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()


def test_repeated_prefix_goes_to_the_worker_that_cached_it(cluster: dict) -> None:
    url = cluster["url"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    prefix = [(7 * i) % 200 + 20 for i in range(320)]  # 20 blocks of 16 tokens

    def ask(suffix: list[int]) -> None:
        out = client.completions.create(
            model=cluster["model"], prompt=prefix + suffix, max_tokens=2, temperature=0
        )
        assert out.usage is not None and out.usage.completion_tokens == 2

    ask([1, 2, 3])
    # The worker that served it publishes the prefix's blocks; the router indexes them.
    indexed = _until(
        lambda: {w: n for w, n in _per_worker(_metrics(url), "tokenfab_router_index_blocks").items()
                 if n >= 20},
        10,
    )  # fmt: skip
    assert indexed and len(indexed) == 1, indexed
    (holder,) = indexed
    # The holder's load report from after the request ended (sent within ~50 ms of it) must
    # reach the router too: an older one still counts the request's blocks as active.
    time.sleep(0.3)
    before = _metrics(url)
    for i in range(4):
        ask([50 + i, 60 + i, 70 + i])
    after = _metrics(url)
    moved = {
        w: after.get(("tokenfab_router_decisions_total", (("worker", w),)), 0)
        - before.get(("tokenfab_router_decisions_total", (("worker", w),)), 0)
        for w in WORKERS
    }
    assert moved[holder] == 4, (
        moved,
        {
            k: v
            for k, v in after.items()
            if "router" in k[0] or "kv_blocks" in k[0] or "waiting" in k[0] or "running" in k[0]
        },
    )
    # The engine confirms it: each of the 4 prompts found the 20 shared blocks cached.
    hit = ("tokenfab_router_prefix_hit_tokens_total", (("kind", "actual"),))
    assert after[hit] - before[hit] >= 4 * 20 * 16
    predicted = ("tokenfab_router_prefix_hit_tokens_total", (("kind", "predicted"),))
    assert after[predicted] - before[predicted] >= 4 * 20 * 16


def test_killed_worker_leaves_within_3s_and_the_survivor_serves(cluster: dict) -> None:
    url = cluster["url"]
    victim = cluster["procs"]["w-a"]
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    gone = _until(lambda: httpx.get(f"{url}/health", timeout=2).json()["workers"] == 1, 10, 0.05)
    assert gone, "the killed worker is still in the pool"
    assert time.monotonic() - killed <= 3.5  # lease 2.5 s, swept every 0.5 s
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    for i in range(3):
        out = client.completions.create(
            model=cluster["model"], prompt=[30 + i] * 40, max_tokens=3, temperature=0
        )
        assert out.usage is not None and out.usage.completion_tokens == 3
    decisions = _per_worker(_metrics(url), "tokenfab_router_decisions_total")
    assert "w-a" not in decisions  # forgotten by the router as well
