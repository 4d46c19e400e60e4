"""Bad input gets an OpenAI-style 4xx error and nothing else breaks.

One policy for fields: every field is honoured or rejected with a 400 naming it; unknown fields
are rejected too (nothing is silently dropped). Errors are shaped as vLLM's (type
`BadRequestError`, code 400).
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

SERVER_CONFIG = {"max_body_bytes": 64 * 1024}
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def assert_error(r: httpx.Response, status: int, param: str | None = "*") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text
    if param != "*":
        assert err["param"] == param
    return err


def test_malformed_json(http: httpx.Client) -> None:
    for raw in [b'{"messages": [', b"not json", b"", b'{"messages": [{"role": "user"}]}}']:
        r = http.post(CHAT, content=raw, headers={"content-type": "application/json"})
        err = assert_error(r, 400)
        assert err["type"] == "BadRequestError" and err["code"] == 400


def test_body_must_be_an_object_with_messages(http: httpx.Client) -> None:
    assert_error(http.post(CHAT, json=[1, 2]), 400)
    assert_error(http.post(CHAT, json={"max_tokens": 2}), 400, "messages")
    assert_error(http.post(CHAT, json={"messages": []}), 400, "messages")
    assert_error(http.post("/v1/completions", json={"prompt": ""}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={"prompt": []}), 400, "prompt")


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", "5"),
        ("max_tokens", 2.5),
        ("temperature", "hot"),
        ("stream", 1),
        ("n", True),
        ("stop", 5),
        ("messages", "hi"),
        ("seed", [1]),
        ("stream_options", "yes"),
    ],
)
def test_wrong_types(http: httpx.Client, field: str, value: object) -> None:
    body = {"messages": MSG, "max_tokens": 2, field: value}
    err = assert_error(http.post(CHAT, json=body), 400)
    assert err["param"] == field and field in err["message"]


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("max_tokens", 10**30),
        ("max_completion_tokens", 100000),
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("n", 0),
        ("n", 10**6),
        ("seed", 2**80),
        ("presence_penalty", 5.0),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("top_k", -5),
        ("top_k", 2**40),
        ("min_p", 2.0),
        ("top_logprobs", 30),
        ("stop", [""]),
        ("stop", ["x"] * 100),
        ("stop_token_ids", [-1]),
        ("min_tokens", -1),
        ("logit_bias", {"5": 500.0}),
        ("logit_bias", {"x": 1.0}),
        ("tool_choice", "required"),
        ("response_format", {"type": "json_schema"}),
        ("prompt_logprobs", 50),
    ],
)
def test_out_of_range_values(http: httpx.Client, field: str, value: object) -> None:
    body = {"messages": MSG, "max_tokens": 2, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    err = assert_error(http.post(CHAT, json=body), 400)
    assert field in err["message"] or "context length" in err["message"]


def test_non_finite_numbers(http: httpx.Client) -> None:
    for literal in ["NaN", "Infinity", "-Infinity", "1e999"]:
        raw = (
            '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": %s}'
        )
        r = http.post(CHAT, content=(raw % literal).encode())
        assert_error(r, 400)


def test_unknown_fields_are_rejected_by_name(http: httpx.Client) -> None:
    body = {"messages": MSG, "max_tokens": 2, "frobnicate": {"a": [1]}, "user": "u"}
    err = assert_error(http.post(CHAT, json=body), 400, "frobnicate")
    assert "frobnicate" in err["message"]


def test_token_ids_outside_the_vocabulary(http: httpx.Client) -> None:
    err = assert_error(
        http.post("/v1/completions", json={"prompt": [1, 10**6], "max_tokens": 1}), 400
    )
    assert "vocabulary" in err["message"]
    assert_error(http.post("/v1/completions", json={"prompt": [-1], "max_tokens": 1}), 400)


def test_invalid_utf8(http: httpx.Client) -> None:
    raw = b'{"messages": [{"role": "user", "content": "caf\xe9 \xff"}], "max_tokens": 2}'
    err = assert_error(http.post(CHAT, content=raw), 400)
    assert "UTF-8" in err["message"]


def test_oversized_bodies(http: httpx.Client) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "a" * 100_000}]}).encode()
    err = assert_error(http.post(CHAT, content=big), 413)
    assert "65536" in err["message"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    assert_error(http.post(CHAT, content=chunks()), 413)


def test_unknown_routes_and_methods(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get(CHAT), 405)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
    "stream", "stream_options", "stop", "seed", "presence_penalty", "frequency_penalty",
    "logprobs", "top_logprobs", "top_k", "min_p", "repetition_penalty", "ignore_eos",
    "min_tokens", "stop_token_ids", "prompt", "echo", "best_of", "logit_bias", "response_format",
]  # fmt: skip
small_ints = st.integers(-3, 3) | st.sampled_from([0, 2**31, 2**63, -(2**63), 10**20])
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "robot"]) | json_values},
        optional={"content": st.text(max_size=40) | json_values},
    ),
    max_size=3,
)
bodies = st.fixed_dictionaries(
    {
        "max_tokens": small_ints,
        "messages": messages | json_values,
        "prompt": st.text(max_size=30) | json_values,
    },
    optional={f: json_values for f in FIELDS if f not in ("max_tokens", "messages", "prompt")}
    | {"n": small_ints, "max_completion_tokens": small_ints},
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from([CHAT, "/v1/completions"]), body=bodies)
def test_fuzz_never_5xx(server, path: str, body: dict) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        raw = json.dumps(body, allow_nan=True).encode()
        r = http.post(path, content=raw)
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200))
def test_fuzz_raw_bytes_never_5xx(server, raw: bytes) -> None:
    r = httpx.post(f"{server.url}{CHAT}", content=raw, timeout=60)
    assert r.status_code == 400 and "error" in r.json()


def test_server_still_serves_after_all_that(http: httpx.Client, server) -> None:
    assert http.get("/health").json()["status"] == "ok"
    r = http.post(CHAT, json={"messages": MSG, "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert server.metric("tokenfab_http_requests_total", status="500") == 0
    assert server.wait_metric("tokenfab_num_requests_running", 0) == 0
