"""OpenAI response bodies: chat and text completions, their stream chunks, logprobs, usage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenfab.frontend.prompts import Prompts
from tokenfab.frontend.reasoning import split_reasoning
from tokenfab.frontend.requests import Prepared
from tokenfab.frontend.tools import parse_tool_calls
from tokenfab.protocol import GenerateOutput, PositionLogprobs


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the choice (vLLM's field)."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    text_len: int = 0
    """Characters emitted so far (text_offset of completions logprobs)."""
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    token_ids: list[int] = field(default_factory=list)

    def add(self, out: GenerateOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.text:
            self.text.append(out.text)
        self.num_tokens += len(out.token_ids)
        self.token_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.num_prompt_tokens:
            self.num_prompt_tokens = out.num_prompt_tokens
            self.num_cached_tokens = out.num_cached_tokens
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason


def usage(prep: Prepared, states: list[ChoiceState]) -> dict[str, Any]:
    prompt = sum(len(p.token_ids) for p in prep.prompts)
    completion = sum(s.num_tokens for s in states)
    # Cached prompt tokens of the first choice of each prompt (the prompt is counted once).
    cached = sum(states[p * prep.n].num_cached_tokens for p in range(len(prep.prompts)))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def token_str(prompts: Prompts, token_id: int, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else prompts.token_text(token_id)


def _token_entry(prompts: Prompts, token_id: int, logprob: float, as_ids: bool) -> dict[str, Any]:
    text = token_str(prompts, token_id, as_ids)
    return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    prompts: Prompts, entries: list[PositionLogprobs], as_ids: bool = False
) -> dict[str, Any]:
    content = []
    for e in entries:
        item = _token_entry(prompts, e.token_id, e.logprob, as_ids)
        item["top_logprobs"] = [_token_entry(prompts, t.token_id, t.logprob, as_ids) for t in e.top]
        content.append(item)
    return {"content": content}


def prompt_logprobs_body(
    prompts: Prompts, entries: list[PositionLogprobs | None] | None, as_ids: bool = False
) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt position, null for the first, else a map token id
    -> {logprob, rank, decoded_token} holding the prompt token and the top alternatives."""
    if entries is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        item: dict[str, dict[str, Any]] = {}
        for rank, t in enumerate(e.top, start=1):
            item[str(t.token_id)] = {
                "logprob": t.logprob,
                "rank": rank,
                "decoded_token": token_str(prompts, t.token_id, as_ids),
            }
        item.setdefault(
            str(e.token_id),
            {
                "logprob": e.logprob,
                "rank": 1 + sum(t.logprob > e.logprob for t in e.top) if e.top else None,
                "decoded_token": token_str(prompts, e.token_id, as_ids),
            },
        )
        out.append(item)
    return out


def completion_logprobs(
    prompts: Prompts,
    entries: list[PositionLogprobs],
    offset: int,
    echo_ids: list[int] = (),
    echo_logprobs: list[PositionLogprobs | None] | None = None,
    as_ids: bool = False,
) -> dict[str, Any]:
    """Legacy completions format. Echoed prompt tokens carry the prompt's scores (the first
    token has none)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for pos, tid in enumerate(echo_ids):
        text = token_str(prompts, tid, as_ids)
        scored = echo_logprobs[pos] if echo_logprobs and pos < len(echo_logprobs) else None
        tokens.append(text)
        token_logprobs.append(None if scored is None else scored.logprob)
        top.append(None if scored is None else _alternatives(prompts, scored, text, as_ids))
        offsets.append(offset)
        offset += len(text)
    for e in entries:
        text = token_str(prompts, e.token_id, as_ids)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        top.append(_alternatives(prompts, e, text, as_ids))
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _alternatives(
    prompts: Prompts, e: PositionLogprobs, text: str, as_ids: bool
) -> dict[str, float]:
    alts = {token_str(prompts, t.token_id, as_ids): t.logprob for t in e.top}
    alts.setdefault(text, e.logprob)
    return alts


def chat_message(prep: Prepared, text: str) -> tuple[dict[str, Any], bool]:
    """The assistant message of a whole choice (reasoning split off, tool calls parsed) and
    whether it called tools."""
    message: dict[str, Any] = {"role": "assistant"}
    if prep.reasoning is not None:
        reasoning, text = split_reasoning(text, prep.reasoning, prep.reasoning_inside)
        message["reasoning_content"] = reasoning
    calls: list[dict[str, Any]] = []
    content: str | None = text
    if prep.tools is not None:
        parsed = parse_tool_calls(text, prep.tools)
        content, calls = parsed.content, parsed.calls
    message["content"] = content
    message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    return message, bool(calls)


def chat_completion(
    prep: Prepared, model: str, prompts: Prompts, states: list[ChoiceState]
) -> dict[str, Any]:
    choices = []
    for i, s in enumerate(states):
        message, called = chat_message(prep, "".join(s.text))
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": chat_logprobs(prompts, s.logprobs, prep.token_ids_as_text)
                if prep.logprobs is not None
                else None,
                "finish_reason": "tool_calls"
                if called and s.finish_reason == "stop"
                else s.finish_reason,
                "stop_reason": s.stop_reason,
                **({"token_ids": s.token_ids} if prep.return_token_ids else {}),
            }
        )
    body = {
        "id": prep.request_id,
        "object": "chat.completion",
        "created": prep.created,
        "model": model,
        "choices": choices,
        "usage": usage(prep, states),
    }
    if prep.prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs_body(
            prompts, states[0].prompt_logprobs if states else None, prep.token_ids_as_text
        )
    if prep.return_token_ids:
        body["prompt_token_ids"] = prep.prompts[0].token_ids
    return body


def echo_text(prep: Prepared, prompts: Prompts, prompt_index: int) -> str:
    p = prep.prompts[prompt_index]
    return p.text if p.text is not None else prompts.decode(p.token_ids)


def text_completion(
    prep: Prepared, model: str, prompts: Prompts, states: list[ChoiceState]
) -> dict[str, Any]:
    choices = []
    for i, s in enumerate(states):
        prefix = echo_text(prep, prompts, i // prep.n) if prep.echo else ""
        logprobs = None
        if prep.logprobs is not None:
            echo_ids = prep.prompts[i // prep.n].token_ids if prep.echo else []
            logprobs = completion_logprobs(
                prompts, s.logprobs, 0, echo_ids, s.prompt_logprobs, prep.token_ids_as_text
            )
        choice: dict[str, Any] = {
            "index": i,
            "text": prefix + "".join(s.text),
            "logprobs": logprobs,
            "finish_reason": s.finish_reason,
            "stop_reason": s.stop_reason,
        }
        # vLLM always writes the key (null when not asked for); clients read it.
        choice["prompt_logprobs"] = (
            prompt_logprobs_body(prompts, s.prompt_logprobs, prep.token_ids_as_text)
            if prep.prompt_logprobs is not None
            else None
        )
        if prep.return_token_ids:
            choice["prompt_token_ids"] = prep.prompts[i // prep.n].token_ids
            choice["token_ids"] = s.token_ids
        choices.append(choice)
    return {
        "id": prep.request_id,
        "object": "text_completion",
        "created": prep.created,
        "model": model,
        "choices": choices,
        "usage": usage(prep, states),
    }


def chunk(prep: Prepared, model: str, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": prep.request_id,
        "object": obj,
        "created": prep.created,
        "model": model,
        "choices": choices,
    }
    if prep.include_usage:
        body["usage"] = None
    return body
