"""Tiny random models: loadable by transformers, with a working tokenizer and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenfab.engine.tools.tiny import make_tiny_model


def test_families_have_their_quirks(tiny_models: dict[str, Path]) -> None:
    cfgs = {f: json.loads((p / "config.json").read_text()) for f, p in tiny_models.items()}
    assert cfgs["qwen2"]["model_type"] == "qwen2" and cfgs["qwen2"]["tie_word_embeddings"]
    assert cfgs["qwen3"]["head_dim"] == 48
    assert cfgs["llama"]["rope_parameters"]["rope_type"] == "llama3"
    assert cfgs["mistral"]["sliding_window"] == 48


def test_loadable_by_transformers(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    for family, path in tiny_models.items():
        model = AutoModelForCausalLM.from_pretrained(path)
        n = sum(p.numel() for p in model.parameters())
        assert 1_000_000 < n < 10_000_000, (family, n)
    qwen2 = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    assert qwen2.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0


def test_tokenizer_round_trips_and_has_chat_template(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for text in ["What is the capital of France?", "ünïcödé 123 \n\t tabs", "x" * 300]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok("The quick brown fox")["input_ids"]) < len("The quick brown fox")  # merges
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"
    gen = json.loads((tiny_llama / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", "llama", seed=5)
    b = make_tiny_model(tmp_path / "b", "llama", seed=5)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_bad_family(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="family"):
        make_tiny_model(tmp_path, "gpt2")


def test_cli_make_tiny_and_info(tmp_path: Path) -> None:
    from tokenfab.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["model", "make-tiny", str(tmp_path / "m"), "--family", "qwen3"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "config.json").is_file()
    res = runner.invoke(app, ["model", "info", str(tmp_path / "m"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["family"] == "qwen3" and info["num_kv_heads"] == 2
    res = runner.invoke(app, ["model", "make-tiny", str(tmp_path / "x"), "--family", "gpt2"])
    assert res.exit_code == 2
