"""Pure-ASGI middleware (no BaseHTTPMiddleware, so streaming and disconnects pass through
untouched): API-key check and per-endpoint request counting."""

from __future__ import annotations

import hmac
import json
from typing import Any

from tokenfab.frontend.errors import error_body
from tokenfab.frontend.metrics import FrontendMetrics

OPEN_PATHS = frozenset({"/health", "/metrics"})
"""Reachable without the API key: health checks and Prometheus scrapers carry no key."""
KNOWN_PATHS = frozenset(
    {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}
)


class AccessMiddleware:
    def __init__(self, app: Any, metrics: FrontendMetrics, api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self._key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in KNOWN_PATHS else "other"
        if path.startswith("/v1/models/"):
            endpoint = "/v1/models/{model}"
        status = {"code": 500}

        async def send_counting(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self._key is not None and path not in OPEN_PATHS and not self._authorized(scope):
                await _send_json(send_counting, 401, _unauthorized(scope))
                return
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return hmac.compare_digest(value, self._key or b"")
        return False


def _unauthorized(scope: dict) -> dict:
    has_header = any(name == b"authorization" for name, _ in scope.get("headers", ()))
    msg = (
        "Incorrect API key provided."
        if has_header
        else "Missing API key: send Authorization: Bearer <key>."
    )
    return error_body(401, msg, code="invalid_api_key")


async def _send_json(send: Any, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
