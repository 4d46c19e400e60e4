"""A real tokenfab server (uvicorn on a free loopback port, real engines on a tiny model),
shared by the tests of one module."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tokenfab.config import EngineConfig, ServerConfig
from tokenfab.serve.server import ServerThread


@dataclass
class Server:
    url: str
    thread: ServerThread
    model: str

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels` (e.g. over workers)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        pattern = re.compile(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", re.M)
        total = 0.0
        for label_text, value in pattern.findall(text):
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total

    def wait_metric(self, name: str, value: float, timeout: float = 15.0) -> float:
        """Poll /metrics (bounded) until `name` equals `value`; returns the last reading."""
        deadline = time.monotonic() + timeout
        seen = self.metric(name)
        while seen != value and time.monotonic() < deadline:
            time.sleep(0.05)
            seen = self.metric(name)
        return seen


def start_server(
    model: Path, engine: dict | None = None, server: dict | None = None
) -> ServerThread:
    cfg = dict(model=str(model), num_kv_blocks=512, max_model_len=512, max_num_batched_tokens=512)
    cfg.update(engine or {})
    # The default shape of `tokenfab serve`: engines in processes of their own.
    config = {"engine_processes": True, **(server or {})}
    srv = ServerThread(EngineConfig(**cfg), ServerConfig(port=0, **config))
    srv.start()
    return srv


@pytest.fixture(scope="module")
def server(tiny_llama: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """Override per module with `SERVER_ENGINE` / `SERVER_CONFIG` dicts at module level."""
    engine = getattr(request.module, "SERVER_ENGINE", None)
    config = getattr(request.module, "SERVER_CONFIG", None)
    thread = start_server(tiny_llama, engine, config)
    try:
        yield Server(thread.url, thread, tiny_llama.name)
    finally:
        thread.stop()
