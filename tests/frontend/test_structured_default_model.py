"""JSON-schema output on the default model (SmolLM2-135M-Instruct) through `tokenfab serve`'s
stack and the official `openai` client: every answer parses and validates against its schema."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from tokenfab.config import EngineConfig, ServerConfig
from tokenfab.serve.server import ServerThread

pytestmark = [pytest.mark.integration, pytest.mark.slow]

S = {"type": "string", "maxLength": 40}
I = {"type": "integer", "minimum": 0, "maximum": 1000}  # noqa: E741


def obj(props: dict, required: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


def arr(items: dict, lo: int = 1, hi: int = 4) -> dict:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


SCHEMAS: list[tuple[str, dict]] = [
    ("a person", obj({"name": S, "age": I})),
    ("a city", obj({"name": S, "country": S, "population": I})),
    ("a book", obj({"title": S, "author": S, "year": I, "genres": arr(S)})),
    ("a colour choice", obj({"colour": {"enum": ["red", "green", "blue"]}})),
    ("a yes/no answer", obj({"answer": {"type": "boolean"}, "reason": S})),
    ("a shopping list", obj({"items": arr(obj({"item": S, "qty": I}), 1, 3)})),
    ("an address", obj({"street": S, "city": S, "zip": {"type": "string", "pattern": "[0-9]{5}"}})),
    ("a movie rating", obj({"movie": S, "stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]}})),
    ("a temperature", obj({"value": {"type": "number"}, "unit": {"enum": ["C", "F"]}})),
    (
        "a team",
        obj({"team": S, "members": arr(obj({"name": S, "role": {"enum": ["lead", "dev"]}}))}),
    ),
    ("a nested company", obj({"company": obj({"name": S, "hq": obj({"city": S, "country": S})})})),
    ("tags", obj({"tags": arr({"enum": ["a", "b", "c"]}, 1, 3)})),
    ("a point", obj({"x": {"type": "number"}, "y": {"type": "number"}})),
    ("a recipe", obj({"dish": S, "steps": arr(S, 1, 3), "vegan": {"type": "boolean"}})),
    ("an event", obj({"event": S, "day": {"enum": ["mon", "tue", "wed"]}, "hour": I})),
    ("optional fields", obj({"name": S, "nickname": S}, required=["name"])),
    ("a matrix", obj({"rows": arr(arr({"type": "integer"}, 1, 3), 1, 3)})),
    ("a nullable note", obj({"note": {"anyOf": [S, {"type": "null"}]}})),
    ("a pet", obj({"species": {"enum": ["cat", "dog"]}, "age": I, "owner": obj({"name": S})})),
    (
        "a scoreboard",
        obj({"scores": arr(obj({"player": S, "points": I}), 1, 3), "final": {"type": "boolean"}}),
    ),
]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    cfg = EngineConfig(num_kv_blocks=2048, max_model_len=2048)
    srv = ServerThread(cfg, ServerConfig(port=0, engine_processes=True))
    srv.start()
    try:
        yield srv.url
    finally:
        srv.stop()


def test_twenty_schemas_validate(url: str) -> None:
    async def one(
        client: openai.AsyncOpenAI, model: str, topic: str, schema: dict
    ) -> tuple[str, str]:
        r = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Describe {topic} as JSON."}],
            max_tokens=400,
            temperature=0,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "out", "schema": schema, "strict": True},
            },
        )
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    async def main() -> list[tuple[str, str]]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)
        model = (await client.models.list()).data[0].id
        return await asyncio.gather(*(one(client, model, t, s) for t, s in SCHEMAS))

    results = asyncio.run(main())
    for (topic, schema), (text, reason) in zip(SCHEMAS, results, strict=True):
        assert reason == "stop", (topic, text)
        jsonschema.validate(json.loads(text), schema)
