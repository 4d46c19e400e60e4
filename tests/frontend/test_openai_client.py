"""The official `openai` client, sync and async, against a real server on a tiny model."""

from __future__ import annotations

import asyncio

import openai
import pytest

pytestmark = pytest.mark.integration

SERVER_CONFIG = {"workers": 2}
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
LONG = {"ignore_eos": True}
EXTRA = {"ignore_eos": True, "top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(client: openai.OpenAI, server) -> None:
    assert [m.id for m in client.models.list().data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_non_streaming(client: openai.OpenAI, server) -> None:
    r = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=7, temperature=0, extra_body=LONG
    )
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7 and r.usage.prompt_tokens > 5


def test_chat_greedy_is_deterministic_and_max_completion_tokens(
    client: openai.OpenAI, server
) -> None:
    kw = dict(model=server.model, messages=MESSAGES, temperature=0, extra_body=LONG)
    a = client.chat.completions.create(max_completion_tokens=6, **kw)
    b = client.chat.completions.create(max_tokens=6, **kw)
    assert a.usage.completion_tokens == 6
    assert a.choices[0].message.content == b.choices[0].message.content


def test_chat_streaming_with_usage(client: openai.OpenAI, server) -> None:
    stream = client.chat.completions.create(
        model=server.model,
        messages=MESSAGES,
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=LONG,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    full = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=9, temperature=0, extra_body=LONG
    )
    assert text == full.choices[0].message.content


def test_chat_stream_finish_chunk_carries_content(client: openai.OpenAI, server) -> None:
    """A finish with no text left (here a stop string at the answer's first character)
    still sends `delta.content` as a string, "" as vLLM does: SGLang's chat-stream test reads
    it."""
    kw = dict(model=server.model, messages=MESSAGES, temperature=0)
    plain = client.chat.completions.create(max_tokens=8, extra_body=LONG, **kw)
    stop = plain.choices[0].message.content[:1]
    assert stop
    chunks = list(client.chat.completions.create(stream=True, stop=[stop], max_tokens=8, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1].choices[0]
    assert last.finish_reason == "stop"
    assert [c.choices[0].delta.content for c in chunks[1:]] == [""] * (len(chunks) - 1)


def test_chat_stream_n2_each_choice_opens_with_its_role(client: openai.OpenAI, server) -> None:
    """With n=2 each choice's first chunk is its own role chunk (clients read `choices[0]`
    of each chunk, as SGLang's chat-stream test does)."""
    stream = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=4, n=2, seed=3, temperature=1.0,
        stream=True, extra_body=LONG,
    )  # fmt: skip
    firsts: dict[int, openai.types.chat.ChatCompletionChunk] = {}
    for c in stream:
        assert len(c.choices) == 1
        firsts.setdefault(c.choices[0].index, c)
    assert sorted(firsts) == [0, 1]
    assert all(c.choices[0].delta.role == "assistant" for c in firsts.values())


def test_chat_n_seed_and_logprobs(client: openai.OpenAI, server) -> None:
    r = client.chat.completions.create(
        model=server.model,
        messages=MESSAGES,
        max_tokens=5,
        n=3,
        seed=7,
        temperature=1.0,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logprobs=True,
        top_logprobs=2,
        extra_body=EXTRA,
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 15
    for c in r.choices:
        assert len(c.logprobs.content) == 5
        for entry in c.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
    again = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=5, n=3, seed=7, temperature=1.0,
        top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, extra_body=EXTRA,
    )  # fmt: skip
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_completions_echo_logprobs_and_stop(client: openai.OpenAI, server) -> None:
    r = client.completions.create(
        model=server.model, prompt="Hello world", max_tokens=4, temperature=0, echo=True,
        logprobs=2, extra_body=LONG,
    )  # fmt: skip
    c = r.choices[0]
    assert c.text.startswith("Hello world") and c.finish_reason == "length"
    lp = c.logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens + 4
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[-4:])
    assert lp.text_offset == sorted(lp.text_offset)
    # a stop string cut from the greedy continuation ends the request with "stop"
    plain = client.completions.create(
        model=server.model, prompt="Hello world", max_tokens=8, temperature=0, extra_body=LONG
    ).choices[0].text  # fmt: skip
    stop = plain[2:4]
    assert stop.strip()
    cut = client.completions.create(
        model=server.model, prompt="Hello world", max_tokens=8, temperature=0, stop=[stop],
        extra_body=LONG,
    ).choices[0]  # fmt: skip
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert plain.startswith(cut.text)
    assert cut.model_extra["stop_reason"] == stop  # vLLM's field: which stop string hit


def test_completions_streaming_batch_prompts(client: openai.OpenAI, server) -> None:
    stream = client.completions.create(
        model=server.model, prompt=["Once upon a time", "Hello"], max_tokens=3, n=2,
        stream=True, stream_options={"include_usage": True}, extra_body=LONG,
    )  # fmt: skip
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for ch in stream:
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert sorted(finish) == [0, 1, 2, 3] and set(finish.values()) == {"length"}
    assert usage.completion_tokens == 12
    assert usage.prompt_tokens > 3


def test_context_length_error_has_the_numbers(client: openai.OpenAI, server) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=server.model, prompt=[5] * 600, max_tokens=1)
    assert "512" in str(err.value) and "600" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=server.model, prompt=[5] * 10, max_tokens=510)
    assert "520" in str(err.value)


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES, max_tokens=2)
    assert err.value.body["code"] == 404


async def test_async_client_chat_and_completions(server) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60
    ) as client:
        r = await client.chat.completions.create(
            model=server.model, messages=MESSAGES, max_tokens=4, extra_body=LONG
        )
        assert r.usage.completion_tokens == 4
        stream = await client.completions.create(
            model=server.model, prompt="The quick brown fox", max_tokens=5, stream=True,
            extra_body=LONG,
        )  # fmt: skip
        pieces = [c async for c in stream]
        assert pieces[-1].choices[0].finish_reason == "length"
        assert sum(1 for c in pieces if c.choices[0].text) >= 1


async def test_64_concurrent_streams_all_finish_with_right_counts(server) -> None:
    lengths = [8 + (i % 5) * 4 for i in range(64)]

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str]:
        stream = await client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": f"Count to {i}, please."}],
            max_tokens=lengths[i],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=LONG,
        )
        usage, finish = None, None
        async for ch in stream:
            if ch.usage:
                usage = ch.usage
            if ch.choices and ch.choices[0].finish_reason:
                finish = ch.choices[0].finish_reason
        return i, usage.completion_tokens, finish

    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120
    ) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(64)))
    assert [(i, n, f) for i, n, f in results] == [(i, lengths[i], "length") for i in range(64)]
    assert server.wait_metric("tokenfab_num_requests_running", 0) == 0
    assert (
        server.metric('tokenfab_http_requests_total{endpoint="/v1/chat/completions",status="200"}')
        >= 64
    )
