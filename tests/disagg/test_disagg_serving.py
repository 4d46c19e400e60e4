"""Disaggregated serving end to end: a real frontend, 1 prefill + 1 decode worker (in one
process, and in engine processes over NATS + the TCP data plane); greedy output equals the
aggregated deployment's token for token; the decode worker pulls only the blocks it lacks;
a prefill worker killed mid-flight costs no request and leaks no block on the survivor."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from tokenfab.config import EngineConfig, ServerConfig
from tokenfab.serve.server import ServerThread

pytestmark = pytest.mark.integration

PREFIX = " ".join(f"word{i}" for i in range(60))


def _engine(model: Path) -> EngineConfig:
    return EngineConfig(model=str(model), num_kv_blocks=256, max_model_len=512, num_threads=1)


def _tokens(url: str, prompts: list[str], max_tokens: int = 24) -> list[list[str]]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    out = []
    for p in prompts:
        r = client.completions.create(
            model=model, prompt=p, max_tokens=max_tokens, temperature=0, logprobs=0,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )  # fmt: skip
        out.append(r.choices[0].logprobs.tokens)
    return out


def _disagg(**kw: object) -> ServerConfig:
    return ServerConfig(
        port=0, prefill_workers=1, decode_workers=1, disagg_min_uncached_tokens=0, **kw
    )


def _stats(srv: ServerThread) -> dict[str, dict[str, float]]:
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("tokenfab_kv_blocks_used{"):
            wid = line.split('worker="')[1].split('"')[0]
            out.setdefault(wid, {})["used"] = float(line.split()[-1])
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_in_process_disagg_equals_aggregated(tiny_models: dict[str, Path], family: str) -> None:
    prompts = [f"{PREFIX} question {i}" for i in range(3)]
    agg = ServerThread(_engine(tiny_models[family]), ServerConfig(port=0, engine_processes=False))
    expected = _tokens(agg.start(), prompts)
    agg.stop()
    srv = ServerThread(_engine(tiny_models[family]), _disagg(engine_processes=False))
    url = srv.start()
    try:
        assert _tokens(url, prompts) == expected
        stack = srv.stack
        prefill_w, decode_w = stack.workers
        assert prefill_w.role == "prefill" and decode_w.role == "decode"
        assert stack.pool.remote_prefills == 3
        # The first prompt moved its whole prefix; the later ones share it with the decode
        # worker's cache and pulled only their own last blocks.
        pulled = decode_w.transfers.blocks_pulled
        total = sum(len(p.split()) for p in prompts)  # not exact tokens; just a bound
        assert 0 < pulled < total
        stats_p = prefill_w.engine.stats()
        stats_d = decode_w.engine.stats()
        assert stats_p.kv_blocks_held == 0 and stats_p.kv_blocks_used == 0
        assert stats_d.kv_blocks_used == 0 and stats_d.kv_blocks_imported == pulled
    finally:
        srv.stop()


def test_engine_processes_disagg_over_tcp_bad_frames_and_a_killed_prefill_worker(
    tiny_llama: Path,
) -> None:
    prompts = [f"{PREFIX} question {i}" for i in range(2)]
    agg = ServerThread(_engine(tiny_llama), ServerConfig(port=0, engine_processes=False))
    expected = _tokens(agg.start(), prompts + ["another prompt entirely " * 8])
    agg.stop()
    srv = ServerThread(_engine(tiny_llama), _disagg(engine_processes=True))
    url = srv.start()
    try:
        assert _tokens(url, prompts) == expected[:2]
        pool = srv.stack.pool
        assert pool.remote_prefills == 2
        address = pool.infos["prefill-0"].data_address
        assert not address.startswith("inproc") and address.rsplit(":", 1)[1].isdigit()
        # Garbage on the prefill worker's data plane is refused; the worker serves on.
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            try:
                answer = s.recv(65536)
            except ConnectionResetError:
                answer = b""
        assert answer == b"" or b"error" in answer
        assert _tokens(url, prompts[:1]) == expected[:1]
        # The prefill worker dies: the decode worker prefills itself; nothing is lost.
        os.kill(srv.stack.processes.pids()["prefill-0"], signal.SIGKILL)
        for _ in range(200):  # bounded: the supervisor tells the pool at once
            if "prefill-0" not in pool.infos:
                break
            time.sleep(0.05)
        assert _tokens(url, ["another prompt entirely " * 8]) == expected[2:]
        used = _stats(srv)
        assert used.get("decode-1", {}).get("used") == 0.0
    finally:
        srv.stop()


def test_a_quarantined_prefill_worker_leaves_decode_workers_to_prefill(tiny_llama: Path) -> None:
    """The only prefill worker's logits are NaN from its first step (its warm-up): it
    quarantines itself; every request is computed on the decode worker, unchanged."""
    prompts = [f"{PREFIX} question {i}" for i in range(3)]
    agg = ServerThread(_engine(tiny_llama), ServerConfig(port=0, engine_processes=False))
    expected = _tokens(agg.start(), prompts)
    agg.stop()
    poisoned = EngineConfig(
        model=str(tiny_llama), num_kv_blocks=256, max_model_len=512, num_threads=1,
        fault="nan", fault_after_steps=0,
    )  # fmt: skip
    srv = ServerThread(
        _engine(tiny_llama),
        _disagg(engine_processes=True),
        engine_overrides={"prefill-0": poisoned},
    )
    url = srv.start()
    try:
        assert _tokens(url, prompts[:1]) == expected[:1]
        pool = srv.stack.pool
        for _ in range(100):  # bounded: its next load report says so
            if pool.health.drained("prefill-0") is not None:
                break
            time.sleep(0.05)
        drain = pool.health.drained("prefill-0")
        assert drain is not None and drain.reason == "quarantined"
        before = pool.remote_prefills
        assert _tokens(url, prompts[1:]) == expected[1:]
        assert pool.remote_prefills == before  # not sent to the quarantined worker
    finally:
        srv.stop()


def _token_tokens(url: str, prompt: list[int], max_tokens: int = 8) -> list[str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    r = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    return r.choices[0].logprobs.tokens


def test_decode_worker_pulls_exactly_the_blocks_past_its_cached_prefix(tiny_llama: Path) -> None:
    # Token-id prompts, 16-token blocks; no length is 0 or 1 past a block boundary, so "the
    # prompt's full blocks" is the same count whichever way the last token is treated.
    base = list(range(100, 200))
    other = list(range(300, 340))
    a = base[:70]  # 4 full blocks; the decode worker holds nothing yet: pulls 4
    b = base[:40] + other[:35]  # 4 full blocks, the first 2 (32 tokens) shared with a: pulls 2
    c = base[:100]  # a's 4 full blocks + 2 more (a's 5th block on the decode worker holds
    # a's generated tokens, not base[64:80]): pulls 2
    expected_pulls = [4, 2, 2]
    agg = ServerThread(_engine(tiny_llama), ServerConfig(port=0, engine_processes=False))
    url = agg.start()
    expected = [_token_tokens(url, p) for p in (a, b, c)]
    agg.stop()
    srv = ServerThread(_engine(tiny_llama), _disagg(engine_processes=False))
    url = srv.start()
    try:
        _, decode_w = srv.stack.workers
        pulls = []
        for prompt, want in zip((a, b, c), expected, strict=True):
            before = decode_w.transfers.blocks_pulled
            assert _token_tokens(url, prompt) == want
            pulls.append(decode_w.transfers.blocks_pulled - before)
        assert pulls == expected_pulls
        assert srv.stack.pool.remote_prefills == 3
        assert decode_w.engine.stats().kv_blocks_imported == sum(expected_pulls)
    finally:
        srv.stop()


@pytest.mark.slow
def test_default_model_disagg_equals_aggregated() -> None:
    from tokenfab.engine.model.loader import resolve_model

    model = resolve_model(None)
    prompts = [f"{PREFIX} question {i}" for i in range(2)]
    agg = ServerThread(_engine(model), ServerConfig(port=0, engine_processes=False))
    expected = _tokens(agg.start(), prompts, max_tokens=16)
    agg.stop()
    srv = ServerThread(_engine(model), _disagg(engine_processes=False))
    url = srv.start()
    try:
        assert _tokens(url, prompts, max_tokens=16) == expected
        assert srv.stack.pool.remote_prefills == 2
    finally:
        srv.stop()
