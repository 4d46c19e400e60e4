"""Model resolution and loading: folders, errors, dtype and eos handling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenfab.engine.model.loader import load_model, resolve_model
from tokenfab.engine.model.model import resolve_dtype


def test_folder_is_used_as_is(tiny_llama: Path) -> None:
    assert resolve_model(str(tiny_llama)) == tiny_llama


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="neither"):
        resolve_model(str(other))


def test_dtype_auto_and_explicit(tiny_llama: Path) -> None:
    auto = load_model(tiny_llama)
    assert auto.config.dtype == torch.float32  # the tiny checkpoint's own dtype
    bf16 = load_model(tiny_llama, dtype="bfloat16")
    assert bf16.config.dtype == torch.bfloat16
    assert bf16.model.embed.weight.dtype == torch.bfloat16
    assert resolve_dtype("auto", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", torch.float32)


def test_config_and_tokenizer(tiny_models: dict[str, Path]) -> None:
    loaded = load_model(tiny_models["qwen3"])
    cfg = loaded.config
    assert (cfg.family, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == ("qwen3", 4, 8, 2)
    assert cfg.head_dim == 48 and cfg.qk_norm and cfg.tie_word_embeddings
    assert cfg.eos_token_ids == [loaded.tokenizer.eos_token_id]
    assert loaded.tokenizer.chat_template
    assert loaded.name == "qwen3"
    # tied: the output projection is the embedding
    assert torch.equal(loaded.model.lm_head.weight, loaded.model.embed.weight)
