"""Model pieces against their transformers counterparts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenfab.engine.model.model import load_model_config, rope_tables


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_rope_tables_match_transformers(tiny_models: dict[str, Path], family: str) -> None:
    from transformers import AutoModelForCausalLM

    path = tiny_models[family]
    cfg = load_model_config(path, "float32")
    cos, sin = rope_tables(cfg, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(path)
    pos = torch.tensor([[0, 1, 7, 300, 1023]])
    x = torch.zeros(1, 5, cfg.hidden_size)
    hcos, hsin = hf.model.rotary_emb(x, pos)
    assert torch.equal(cos[pos[0]], hcos[0]) and torch.equal(sin[pos[0]], hsin[0])


def test_llama3_scaling_changes_frequencies(tiny_models: dict[str, Path]) -> None:
    cfg = load_model_config(tiny_models["llama"], "float32")
    cos, _ = rope_tables(cfg, "cpu")
    cfg.hf_config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    plain, _ = rope_tables(cfg, "cpu")
    assert not torch.allclose(cos[1000], plain[1000])


def test_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="unsupported model_type"):
        load_model_config(tmp_path)
