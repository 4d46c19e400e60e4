"""OpenAI's Responses API (`POST /v1/responses`) over the chat path.

A request becomes a `ChatCompletionRequest` (instructions → a system message, input items →
messages, `text.format` → response_format, flat function tools → chat tools), so templating,
constraints, tools and reasoning are the chat path's. The answer is a `response` object with
`message`, `reasoning` and `function_call` output items; streaming sends the typed events
(`response.created` … `response.output_text.delta` … `response.completed`). Stateless: `store`
is accepted only as false-or-unset semantics (nothing is kept), and `previous_response_id` is
refused with a 400.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenfab.frontend.errors import bad_request
from tokenfab.frontend.requests import Prepared
from tokenfab.frontend.responses import ChoiceState, chat_message
from tokenfab.frontend.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionDef,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    TextPart,
    Tool,
    ToolCall,
)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class InputText(_Strict):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutput(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None


InputItem = InputMessage | FunctionCallItem | FunctionCallOutput


class FunctionTool(_Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: str | None = None


class Reasoning(_Strict):
    effort: Literal["minimal", "low", "medium", "high"] | None = None
    summary: str | None = None


class NamedFunctionChoice(_Strict):
    type: Literal["function"]
    name: str


class ResponsesRequest(_Strict):
    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning: Reasoning | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    previous_response_id: str | None = None
    include: list[str] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    service_tier: str | None = None
    top_logprobs: int | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    if req.previous_response_id is not None:
        raise bad_request(
            "previous_response_id is not supported (responses are not stored)",
            "previous_response_id",
        )
    if req.include:
        raise bad_request("include is not supported", "include")
    messages: list[ChatMessage] = []
    if req.instructions:
        messages.append(ChatMessage(role="system", content=req.instructions))
    items = (
        [InputMessage(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    )
    for item in items:
        messages.append(_message(item))
    response_format = None
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type != "text":
        schema = (
            JsonSchemaFormat(name=fmt.name, schema=fmt.schema_, strict=fmt.strict)  # type: ignore[call-arg]
            if fmt.type == "json_schema"
            else None
        )
        response_format = ResponseFormat(type=fmt.type, json_schema=schema)
    tools = [
        Tool(
            type="function",
            function=FunctionDef(
                name=t.name, description=t.description, parameters=t.parameters, strict=t.strict
            ),
        )
        for t in req.tools or []
    ] or None
    choice: Any = req.tool_choice
    if tools is None and choice in ("auto", "none"):
        # The Responses API's default is "auto" whether or not tools are given (clients send
        # it always); with no tools it asks for nothing.
        choice = None
    if isinstance(choice, NamedFunctionChoice):
        choice = NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
    return ChatCompletionRequest(
        model=req.model,
        messages=messages,
        max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stream=req.stream,
        response_format=response_format,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=req.parallel_tool_calls,
        reasoning_effort=req.reasoning.effort if req.reasoning else None,
        logprobs=req.top_logprobs is not None,
        top_logprobs=req.top_logprobs,
        user=req.user,
        top_k=req.top_k,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        frequency_penalty=req.frequency_penalty,
        presence_penalty=req.presence_penalty,
        seed=req.seed,
    )


def _message(item: InputItem) -> ChatMessage:
    if isinstance(item, FunctionCallItem):
        return ChatMessage(
            role="assistant",
            tool_calls=[
                ToolCall(
                    id=item.call_id,
                    function=FunctionCall(name=item.name, arguments=item.arguments),
                )
            ],
        )
    if isinstance(item, FunctionCallOutput):
        return ChatMessage(role="tool", content=item.output, tool_call_id=item.call_id)
    content: str | list[TextPart] = (
        item.content
        if isinstance(item.content, str)
        else [TextPart(type="text", text=p.text) for p in item.content]
    )
    return ChatMessage(role=item.role, content=content)


def _usage(prep: Prepared, states: list[ChoiceState]) -> dict[str, Any]:
    prompt = sum(len(p.token_ids) for p in prep.prompts)
    output = sum(s.num_tokens for s in states)
    cached = states[0].num_cached_tokens if states else 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + output,
    }


def _output_items(prep: Prepared, text: str) -> list[dict[str, Any]]:
    message, _ = chat_message(prep, text)
    items: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        items.append(
            {
                "type": "reasoning",
                "id": f"rs_{uuid.uuid4().hex}",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": message["reasoning_content"]}],
                "status": "completed",
            }
        )
    for call in message["tool_calls"]:
        items.append(
            {
                "type": "function_call",
                "id": f"fc_{uuid.uuid4().hex}",
                "call_id": call["id"],
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"],
                "status": "completed",
            }
        )
    if message["content"] is not None and (message["content"] or not items):
        items.append(_message_item(message["content"]))
    return items


def _message_item(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    return {
        "type": "message",
        "id": item_id or f"msg_{uuid.uuid4().hex}",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]
        if status == "completed"
        else [],
    }


def response_body(
    req: ResponsesRequest,
    prep: Prepared,
    model: str,
    states: list[ChoiceState] | None,
    status: str = "completed",
) -> dict[str, Any]:
    state = states[0] if states else None
    output = _output_items(prep, "".join(state.text)) if state is not None else []
    incomplete = state is not None and state.finish_reason == "length"
    return {
        "id": "resp_" + prep.request_id.split("-", 1)[-1],
        "object": "response",
        "created_at": prep.created,
        "model": model,
        "status": "incomplete" if incomplete else status,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tool_choice": req.tool_choice if isinstance(req.tool_choice, str) else "auto",
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "text": {"format": {"type": "text"}},
        "reasoning": req.reasoning.model_dump() if req.reasoning else None,
        "store": False,
        "metadata": req.metadata or {},
        "usage": _usage(prep, states) if states else None,
    }


class ResponseEvents:
    """The typed SSE events of a streamed response; text deltas go out as they come, the
    items (reasoning, function calls) whole at the end."""

    def __init__(self, req: ResponsesRequest, prep: Prepared, model: str) -> None:
        self.req, self.prep, self.model = req, prep, model
        self.seq = 0
        self.item_id = f"msg_{uuid.uuid4().hex}"
        self.text_open = False

    def event(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: ".encode() + json.dumps(body).encode() + b"\n\n"

    def start(self) -> list[bytes]:
        shell = response_body(self.req, self.prep, self.model, None, "in_progress")
        return [
            self.event("response.created", response=shell),
            self.event("response.in_progress", response=shell),
        ]

    def text_delta(self, delta: str) -> list[bytes]:
        out = []
        if not self.text_open:
            self.text_open = True
            out.append(
                self.event(
                    "response.output_item.added",
                    output_index=0,
                    item=_message_item("", "in_progress", self.item_id),
                )
            )
            out.append(
                self.event(
                    "response.content_part.added",
                    item_id=self.item_id,
                    output_index=0,
                    content_index=0,
                    part={"type": "output_text", "text": "", "annotations": []},
                )
            )
        out.append(
            self.event(
                "response.output_text.delta",
                item_id=self.item_id,
                output_index=0,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return out

    def finish(self, states: list[ChoiceState]) -> list[bytes]:
        body = response_body(self.req, self.prep, self.model, states)
        out = []
        for index, item in enumerate(body["output"]):
            if item["type"] == "message" and self.text_open:
                item["id"] = self.item_id
                text = item["content"][0]["text"]
                out.append(
                    self.event(
                        "response.output_text.done",
                        item_id=self.item_id,
                        output_index=index,
                        content_index=0,
                        text=text,
                        logprobs=[],
                    )
                )
                out.append(
                    self.event(
                        "response.content_part.done",
                        item_id=self.item_id,
                        output_index=index,
                        content_index=0,
                        part=item["content"][0],
                    )
                )
            else:
                out.append(self.event("response.output_item.added", output_index=index, item=item))
                if item["type"] == "function_call":
                    out.append(
                        self.event(
                            "response.function_call_arguments.done",
                            item_id=item["id"],
                            output_index=index,
                            arguments=item["arguments"],
                        )
                    )
            out.append(self.event("response.output_item.done", output_index=index, item=item))
        out.append(self.event("response.completed", response=body))
        return out
