"""A client that goes away cancels its engine request: the KV blocks come back (as /metrics
shows) and the engine stops generating for it. Streaming and non-streaming."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.integration

SERVER_ENGINE = {"max_model_len": 1024, "num_kv_blocks": 256}
MAX_TOKENS = 960  # far more than can be generated before the test hangs up


def _body(stream: bool) -> dict:
    return {
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": stream,
    }


def test_disconnect_mid_stream_frees_the_blocks(server) -> None:
    assert server.wait_metric("tokenfab_kv_blocks_used", 0) == 0
    generated_before = server.metric("tokenfab_engine_generation_tokens_total")
    with (
        httpx.Client(base_url=server.url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=_body(True)) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        for line in lines:
            got += line.startswith("data: ")
            if got >= 5:
                break
        assert server.metric("tokenfab_kv_blocks_used") > 0
        assert server.metric("tokenfab_num_requests_running") == 1
    # the connection is closed here, mid-stream
    assert server.wait_metric("tokenfab_num_requests_running", 0) == 0
    assert server.wait_metric("tokenfab_kv_blocks_used", 0) == 0
    generated = server.metric("tokenfab_engine_generation_tokens_total") - generated_before
    assert 4 <= generated < MAX_TOKENS


def test_disconnect_while_waiting_for_a_non_streaming_answer(server) -> None:
    generated_before = server.metric("tokenfab_engine_generation_tokens_total")
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=0.3)) as http:  # noqa: SIM117
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json=_body(False))
    # The client gave up (connection closed) long before 2000 tokens.
    assert server.wait_metric("tokenfab_num_requests_running", 0) == 0
    assert server.wait_metric("tokenfab_kv_blocks_used", 0) == 0
    generated = server.metric("tokenfab_engine_generation_tokens_total") - generated_before
    assert generated < MAX_TOKENS
    # and the server answers the next request normally
    r = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60
    )
    assert r.status_code == 200
