"""OpenAI response bodies: chat and text completions, their stream chunks, logprobs, usage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenfab.frontend.prompts import Prompts
from tokenfab.frontend.requests import Prepared
from tokenfab.protocol import GenerateOutput, PositionLogprobs


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    text_len: int = 0
    """Characters emitted so far (text_offset of completions logprobs)."""

    def add(self, out: GenerateOutput) -> None:
        if out.text:
            self.text.append(out.text)
        self.num_tokens += len(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.num_prompt_tokens:
            self.num_prompt_tokens = out.num_prompt_tokens
            self.num_cached_tokens = out.num_cached_tokens
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason


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


def _token_entry(prompts: Prompts, token_id: int, logprob: float) -> dict[str, Any]:
    text = prompts.token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(prompts: Prompts, entries: list[PositionLogprobs]) -> dict[str, Any]:
    content = []
    for e in entries:
        item = _token_entry(prompts, e.token_id, e.logprob)
        item["top_logprobs"] = [_token_entry(prompts, t.token_id, t.logprob) for t in e.top]
        content.append(item)
    return {"content": content}


def completion_logprobs(
    prompts: Prompts, entries: list[PositionLogprobs], offset: int, echo_ids: list[int] = ()
) -> dict[str, Any]:
    """Legacy completions format. Echoed prompt tokens carry null logprobs (prompt logprobs are
    not computed)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid in echo_ids:
        text = prompts.token_text(tid)
        tokens.append(text)
        token_logprobs.append(None)
        top.append(None)
        offsets.append(offset)
        offset += len(text)
    for e in entries:
        text = prompts.token_text(e.token_id)
        tokens.append(text)
        token_logprobs.append(e.logprob)
        alts = {prompts.token_text(t.token_id): t.logprob for t in e.top}
        alts.setdefault(text, e.logprob)
        top.append(alts)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_completion(
    prep: Prepared, model: str, prompts: Prompts, states: list[ChoiceState]
) -> dict[str, Any]:
    choices = []
    for i, s in enumerate(states):
        choices.append(
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(s.text)},
                "logprobs": chat_logprobs(prompts, s.logprobs)
                if prep.logprobs is not None
                else None,
                "finish_reason": s.finish_reason,
            }
        )
    return {
        "id": prep.request_id,
        "object": "chat.completion",
        "created": prep.created,
        "model": model,
        "choices": choices,
        "usage": usage(prep, states),
    }


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
            logprobs = completion_logprobs(prompts, s.logprobs, 0, echo_ids)
        choices.append(
            {
                "index": i,
                "text": prefix + "".join(s.text),
                "logprobs": logprobs,
                "finish_reason": s.finish_reason,
            }
        )
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
