"""vLLM's `tests.utils.RemoteOpenAIServer`, for a server that is already running: the model
name and server arguments a test module passes are ignored (the runner started the server)."""

from __future__ import annotations

from urllib.parse import urlparse

import _env
import openai


class RemoteOpenAIServer:
    def __init__(self, model: str, vllm_serve_args: list[str] | None = None, **_: object):
        self.url_root = _env.url()
        parsed = urlparse(self.url_root)
        self.host, self.port = parsed.hostname, parsed.port

    def __enter__(self) -> RemoteOpenAIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def url_for(self, *parts: str) -> str:
        return self.url_root + "/" + "/".join(parts)

    def get_client(self, **kwargs: object) -> openai.OpenAI:
        kwargs.setdefault("timeout", 600)
        return openai.OpenAI(base_url=self.url_for("v1"), api_key="EMPTY", max_retries=0, **kwargs)

    def get_async_client(self, **kwargs: object) -> openai.AsyncOpenAI:
        kwargs.setdefault("timeout", 600)
        return openai.AsyncOpenAI(
            base_url=self.url_for("v1"), api_key="EMPTY", max_retries=0, **kwargs
        )
