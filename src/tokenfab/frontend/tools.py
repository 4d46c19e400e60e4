"""Tool calling: tools into the prompt, tool_choice into a constraint, model text into tool_calls.

- `auto`: the model decides; its text is parsed for Hermes/Qwen `<tool_call>{...}</tool_call>`
  blocks or a Llama-style bare JSON call (`{"name": ..., "parameters"|"arguments": ...}`, a
  list of them, optionally after `<|python_tag|>`).
- `required`: the output is constrained to a JSON list of calls of the given tools (vLLM's
  way); `named`: to the named function's arguments. Both parse without guessing.
- `none`: tools are left out of the prompt, as OpenAI does.

Templates that know tools get them as `tools=`; others get a Hermes-style system message.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from tokenfab.frontend.errors import bad_request
from tokenfab.frontend.schemas import ChatMessage, NamedToolChoice, Tool
from tokenfab.protocol import StructuredOutput

ToolMode = Literal["none", "auto", "required", "named"]
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"

_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within "
    "<tools></tools> XML tags. You may call one or more functions to assist with the user "
    "query. Don't make assumptions about what values to plug into functions.\n<tools>\n{tools}\n"
    "</tools>\nFor each function call return a JSON object with the function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass
class ToolPlan:
    mode: ToolMode
    tools: list[Tool]
    named: str | None = None
    parallel: bool = True

    def structured(self) -> StructuredOutput | None:
        """The constraint enforcing `required` / a named function."""
        if self.mode == "named":
            fn = next(t.function for t in self.tools if t.function.name == self.named)
            return StructuredOutput(kind="json", spec=json.dumps(_params(fn.parameters)))
        if self.mode != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t.function.name]},
                    "parameters": _params(t.function.parameters),
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutput(kind="json", spec=json.dumps(schema))

    @property
    def in_prompt(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    def template_tools(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def system_prompt(self) -> str:
        specs = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in self.tools)
        return _SYSTEM.format(tools=specs)


def _params(parameters: dict[str, Any] | None) -> dict[str, Any]:
    return parameters if parameters else {"type": "object", "properties": {}}


def plan_tools(
    tools: list[Tool] | None, choice: str | NamedToolChoice | None, parallel: bool | None
) -> ToolPlan | None:
    if choice is not None and not tools and choice != "none":
        raise bad_request(
            "When using `tool_choice`, `tools` must be set."
            if choice != "auto"
            else '"auto" tool choice requires tools to be set',
            "tool_choice",
        )
    if not tools:
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tool function names must be unique", "tools")
    for t in tools:
        if t.function.parameters is not None and not isinstance(t.function.parameters, dict):
            raise bad_request(f"tool {t.function.name}: parameters must be an object", "tools")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise bad_request(
                f"Tool '{choice.function.name}' has not been passed in `tools`.", "tool_choice"
            )
        return ToolPlan("named", tools, choice.function.name, parallel is not False)
    mode: ToolMode = "auto" if choice is None else choice  # type: ignore[assignment]
    return ToolPlan(mode, tools, None, parallel is not False)


def conversation(
    messages: list[ChatMessage], plan: ToolPlan | None, template_knows_tools: bool
) -> list[dict[str, Any]]:
    """Messages as the chat template wants them; tool calls in history written in the
    template's own way, or as Hermes `<tool_call>` text when it has none."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name is not None:
            item["name"] = m.name
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            if template_knows_tools:
                item["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {
                            "name": c.function.name,
                            "arguments": _loads_or_text(c.function.arguments),
                        },
                    }
                    for c in m.tool_calls
                ]
            else:
                blocks = [
                    f"{_OPEN}\n"
                    + json.dumps(
                        {"name": c.function.name, "arguments": _loads_or_text(c.function.arguments)}
                    )
                    + f"\n{_CLOSE}"
                    for c in m.tool_calls
                ]
                item["content"] = "\n".join(filter(None, [item["content"], *blocks]))
        out.append(item)
    if plan is not None and plan.in_prompt and not template_knows_tools:
        system = plan.system_prompt()
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


@dataclass
class ParsedTools:
    content: str | None
    calls: list[dict[str, Any]] = field(default_factory=list)


def _call(name: str, arguments: Any, index: int) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "index": index,
        "function": {"name": name, "arguments": args},
    }


def parse_tool_calls(text: str, plan: ToolPlan) -> ParsedTools:
    """The tool calls in a choice's whole text (and the text left as content)."""
    if plan.mode == "named":
        assert plan.named is not None
        return ParsedTools(None, [_call(plan.named, text.strip(), 0)])
    if plan.mode == "required":
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return ParsedTools(text)  # cut short by max_tokens: the text is all there is
        return ParsedTools(
            None,
            [_call(c["name"], c.get("parameters", {}), i) for i, c in enumerate(items)],
        )
    if plan.mode != "auto":
        return ParsedTools(text)
    return _parse_auto(text, {t.function.name for t in plan.tools})


def _parse_auto(text: str, names: set[str]) -> ParsedTools:
    if _OPEN in text:
        content_parts, calls = [], []
        rest = text
        while _OPEN in rest:
            before, _, after = rest.partition(_OPEN)
            body, closed, rest = after.partition(_CLOSE)
            call = _json_call(body, names)
            if call is None:  # not a call after all: keep the text
                content_parts.append(before + _OPEN + body + (_CLOSE if closed else ""))
                continue
            content_parts.append(before)
            calls.append(_call(call[0], call[1], len(calls)))
        content_parts.append(rest)
        content = "".join(content_parts).strip() or None
        return ParsedTools(content, calls) if calls else ParsedTools(text)
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG) :].strip()
    if body[:1] in ("{", "["):
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return ParsedTools(text)
        items = value if isinstance(value, list) else [value]
        found = [_as_call(v, names) for v in items]
        if found and all(c is not None for c in found):
            return ParsedTools(
                None, [_call(c[0], c[1], i) for i, c in enumerate(found) if c is not None]
            )
    return ParsedTools(text)


def _json_call(body: str, names: set[str]) -> tuple[str, Any] | None:
    try:
        return _as_call(json.loads(body), names)
    except json.JSONDecodeError:
        return None


def _as_call(value: Any, names: set[str]) -> tuple[str, Any] | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    return str(value["name"]), args


class ToolStream:
    """A streamed choice under tools: content passes through until a call may have begun
    (a `<tool_call>` tag, or text opening with `{`, `[` or `<|python_tag|>`); from there the
    text is held and parsed whole when the choice finishes."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.sent = 0
        self.holding = plan.mode in ("named", "required")

    def feed(self, delta: str) -> str:
        """Content that can be sent now."""
        self.text += delta
        if self.holding:
            return ""
        unsent = self.text[self.sent :]
        if self.sent == 0:
            head = unsent.lstrip()
            if not head or _PYTHON_TAG.startswith(head):
                return ""  # a call may still begin here
            if head[0] in "{[" or head.startswith(_PYTHON_TAG):
                self.holding = True
                return ""
        at = unsent.find(_OPEN)
        if at >= 0:
            self.holding = True
            self.sent += at
            return unsent[:at]
        out = unsent[: len(unsent) - _partial_suffix(unsent, _OPEN)]
        self.sent += len(out)
        return out

    def finish(self) -> ParsedTools:
        """The held text parsed: content still to send and the tool calls."""
        return parse_tool_calls(self.text[self.sent :], self.plan)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
