"""OpenAI/vLLM API parity on a tiny model with the official `openai` client: structured
outputs, forced tool calls (streamed and not), logit_bias, echo + logprobs scored as
transformers scores the prompt, vLLM extras, the one field policy, /v1/responses."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
import torch

pytestmark = pytest.mark.integration

SERVER_ENGINE = {"dtype": "float32", "max_model_len": 1024, "max_num_batched_tokens": 1024}
MSG = [{"role": "user", "content": "hello there"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client: openai.OpenAI, server, **kw):
    kw.setdefault("messages", MSG)
    kw.setdefault("max_tokens", 40)
    return client.chat.completions.create(model=server.model, **kw)


# ------------------------------------------------------------------ structured outputs


def test_json_schema_response_format_validates(client: openai.OpenAI, server) -> None:
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    for temperature in (0.0, 1.0):
        r = chat(
            client,
            server,
            temperature=temperature,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": True},
            },
        )
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        assert r.choices[0].finish_reason == "stop"


def test_structured_outputs_regex_choice_grammar(client: openai.OpenAI, server) -> None:
    cases = [
        ({"regex": r"[0-9]{2}-[ab]"}, r"[0-9]{2}-[ab]"),
        ({"choice": ["left", "right"]}, r"left|right"),
        ({"grammar": 'root ::= "yes" | "no"'}, r"yes|no"),
    ]
    for so, pattern in cases:
        r = chat(client, server, temperature=1.0, extra_body={"structured_outputs": so})
        assert re.fullmatch(pattern, r.choices[0].message.content), (
            so,
            r.choices[0].message.content,
        )
        c = client.completions.create(
            model=server.model, prompt="x", max_tokens=20, extra_body={"structured_outputs": so}
        )
        assert re.fullmatch(pattern, c.choices[0].text)


def test_json_object_streamed(client: openai.OpenAI, server) -> None:
    stream = chat(
        client,
        server,
        max_tokens=60,
        temperature=0,
        stream=True,
        response_format={"type": "json_object"},
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("{")


@pytest.mark.parametrize(
    "body,param",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "wat"}},
                }
            },
            "response_format",
        ),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: nope_rule"}}, "structured_outputs"),
        ({"guided_json": "{not json"}, "guided_json"),
    ],
)
def test_bad_constraints_are_400(server, body: dict, param: str) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MSG, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == 400 and err["type"] == "BadRequestError"


# ------------------------------------------------------------------ tools


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_returns_a_valid_call(
    client: openai.OpenAI, server, stream: bool
) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(tools=[WEATHER, TIME], tool_choice=choice, temperature=1.0, stream=stream)
    r = chat(client, server, **kw)
    if stream:
        calls, reasons = {}, []
        for c in r:
            if not c.choices:
                continue
            for d in c.choices[0].delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"name": "", "arguments": "", "id": None})
                slot["id"] = slot["id"] or d.id
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
            reasons.append(c.choices[0].finish_reason)
        assert len(calls) == 1 and calls[0]["id"]
        name, args = calls[0]["name"], calls[0]["arguments"]
        assert reasons[-1] == "tool_calls"
    else:
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and len(msg.tool_calls) == 1
        assert msg.tool_calls[0].id and msg.tool_calls[0].type == "function"
        name, args = msg.tool_calls[0].function.name, msg.tool_calls[0].function.arguments
    assert name == "get_weather"
    parsed = json.loads(args)
    assert parsed["city"] in ("Paris", "Rome") and parsed["unit"] in ("c", "f")


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice(client: openai.OpenAI, server, stream: bool) -> None:
    kw = dict(
        tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, max_tokens=200
    )
    if not stream:
        r = chat(client, server, temperature=0.7, seed=3, **kw)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls"
    else:
        chunks = list(chat(client, server, temperature=0.7, seed=3, stream=True, **kw))
        calls = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(calls[0].function.arguments), dict)


def test_tool_call_history_is_accepted(client: openai.OpenAI, server) -> None:
    messages = [
        *MSG,
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"zone": "utc"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    r = chat(client, server, messages=messages, tools=[TIME], tool_choice="none", max_tokens=4)
    assert r.choices[0].message.tool_calls in (None, [])


def test_tool_choice_unknown_function_is_400(client: openai.OpenAI, server) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(
            client,
            server,
            tools=[TIME],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert e.value.body["param"] == "tool_choice"


# ------------------------------------------------------------------ logit_bias, logprobs


def test_logit_bias_bans_and_forces(client: openai.OpenAI, server) -> None:
    base = chat(
        client, server, max_tokens=1, temperature=0, logprobs=True, extra_body={"ignore_eos": True}
    )
    first = base.choices[0].logprobs.content[0].token
    tok_id = client.completions.create(
        model=server.model,
        prompt="x",
        max_tokens=1,
        extra_body={"return_tokens_as_token_ids": True},
        logprobs=0,
        temperature=0,
    )
    assert tok_id.choices[0].logprobs.tokens[0].startswith("token_id:")
    banned_id = _first_token_id(client, server)
    r = chat(
        client,
        server,
        max_tokens=1,
        temperature=0,
        logit_bias={str(banned_id): -100},
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].message.content != first
    forced = chat(
        client,
        server,
        max_tokens=5,
        temperature=1.0,
        logit_bias={"42": 100},
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        logprobs=True,
    )
    assert [t.token for t in forced.choices[0].logprobs.content] == ["token_id:42"] * 5


def _first_token_id(client: openai.OpenAI, server) -> int:
    r = chat(
        client,
        server,
        max_tokens=1,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    return int(r.choices[0].logprobs.content[0].token.split(":")[1])


def _token_ids(r) -> list[int]:
    return [int(t.token.split(":")[1]) for t in r.choices[0].logprobs.content]


def test_echo_logprobs_equal_transformers_scoring(client: openai.OpenAI, server) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "the quick brown fox jumps"
    r = client.completions.create(
        model=server.model,
        prompt=prompt,
        max_tokens=1,
        echo=True,
        logprobs=1,
        temperature=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    lp = r.choices[0].logprobs
    tok = AutoTokenizer.from_pretrained(server.thread.engine_config.model)
    ids = tok.encode(prompt)
    hf = AutoModelForCausalLM.from_pretrained(
        server.thread.engine_config.model, dtype=torch.float32
    )
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1)
    assert [int(t.split(":")[1]) for t in lp.tokens[: len(ids)]] == ids
    assert lp.token_logprobs[0] is None
    for pos in range(1, len(ids)):
        assert abs(lp.token_logprobs[pos] - ref[pos - 1, ids[pos]].item()) < 1e-4
    assert len(lp.tokens) == len(ids) + 1


def test_prompt_logprobs_extra(client: openai.OpenAI, server) -> None:
    r = client.completions.create(
        model=server.model, prompt="a b c d", max_tokens=1, extra_body={"prompt_logprobs": 2}
    )
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and all(len(x) >= 2 for x in plp[1:])
    c = chat(client, server, max_tokens=1, extra_body={"prompt_logprobs": 0})
    assert c.model_extra["prompt_logprobs"][0] is None


# ------------------------------------------------------------------ vLLM extras, policy


def test_min_tokens_and_continuous_usage(client: openai.OpenAI, server) -> None:
    stream = chat(
        client,
        server,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"min_tokens": 6},
    )
    chunks = list(stream)
    assert all(c.usage is not None for c in chunks)
    assert chunks[-1].usage.completion_tokens == 6


def test_negative_seed_is_accepted(client: openai.OpenAI, server) -> None:
    a = chat(client, server, max_tokens=4, temperature=1.0, seed=-5)
    b = chat(client, server, max_tokens=4, temperature=1.0, seed=-5)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_default_max_tokens_is_capped(client: openai.OpenAI, server) -> None:
    r = chat(client, server, max_tokens=None, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens <= 1024


@pytest.mark.parametrize(
    "field,value",
    [
        ("bogus_field", 1),
        ("use_beam_search", True),
        ("functions", [{"name": "f"}]),
        ("logits_processors", ["x"]),
        ("priority", 3),
        ("audio", {"voice": "x"}),
        ("suffix_typo", "x"),
    ],
)
def test_unknown_or_unsupported_fields_are_400_naming_them(
    server, field: str, value: object
) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": MSG, field: value}, timeout=30
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]
    assert err["code"] == 400 and err["type"] == "BadRequestError"


def test_stream_options_need_stream(server) -> None:
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "x", "stream_options": {"include_usage": True}},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


# ------------------------------------------------------------------ /v1/responses


def test_responses_api(client: openai.OpenAI, server) -> None:
    r = client.responses.create(
        model=server.model, input="hi", max_output_tokens=8, instructions="Be brief."
    )
    assert r.object == "response" and r.output_text and r.usage.output_tokens <= 8
    events = list(
        client.responses.create(model=server.model, input="hi", max_output_tokens=8, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text


def test_responses_structured_and_tools(client: openai.OpenAI, server) -> None:
    r = client.responses.create(
        model=server.model,
        input="weather?",
        tools=[{"type": "function", **WEATHER["function"]}],
        tool_choice="required",
        max_output_tokens=200,
    )
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and json.loads(calls[0].arguments)["city"]
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=server.model, input="x", previous_response_id="resp_1")


def test_return_token_ids_and_truncation_side(client: openai.OpenAI, server) -> None:
    ids = list(range(10, 18))
    for side, kept in (("right", ids[:4]), ("left", ids[-4:])):
        r = client.completions.create(
            model=server.model,
            prompt=ids,
            max_tokens=3,
            temperature=0,
            extra_body={
                "return_token_ids": True,
                "truncate_prompt_tokens": 4,
                "truncation_side": side,
                "ignore_eos": True,
            },
        )
        choice = r.choices[0]
        assert choice.prompt_token_ids == kept
        assert len(choice.token_ids) == 3 and r.usage.prompt_tokens == 4
        assert choice.prompt_logprobs is None


def test_continuous_usage_needs_include_usage(client: openai.OpenAI, server) -> None:
    def usages(include: bool) -> list:
        stream = client.completions.create(
            model=server.model,
            prompt="x",
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": include, "continuous_usage_stats": True},
        )
        return [c.usage for c in stream]

    assert all(u is None for u in usages(False))
    assert all(u is not None for u in usages(True))


def test_responses_default_tool_choice_and_penalties(client: openai.OpenAI, server) -> None:
    # Clients send tool_choice "auto" with no tools; penalties are honoured as in chat.
    r = client.responses.create(
        model=server.model,
        input="hi",
        max_output_tokens=4,
        tool_choice="auto",
        extra_body={"frequency_penalty": 1.0, "presence_penalty": 0.5},
    )
    assert r.status in ("completed", "incomplete") and r.usage.output_tokens <= 4
    assert client.models.retrieve(server.model).root == server.model


def test_allowed_token_ids_confine_sampling(client: openai.OpenAI, server) -> None:
    allowed = [5, 42, 77]
    for temperature in (0.0, 1.0):
        r = chat(
            client,
            server,
            max_tokens=12,
            temperature=temperature,
            logprobs=True,
            extra_body={
                "allowed_token_ids": allowed,
                "ignore_eos": True,
                "return_tokens_as_token_ids": True,
            },
        )
        got = _token_ids(r)
        assert len(got) == 12 and set(got) <= set(allowed), got
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, server, extra_body={"allowed_token_ids": [10**9]})
    assert e.value.body["param"] == "allowed_token_ids"


def test_bad_words_are_never_generated(client: openai.OpenAI, server) -> None:
    from transformers import AutoTokenizer

    kw = dict(max_tokens=8, temperature=0, logprobs=True)
    extra = {"ignore_eos": True, "return_tokens_as_token_ids": True}
    base = _token_ids(chat(client, server, **kw, extra_body=extra))
    tok = AutoTokenizer.from_pretrained(server.thread.engine_config.model)
    word = tok.decode([base[0]])
    r = chat(client, server, **kw, extra_body={**extra, "bad_words": [word]})
    got = _token_ids(r)
    assert got[0] != base[0]
    for spelling in (word.strip(), " " + word.strip()):
        ids = tok.encode(spelling, add_special_tokens=False)
        if len(ids) == 1:
            assert ids[0] not in got, (spelling, got)


# ------------------------------------------------------------------ beam search
def test_beam_search_returns_distinct_beams_per_prompt(client: openai.OpenAI, server) -> None:
    # The tiny model's tokens are bytes that often decode alike: compare token ids.
    body = {"use_beam_search": True, "ignore_eos": True, "return_token_ids": True}
    prompts = ["Hello, my name is"] * 2
    r = client.completions.create(
        model=server.model, prompt=prompts, n=2, max_tokens=5, temperature=0.0, extra_body=body
    )
    beams = [c.model_extra["token_ids"] for c in r.choices]
    assert len(beams) == 4 and all(len(b) == 5 for b in beams)
    assert beams[0] != beams[1], "two beams of one prompt must differ"
    assert beams[:2] == beams[2:], "the same prompt gives the same beams"
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 4 * 5
    again = client.completions.create(
        model=server.model, prompt=prompts[0], n=2, max_tokens=5, temperature=0.0, extra_body=body
    )
    assert [c.model_extra["token_ids"] for c in again.choices] == beams[:2]


def test_beam_search_refuses_streaming(server) -> None:
    r = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "x", "n": 2, "use_beam_search": True, "stream": True},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
