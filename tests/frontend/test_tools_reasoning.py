"""Tool-call parsing (Hermes/Qwen tags, Llama JSON) and the reasoning split, whole and streamed."""

from __future__ import annotations

import json

import pytest

from tokenfab.frontend.reasoning import THINK, ReasoningStream, split_reasoning
from tokenfab.frontend.schemas import Tool
from tokenfab.frontend.tools import ToolPlan, ToolStream, parse_tool_calls

TOOLS = [
    Tool.model_validate({"type": "function", "function": {"name": "get_weather"}}),
    Tool.model_validate({"type": "function", "function": {"name": "get_time"}}),
]
AUTO = ToolPlan("auto", TOOLS)


@pytest.mark.parametrize(
    "text,names,content",
    [
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
            ["get_weather"],
            None,
        ),
        (
            'Sure.<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
            ["get_time"],
            "Sure.",
        ),
        ('{"name": "get_weather", "parameters": {"city": "Rome"}}', ["get_weather"], None),
        ('<|python_tag|>{"name": "get_time", "parameters": {}}', ["get_time"], None),
        (
            '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {}}]',
            ["get_time", "get_weather"],
            None,
        ),
        ('{"name": "unknown_fn", "arguments": {}}', [], '{"name": "unknown_fn", "arguments": {}}'),
        ("just text", [], "just text"),
    ],
)
def test_auto_parsing(text: str, names: list[str], content: str | None) -> None:
    parsed = parse_tool_calls(text, AUTO)
    assert [c["function"]["name"] for c in parsed.calls] == names
    assert parsed.content == content
    for c in parsed.calls:
        assert isinstance(json.loads(c["function"]["arguments"]), dict)


@pytest.mark.parametrize(
    "text",
    [
        'Let me check. <tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}</tool_call>',
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "no tools here, only <tool text",
    ],
)
@pytest.mark.parametrize("step", [1, 3, 7])
def test_streamed_equals_whole(text: str, step: int) -> None:
    stream = ToolStream(AUTO)
    sent = "".join(stream.feed(text[i : i + step]) for i in range(0, len(text), step))
    parsed = stream.finish()
    whole = parse_tool_calls(text, AUTO)
    assert [c["function"] for c in parsed.calls] == [c["function"] for c in whole.calls]
    assert (sent + (parsed.content or "")).strip() == (whole.content or "").strip()


@pytest.mark.parametrize("inside", [False, True])
@pytest.mark.parametrize("step", [1, 2, 5, 100])
def test_reasoning_split_streamed_equals_whole(inside: bool, step: int) -> None:
    text = ("" if inside else "<think>") + "Let me think.\nOK</think>\n\nThe answer is 4."
    whole = split_reasoning(text, THINK, inside)
    assert whole == ("Let me think.\nOK", "The answer is 4.")
    s = ReasoningStream(THINK, inside)
    r, c = "", ""
    for i in range(0, len(text), step):
        dr, dc = s.feed(text[i : i + step])
        r, c = r + dr, c + dc
    dr, dc = s.finish()
    assert (r + dr, (c + dc).lstrip("\n")) == whole


def test_reasoning_absent_or_unfinished() -> None:
    assert split_reasoning("plain answer", THINK, False) == (None, "plain answer")
    assert split_reasoning("<think>still going", THINK, False) == ("still going", "")
