"""`tokenfab serve --planner`: the planner runs in the serving stack, on its runtime, and
moves the deployment's own workers: long prompts on a prefill pool measured as slow make it
move a decode worker to prefill; it stops with the stack."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgspec
import openai
import pytest

from tokenfab.config import EmbeddedPlanner, EngineConfig, ServerConfig
from tokenfab.protocol import WORKER_COMPONENT, WorkerInfo
from tokenfab.serve.server import ServerThread

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _roles(rt) -> dict[str, str]:
    return {
        i.instance_id: msgspec.convert(i.metadata, WorkerInfo).role
        for i in await rt.instances(WORKER_COMPONENT)
    }


def test_embedded_planner_moves_a_decode_worker_to_prefill(tiny_llama: Path) -> None:
    engine = EngineConfig(model=str(tiny_llama), num_kv_blocks=512, max_model_len=256,
                          num_threads=1)  # fmt: skip
    # one worker computes 1 prompt token/s (so the prompts below need more prefill workers)
    # and decodes plenty: the spare decode worker belongs in the prefill pool
    planner = EmbeddedPlanner(prefill_tps=1.0, decode_tps=1e6, interval_s=0.5, cooldown_s=0.0)
    config = ServerConfig(disagg_min_uncached_tokens=0, port=0, prefill_workers=1,
                          decode_workers=2, engine_processes=False, planner=planner)  # fmt: skip
    srv = ServerThread(engine, config)
    url = srv.start()
    try:
        assert srv.stack is not None and srv.stack.planner is not None
        service = srv.stack.planner
        rt = srv.stack.runtime
        start = srv.call(_roles(rt))
        assert sorted(start.values()) == ["decode", "decode", "prefill"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        stop = threading.Event()

        def load() -> None:
            i = 0
            while not stop.is_set():
                client.completions.create(model=model, prompt=f"{i} " + "a b c d " * 20,
                                          max_tokens=2, temperature=0)  # fmt: skip
                i += 1

        t = threading.Thread(target=load)
        t.start()
        try:
            for _ in range(240):  # bounded: up to ~2 min
                if any(d.kind == "move" for d in service.decisions):
                    break
                time.sleep(0.5)
        finally:
            stop.set()
            t.join(120)
        moves = [d for d in service.decisions if d.kind == "move"]
        assert moves, [d.kind for d in service.decisions]
        assert moves[0].to_role == "prefill" and start[moves[0].worker_id] == "decode"
        for _ in range(120):  # the move drains, switches and re-announces
            if list(srv.call(_roles(rt)).values()).count("prefill") == 2:
                break
            time.sleep(0.5)
        assert list(srv.call(_roles(rt)).values()).count("prefill") == 2
        out = client.completions.create(model=model, prompt="after", max_tokens=3,
                                        temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
        assert out.usage.completion_tokens == 3
    finally:
        srv.stop()
    assert srv.stack is None or srv.stack.planner is None  # closed with the stack
