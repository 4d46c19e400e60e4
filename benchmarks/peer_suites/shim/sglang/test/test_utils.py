"""`sglang.test.test_utils`: the constants and the server launcher SGLang's OpenAI-server tests
use, pointed at the server the runner started."""

from __future__ import annotations

import unittest
from dataclasses import dataclass

import _env
import httpx

DEFAULT_SMALL_MODEL_NAME_FOR_TEST = _env.model()
DEFAULT_SMALL_CROSS_ENCODER_MODEL_NAME_FOR_TEST = "cross-encoder-not-served"
DEFAULT_TIMEOUT_FOR_SERVER_LAUNCH = 600
DEFAULT_URL_FOR_TEST = _env.url()

CustomTestCase = unittest.TestCase


@dataclass
class _Running:
    """What popen_launch_server returns: the tests only read `.pid` to hand to
    kill_process_tree, which leaves the runner's server alone."""

    pid: int | None = None


def popen_launch_server(model: str, base_url: str, timeout: float = 600, **_: object) -> _Running:
    # The runner has already waited for readiness; this only fails fast if the server is gone.
    httpx.get(f"{base_url}/v1/models", timeout=30).raise_for_status()
    return _Running()
