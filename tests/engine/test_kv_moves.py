"""Moving KV blocks between engines: a prompt computed on one engine, its blocks exported
(held, read), imported into another, decodes there exactly as if computed locally."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenfab.config import EngineConfig
from tokenfab.engine.core.kv_cache import KVCacheManager
from tokenfab.engine.core.sequence import Sequence
from tokenfab.engine.engine import LLMEngine
from tokenfab.kv.hashing import block_hashes
from tokenfab.protocol import GenerateRequest, SamplingParams

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _engine(model: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), num_kv_blocks=64, max_model_len=512))


def _run(engine: LLMEngine, rid: str, prompt: list[int], max_tokens: int) -> list[int]:
    engine.add_request(
        GenerateRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        )
    )
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.token_ids)
    return tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_blocks_decode_like_local_ones(tiny_models: dict[str, Path], family: str) -> None:
    prompt = [(i * 37) % 200 + 5 for i in range(75)]  # 4 full blocks + 11 tokens
    local = _engine(tiny_models[family])
    expected = _run(local, "a", prompt, 12)

    prefill, decode = _engine(tiny_models[family]), _engine(tiny_models[family])
    first = _run(prefill, "p", prompt, 1)
    assert first == expected[:1]
    hashes = block_hashes(prompt, 16)
    assert prefill.hold_prefix("p", hashes) == hashes
    assert prefill.stats().kv_blocks_held == 4
    data = prefill.block_io.read(prefill.held_blocks("p"))
    assert prefill.release_hold("p") == 4
    assert prefill.stats().kv_blocks_held == 0 and prefill.stats().kv_blocks_used == 0

    assert decode.import_blocks(hashes, data, None, prompt[:64]) == 4
    assert decode.cached_prefix_length(hashes) == 4
    rest = _run(decode, "d", prompt + first, 11)
    assert first + rest == expected
    assert decode.stats().prefix_cache_hits == 64  # the imported blocks were used, not redone
    assert decode.stats().kv_blocks_imported == 4 and decode.stats().kv_blocks_used == 0


def test_import_takes_only_free_blocks_and_hold_pins_against_eviction() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=2)
    seq = Sequence("s", [1, 2, 3, 4, 5], block_size=2)
    assert kv.allocate(seq, 5)
    seq.num_computed_tokens = 5
    kv.commit(seq)
    kv.free(seq)
    held = kv.hold(seq.block_hashes)
    assert len(held) == 2 and kv.num_free_blocks == 2
    other = block_hashes([9, 9, 9, 9, 9, 9], 2)
    ids = kv.reserve(3)
    assert len(ids) == 2  # only two were free; held blocks are never taken
    kv.adopt(ids, other[:2], None, [9, 9, 9, 9])
    assert kv.cached_prefix_length(other) == 2
    assert kv.cached_prefix_length(seq.block_hashes) == 2
    kv.unhold(held)
    assert kv.num_used_blocks == 0
