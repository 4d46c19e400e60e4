"""Shared fixtures: tiny random-weight models made at test time (one per family, per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> folder of a tiny HF-format model (config, safetensors, tokenizer)."""
    from tokenfab.engine.tools.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(root / f, family=f, seed=0) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]
