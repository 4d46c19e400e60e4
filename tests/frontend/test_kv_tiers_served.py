"""KV tiers through `tokenfab serve` (two engine processes): each worker gets its own G3
directory, both share one G2 segment (a prefix one worker evicted is loaded back by the other),
output is unchanged, and the segment is gone once the server stops."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import openai
import pytest
from waiting import wait_until

from tokenfab.config import EngineConfig, ServerConfig
from tokenfab.kv.host import segment_path
from tokenfab.serve.server import ServerThread

pytestmark = pytest.mark.integration


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(3, 200) for _ in range(200)]  # 12 full blocks of 16


def test_served_tiers_share_host_memory_and_keep_one_disk_dir_per_worker(
    tiny_llama: Path, tmp_path: Path
) -> None:
    # 20 blocks per engine: two more 200-token prompts on a worker evict the first one's.
    engine = EngineConfig(
        model=str(tiny_llama),
        num_kv_blocks=20,
        max_model_len=256,
        kv_host_gb=0.01,
        kv_disk_dir=str(tmp_path / "kv"),
    )
    srv = ServerThread(engine, ServerConfig(port=0, workers=2, router_policy="round_robin"))
    srv.start()
    try:
        assert srv.stack is not None and srv.stack.shared_host_tier is not None
        segment = segment_path(srv.stack.shared_host_tier)
        assert segment.exists()

        def metric(name: str) -> float:
            return _metric(srv.url, name)

        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        rng = random.Random(0)
        shared = _prompt(rng)

        def complete(prompt: list[int]) -> str:
            out = client.completions.create(
                model=model, prompt=prompt, max_tokens=6, temperature=0.0
            )
            return out.choices[0].text

        # Round robin: worker 0 gets the 1st, 3rd and 5th request, worker 1 the others, so
        # the shared prompt's second turn lands on the worker that never computed it.
        first = complete(shared)
        for _ in range(4):
            complete(_prompt(rng))
        assert metric("tokenfab_kv_offloaded_blocks") > 0 or wait_until(
            lambda: metric("tokenfab_kv_offloaded_blocks") > 0
        )
        again = complete(shared)
        assert again == first
        assert wait_until(lambda: metric("tokenfab_kv_onboarded_blocks") >= 11)
        assert metric("tokenfab_kv_onboard_failed_blocks") == 0
        dirs = sorted(p.name for p in (tmp_path / "kv").iterdir() if p.is_dir())
        assert dirs == ["worker-0", "worker-1"]
    finally:
        srv.stop()
    assert not segment.exists()
    # G3 outlives the server: the engines wrote their cached blocks back at shutdown.
    assert any((tmp_path / "kv" / "worker-0").glob("*.kve"))


def _metric(url: str, name: str) -> float:
    """Sum of a counter over workers."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.split("{")[0].split(" ")[0] in (name, name + "_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total
