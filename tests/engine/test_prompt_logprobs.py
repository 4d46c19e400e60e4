"""Prompt logprobs: every prompt position scored as transformers scores it, across chunked
prefill and despite a cached prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenfab.protocol import SamplingParams


@pytest.mark.parametrize("chunk", [512, 7])
def test_prompt_logprobs_match_transformers(tiny_llama: Path, chunk: int) -> None:
    from transformers import AutoModelForCausalLM

    from tokenfab.engine.llm import LLM

    llm = LLM(
        str(tiny_llama),
        dtype="float32",
        num_kv_blocks=64,
        max_model_len=256,
        max_num_batched_tokens=chunk,
    )
    prompt = llm.tokenizer.encode("the quick brown fox jumps over the lazy dog")
    # A first run caches the prefix; the scored run must still compute every position.
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    res = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2))[
        0
    ]
    plp = res.prompt_logprobs
    assert plp is not None and len(plp) == len(prompt) and plp[0] is None

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    for pos in range(1, len(prompt)):
        e = plp[pos]
        assert e is not None and e.token_id == prompt[pos]
        assert abs(e.logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
        top = ref[pos - 1].topk(2)
        assert [t.token_id for t in e.top] == top.indices.tolist()
    assert llm.engine.kv.num_used_blocks == 0
