"""Queue full: 503 with Retry-After, in the OpenAI error shape; the server keeps serving."""

from __future__ import annotations

import threading

import httpx
import pytest

pytestmark = pytest.mark.integration

SERVER_ENGINE = {"max_num_seqs": 1, "max_waiting": 1, "max_model_len": 1024, "num_kv_blocks": 256}


def _body(max_tokens: int, stream: bool) -> dict:
    return {
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


def test_queue_full_gives_503_with_retry_after(server) -> None:
    results: dict[str, object] = {}

    def waiting_request() -> None:
        r = httpx.post(f"{server.url}/v1/completions", json=_body(3, False), timeout=120)
        results["b"] = (r.status_code, r.json()["usage"]["completion_tokens"])

    with (
        httpx.Client(base_url=server.url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=_body(1000, True)) as a,
    ):
        assert a.status_code == 200
        lines = a.iter_lines()  # keep a reference: closing it would hang up A
        assert next(lines).startswith("data: ")  # A is running
        b = threading.Thread(target=waiting_request)
        b.start()
        assert server.wait_metric("tokenfab_num_requests_waiting", 1) == 1  # B waits
        c = http.post("/v1/completions", json=_body(3, False))
        assert c.status_code == 503
        assert c.headers["retry-after"] == "1"
        err = c.json()["error"]
        assert err["code"] == 503 and "full" in err["message"]
    # A hung up: B runs and finishes
    b.join(60)
    assert results["b"] == (200, 3)
    assert server.wait_metric("tokenfab_num_requests_running", 0) == 0
    assert server.metric("tokenfab_http_requests_total", status="503") == 1
