"""One streaming OpenAI `/v1/completions` call, timed chunk by chunk."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx

from tokenfab.bench.metrics import RequestResult
from tokenfab.bench.workload import RequestSpec


@dataclass(frozen=True)
class ClientConfig:
    base_url: str  # e.g. http://127.0.0.1:8000 (with or without /v1)
    model: str
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout_s: float = 600.0

    @property
    def completions_url(self) -> str:
        return api_root(self.base_url) + "/completions"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def api_root(base_url: str) -> str:
    """`http://h:p`, `http://h:p/` and `http://h:p/v1` all mean `http://h:p/v1`."""
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def request_body(cfg: ClientConfig, spec: RequestSpec) -> dict:
    body = {
        "model": cfg.model,
        "prompt": spec.prompt,
        "max_tokens": spec.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        # A vLLM extension that tokenfab also accepts: output lengths exactly as asked.
        body["ignore_eos"] = True
    return body


async def list_models(client: httpx.AsyncClient, cfg: ClientConfig) -> list[str]:
    resp = await client.get(api_root(cfg.base_url) + "/models", headers=cfg.headers())
    resp.raise_for_status()
    return [m["id"] for m in resp.json().get("data", [])]


def _error_text(status: int, body: bytes) -> str:
    try:
        err = json.loads(body).get("error", {})
        msg = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        msg = body[:200].decode(errors="replace")
    return f"HTTP {status}: {msg}"


async def send_streaming(
    client: httpx.AsyncClient, cfg: ClientConfig, spec: RequestSpec, t0: float
) -> RequestResult:
    """Send one request and time its stream; never raises for request-level failures."""
    start = time.perf_counter()
    res = RequestResult(spec.index, start - t0, len(spec.prompt), spec.max_tokens)
    last: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    finished_at: float | None = None
    try:
        async with client.stream(
            "POST", cfg.completions_url, json=request_body(cfg, spec), headers=cfg.headers()
        ) as resp:
            if resp.status_code != 200:
                res.error = _error_text(resp.status_code, await resp.aread())
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                msg = json.loads(data)
                if "error" in msg:
                    res.error = _error_text(200, data.encode())
                    return res
                usage = msg.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    res.prompt_tokens = usage.get("prompt_tokens")
                choices = msg.get("choices") or []
                # A chunk is a token event if it has text or is not a bare finish marker
                # (servers may stream empty text for special tokens under ignore_eos).
                if choices and (choices[0].get("text") or choices[0].get("finish_reason") is None):
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
                    chunks += 1
                elif choices and finished_at is None:
                    finished_at = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
        return res
    res.e2e = time.perf_counter() - start
    res.output_tokens = usage_tokens if usage_tokens is not None else chunks
    if res.ttft is None and res.output_tokens > 0 and finished_at is not None:
        # The only token was one with no text (e.g. end-of-sequence right away): it arrived
        # with the finish marker.
        res.ttft = finished_at - start
    res.ok = res.ttft is not None or res.output_tokens == 0
    if not res.ok:
        res.error = "stream ended without any generated text"
    return res
