"""The bundled SmolLM2 GGUF: conversion, the undone Q/K permutation, and a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenfab.engine.core.batch import SeqChunk, StepBatch
from tokenfab.engine.model.loader import LoadedModel, default_gguf_path, load_model, resolve_model
from tokenfab.engine.model.runner import ModelRunner
from tokenfab.engine.tools.gguf_convert import display_name, unpermute_rope

PARIS_TOKENS = [504, 3575, 282, 4649, 314, 7042, 30, 2]
"""Greedy answer to "What is the capital of France?" ("The capital of France is Paris.<|im_end|>"),
measured with both float32 and bfloat16."""


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # The row order llama.cpp's converter writes for Q/K (HF rotate-half -> interleaved pairs).
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for heads in (1, 3):
        assert np.array_equal(unpermute_rope(_llama_cpp_permute(w, heads), heads), w)
    assert not np.array_equal(_llama_cpp_permute(w, 3), w)


def test_display_name() -> None:
    assert display_name(Path("/x/SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smollm_dir() -> Path:
    return resolve_model(None)


@pytest.fixture(scope="module")
def smollm_fp32(smollm_dir: Path) -> LoadedModel:
    return load_model(smollm_dir, dtype="float32")


@pytest.mark.slow
def test_converted_folder_is_complete_and_cached(smollm_dir: Path) -> None:
    assert default_gguf_path().is_file()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (smollm_dir / name).is_file(), name
    assert resolve_model(str(default_gguf_path())) == smollm_dir  # reused, not reconverted
    tok_cfg = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by older versions
    assert "<|im_start|>assistant" in tok_cfg["chat_template"]
    assert tok_cfg["model_max_length"] == 8192


@pytest.mark.slow
def test_runner_matches_transformers_on_converted_folder(
    smollm_dir: Path, smollm_fp32: LoadedModel
) -> None:
    from transformers import AutoModelForCausalLM

    loaded = smollm_fp32
    assert loaded.name == "SmolLM2-135M-Instruct"
    assert loaded.config.eos_token_ids == [2]
    assert loaded.config.native_dtype == torch.bfloat16
    ids = loaded.tokenizer("The quick brown fox jumps over the lazy dog. " * 3)["input_ids"]
    runner = ModelRunner(loaded, num_blocks=8, block_size=16)
    ours = runner.execute(StepBatch([SeqChunk(ids, 0, list(range(8)), sample=True)]))[0]
    hf = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_default_model_knows_paris(smollm_fp32: LoadedModel, dtype: str) -> None:
    loaded = smollm_fp32 if dtype == "float32" else load_model(None, dtype=dtype)
    tok = loaded.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    runner = ModelRunner(loaded, num_blocks=8, block_size=16)
    seq, table = list(prompt), list(range(8))
    logits = runner.execute(StepBatch([SeqChunk(seq, 0, table, sample=True)]))
    while len(seq) - len(prompt) < len(PARIS_TOKENS):
        seq.append(int(logits.argmax(-1)))
        logits = runner.execute(StepBatch([SeqChunk(seq[-1:], len(seq) - 1, table, sample=True)]))
    answer = seq[len(prompt) :]
    assert "Paris" in tok.decode(answer)
    assert answer == PARIS_TOKENS
