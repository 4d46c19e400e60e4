"""The offline `LLM` API on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenfab import LLM, SamplingParams
from tokenfab.engine.errors import InvalidRequestError


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> LLM:
    return LLM(str(tiny_llama), dtype="float32", num_kv_blocks=64, max_num_batched_tokens=32)


def test_generate_mixed_prompts_in_input_order(llm: LLM) -> None:
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts: list[str | list[int]] = ["hello world", [5, 6, 7, 8], "a longer prompt " * 5]
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    assert [o.prompt for o in outs] == ["hello world", None, "a longer prompt " * 5]
    assert outs[1].prompt_token_ids == [5, 6, 7, 8]
    assert all(len(o.token_ids) == 6 and o.finish_reason == "length" for o in outs)
    # Each alone gives the same tokens: batching does not change greedy outputs.
    for p, o in zip(prompts, outs, strict=True):
        (alone,) = llm.generate(p, greedy, use_tqdm=False)
        assert alone.token_ids == o.token_ids and alone.outputs[0].text == o.text


def test_per_prompt_params_and_progress_bar(llm: LLM) -> None:
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (1, 3, 5)]
    outs = llm.generate(["x", "y", "z"], params)  # with the progress bar
    assert [len(o.token_ids) for o in outs] == [1, 3, 5]
    with pytest.raises(InvalidRequestError, match="2 sampling params for 3 prompts"):
        llm.generate(["x", "y", "z"], params[:2])


def test_chat_applies_the_template(llm: LLM) -> None:
    conv = [{"role": "user", "content": "hi there"}]
    (one,) = llm.chat(conv, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    ids = llm.tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert one.prompt_token_ids == llm.tokenizer.encode(ids, add_special_tokens=False)
    two = llm.chat([conv, conv + [{"role": "assistant", "content": "yo"}]], use_tqdm=False)
    assert len(two) == 2 and two[0].prompt_token_ids == one.prompt_token_ids


def test_invalid_request_names_the_prompt_and_llm_stays_usable(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError, match=r"prompt 1: .*max_model_len is 1024"):
        llm.generate(["fine", [5] * 2000], use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="temperature"):
        llm.generate("x", SamplingParams(temperature=-1.0))
    assert not llm.engine.has_unfinished()
    (out,) = llm.generate("still works", SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out.token_ids) == 2
