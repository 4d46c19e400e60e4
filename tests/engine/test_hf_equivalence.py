"""Greedy outputs equal Hugging Face transformers' `generate`, token for token, for every
family, with many prompts batched together under chunked prefill; prefix-cache hits and
preemption change nothing. On CPU and (where present) CUDA; transformers runs on CPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tokenfab.config import EngineConfig
from tokenfab.engine.engine import LLMEngine
from tokenfab.engine.model.loader import load_model
from tokenfab.protocol import GenerateRequest, SamplingParams

pytestmark = pytest.mark.integration

NUM_PROMPTS = 22
MAX_NEW = 10
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Mixed lengths (1..110 tokens); some share long prefixes, one repeats another exactly."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(40)]
    prompts = []
    for i in range(NUM_PROMPTS):
        n = rng.choice([1, 5, 16, 17, 33, 50, 110])
        body = [rng.randrange(3, vocab) for _ in range(n)]
        prompts.append(shared + body if i % 4 == 0 else body)
    prompts.append(list(prompts[0]))
    return prompts


def hf_greedy(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    """HF greedy outputs, prompts of equal length batched together (no padding, so HF's own
    numerics are untouched), each cut after its first EOS as HF pads finished rows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    outs: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        for n, idx in by_len.items():
            ids = torch.tensor([prompts[i] for i in idx])
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False
            )
            for row, i in zip(gen[:, n:].tolist(), idx, strict=True):
                outs[i] = row[: row.index(eos) + 1] if eos in row else row
    return outs


def run_engine(engine: LLMEngine, prompts: list[list[int]], tag: str) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    for i, p in enumerate(prompts):
        engine.add_request(
            GenerateRequest(request_id=f"{tag}{i}", prompt_token_ids=p, sampling=params)
        )
    got: dict[str, list[int]] = {f"{tag}{i}": [] for i in range(len(prompts))}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            assert out.error is None, out.error
            got[out.request_id].extend(out.token_ids)
    assert not engine.has_unfinished()
    return [got[f"{tag}{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(
    family: str, tiny_models: dict[str, Path], device: str
) -> None:
    path = tiny_models[family]
    loaded = load_model(path, dtype="float32", device=device)
    prompts = make_prompts(loaded.config.vocab_size)
    expected = hf_greedy(path, prompts)

    # Budget of 24 tokens per step: prompts are split into chunks and mixed with decodes.
    cfg = EngineConfig(
        model=str(path),
        dtype="float32",
        device=device,
        num_kv_blocks=256,
        max_num_batched_tokens=24,
    )
    engine = LLMEngine(cfg, loaded=loaded)
    first = run_engine(engine, prompts, "a")
    for i, (got, want) in enumerate(zip(first, expected, strict=True)):
        assert got == want, f"{family} prompt {i} (len {len(prompts[i])}): {got} != {want}"
    hits_before = engine.stats().prefix_cache_hits
    assert hits_before > 0  # shared prefixes and the repeated prompt were served from cache

    # The same prompts again: now mostly cache hits; outputs must not change.
    assert run_engine(engine, prompts, "b") == expected
    assert engine.stats().prefix_cache_hits > hits_before
    assert engine.kv.num_used_blocks == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_changes_no_output(
    family: str, tiny_models: dict[str, Path], device: str
) -> None:
    path = tiny_models[family]
    loaded = load_model(path, dtype="float32", device=device)
    prompts = make_prompts(loaded.config.vocab_size, seed=1)
    # Roomy run for reference, then a pool of 16 blocks (256 tokens) that forces preemptions.
    roomy_cfg = EngineConfig(dtype="float32", device=device, num_kv_blocks=256)
    roomy = run_engine(LLMEngine(roomy_cfg, loaded=loaded), prompts, "r")
    cfg = EngineConfig(dtype="float32", device=device, num_kv_blocks=16, max_num_batched_tokens=64)
    tight = LLMEngine(cfg, loaded=loaded)
    assert run_engine(tight, prompts, "t") == roomy
    assert tight.stats().num_preemptions > 0
    assert tight.kv.num_used_blocks == 0
