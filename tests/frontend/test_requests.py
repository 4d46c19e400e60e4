"""API request -> engine requests, without a server: defaults, limits, fan-out, seeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenfab.frontend.errors import APIError
from tokenfab.frontend.prompts import Prompts
from tokenfab.frontend.requests import Limits, check_model, prepare_chat, prepare_completion
from tokenfab.frontend.schemas import ChatCompletionRequest, CompletionRequest


@pytest.fixture(scope="module")
def prompts(tiny_llama: Path) -> Prompts:
    from transformers import AutoTokenizer

    return Prompts(AutoTokenizer.from_pretrained(tiny_llama))


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **kw}
    )


def test_chat_uses_the_template_and_defaults_to_the_rest_of_the_context(prompts: Prompts) -> None:
    prep = prepare_chat(chat(), prompts, Limits(100))
    text = prep.prompts[0].text
    assert text.startswith("<|im_start|>user\nhi<|im_end|>") and text.endswith("assistant\n")
    (req,) = prep.build()
    assert req.sampling.max_tokens == 100 - len(req.prompt_token_ids)
    assert req.sampling.temperature == 1.0 and req.sampling.logprobs is None


def test_completions_default_to_16_tokens_clamped_to_the_context(prompts: Prompts) -> None:
    body = CompletionRequest.model_validate({"prompt": "Hello world"})
    (req,) = prepare_completion(body, prompts, Limits(100)).build()
    assert req.sampling.max_tokens == 16
    n = len(req.prompt_token_ids)
    (req,) = prepare_completion(body, prompts, Limits(n + 5)).build()
    assert req.sampling.max_tokens == 5


def test_fan_out_ids_and_seeds(prompts: Prompts) -> None:
    body = CompletionRequest.model_validate(
        {"prompt": ["a", "b"], "n": 3, "seed": 5, "max_tokens": 2}
    )
    reqs = prepare_completion(body, prompts, Limits(100)).build()
    assert [r.request_id.rsplit("-", 2)[1:] for r in reqs] == [
        [str(p), str(i)] for p in range(2) for i in range(3)
    ]
    assert [r.sampling.seed for r in reqs] == [5, 6, 7, 5, 6, 7]
    assert len({r.request_id for r in reqs}) == 6


def test_chat_logprobs_and_limits(prompts: Prompts) -> None:
    prep = prepare_chat(
        chat(logprobs=True, top_logprobs=3, max_completion_tokens=4), prompts, Limits(100)
    )
    assert prep.logprobs == 3 and prep.build()[0].sampling.max_tokens == 4
    with pytest.raises(APIError) as err:
        prepare_chat(chat(top_logprobs=3), prompts, Limits(100))
    assert err.value.param == "top_logprobs"
    with pytest.raises(APIError) as err:
        prepare_chat(chat(max_tokens=95), prompts, Limits(100))
    assert err.value.status == 400 and "100" in err.value.message
    with pytest.raises(APIError):
        prepare_completion(
            CompletionRequest.model_validate({"prompt": "x", "best_of": 2}), prompts, Limits(100)
        )


def test_unknown_model_is_404() -> None:
    check_model(None, "m")
    check_model("m", "m")
    with pytest.raises(APIError) as err:
        check_model("other", "m")
    assert err.value.status == 404


def test_chat_template_kwargs_are_scalars_and_cannot_replace_the_template(prompts: Prompts) -> None:
    prep = prepare_chat(chat(chat_template_kwargs={"enable_thinking": False}), prompts, Limits(100))
    assert prep.prompts[0].token_ids
    for bad in [{"chat_template": "{{ 1 }}"}, {"x": {"y": 1}}, {"tokenize": True}]:
        with pytest.raises(APIError) as err:
            prepare_chat(chat(chat_template_kwargs=bad), prompts, Limits(100))
        assert err.value.param == "chat_template_kwargs"
    with pytest.raises(APIError) as err:
        prepare_chat(chat(stop=["x" * 5000]), prompts, Limits(100))
    assert err.value.param == "stop"


def test_tools_reasoning_and_constraints_are_prepared(prompts: Prompts) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    prep = prepare_chat(chat(tools=[tool], tool_choice="required"), prompts, Limits(2000))
    assert prep.tools is not None and prep.tools.mode == "required"
    assert "<tools>" in prep.prompts[0].text  # the tiny template has no tools: Hermes system text
    (req,) = prep.build()
    assert req.sampling.structured is not None and req.sampling.structured.kind == "json"
    with pytest.raises(APIError) as err:
        prepare_chat(
            chat(tools=[tool], tool_choice="required", response_format={"type": "json_object"}),
            prompts,
            Limits(2000),
        )
    assert err.value.param == "tool_choice"


def test_default_max_tokens_cap(prompts: Prompts) -> None:
    (req,) = prepare_chat(chat(), prompts, Limits(5000, default_max_tokens=64)).build()
    assert req.sampling.max_tokens == 64
    (req,) = prepare_chat(chat(), prompts, Limits(5000, default_max_tokens=None)).build()
    assert req.sampling.max_tokens == 5000 - len(req.prompt_token_ids)


def test_echo_with_logprobs_scores_the_prompt(prompts: Prompts) -> None:
    body = CompletionRequest.model_validate({"prompt": "a b", "echo": True, "logprobs": 2})
    (req,) = prepare_completion(body, prompts, Limits(100)).build()
    assert req.sampling.prompt_logprobs == 2
