"""`tokenfab router` standalone: two router processes beside two workers on a real NATS server
agree on every decision, and a frontend started with --external-router sends a repeated prefix
to the worker that cached it."""

from __future__ import annotations

import asyncio
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

from tokenfab.kv.hashing import block_hashes
from tokenfab.protocol import ROUTER_COMPONENT, RouteRequest, RouteResponse
from tokenfab.runtime import Runtime
from tokenfab.runtime.nats_server import NatsServer, free_port, nats_server_binary

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(nats_server_binary() is None, reason="nats-server not installed"),
]

TOKENFAB = str(Path(sys.executable).with_name("tokenfab"))
NS = "rs"


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([TOKENFAB, *args], stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    logs = tmp_path_factory.mktemp("routers")
    procs: list[subprocess.Popen] = []
    with NatsServer() as nats:
        try:
            common = ["--runtime", nats.url, "--namespace", NS]
            for wid in ("w-a", "w-b"):
                procs.append(_spawn(
                    ["worker", *common, "--model", str(tiny_llama), "--worker-id", wid,
                     "--kv-blocks", "256", "--max-model-len", "512", "--num-threads", "1"],
                    logs / f"{wid}.log",
                ))  # fmt: skip
            for rid in ("r1", "r2"):
                procs.append(_spawn(["router", *common, "--router-id", rid], logs / f"{rid}.log"))
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            frontend = _spawn(
                ["frontend", *common, "--port", str(port), "--wait", "120", "--external-router"],
                logs / "frontend.log",
            )
            procs.append(frontend)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/health", timeout=2).json().get("workers") == 2:
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.3)
            else:
                raise RuntimeError((logs / "frontend.log").read_text()[-3000:])
            yield {"url": url, "nats": nats.url, "model": tiny_llama.name}
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()


async def _ask_routers(nats_url: str, hashes: list[int], n: int) -> dict[str, RouteResponse]:
    rt = await Runtime.connect(nats_url, NS)
    try:
        routers = sorted(i.instance_id for i in await rt.instances(ROUTER_COMPONENT))
        out = {}
        for rid in routers:
            req = RouteRequest(request_id=f"probe-{rid}", block_hashes=hashes, num_prompt_tokens=n)
            async with await rt.call(rid, "route", req, RouteResponse) as stream:
                out[rid] = await asyncio.wait_for(anext(stream), 10)
        return out
    finally:
        await rt.close()


def _hits(url: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "tokenfab_prefix_cache_hits_total":
                out[s.labels["worker"]] = s.value
    return out


def test_two_routers_agree_and_follow_the_cache(cluster: dict) -> None:
    url = cluster["url"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    prefix = [(11 * i) % 200 + 20 for i in range(320)]  # 20 blocks of 16
    out = client.completions.create(
        model=cluster["model"], prompt=prefix + [5, 6], max_tokens=2, temperature=0
    )
    assert out.usage is not None and out.usage.completion_tokens == 2
    probe = prefix + [9, 9, 9]
    hashes = block_hashes(probe, 16)
    answers: dict[str, RouteResponse] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # until both routers have indexed the prefix
        answers = asyncio.run(_ask_routers(cluster["nats"], hashes, len(probe)))
        if len(answers) == 2 and all(a.overlap_blocks >= 20 for a in answers.values()):
            break
        time.sleep(0.2)
    assert set(answers) == {"r1", "r2"}
    assert all(a.overlap_blocks >= 20 for a in answers.values()), answers
    holder = answers["r1"].worker_id
    assert answers["r2"].worker_id == holder  # same events, same seed: same decision
    before = _hits(url)
    for i in range(3):
        out = client.completions.create(
            model=cluster["model"], prompt=prefix + [40 + i], max_tokens=2, temperature=0
        )
        assert out.usage is not None and out.usage.completion_tokens == 2
    after = _hits(url)
    gained = {w: after.get(w, 0) - before.get(w, 0) for w in after}
    assert gained[holder] >= 3 * 20 * 16, gained
