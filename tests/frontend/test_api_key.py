"""--api-key: every API route needs `Authorization: Bearer KEY`; /health and /metrics stay open."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

SERVER_CONFIG = {"api_key": "sekret-key"}


def test_missing_or_wrong_key_is_401(server) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in [{}, {"Authorization": "Bearer nope"}, {"Authorization": "sekret-key"}]:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "UnauthorizedError"
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_right_key_works_and_health_metrics_stay_open(server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekret-key", max_retries=0)
    r = client.completions.create(
        model=server.model, prompt="Hi", max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 2
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{server.url}/metrics", timeout=30).status_code == 200
    assert server.metric("tokenfab_http_requests_total", status="401") >= 4
