"""A streamed chat choice's text turned into OpenAI deltas: `reasoning_content`, `content`
and, when the choice finishes, `tool_calls` (whole calls: each call's id, name and arguments
in one delta, as clients accumulate them)."""

from __future__ import annotations

from typing import Any

from tokenfab.frontend.reasoning import ReasoningStream
from tokenfab.frontend.requests import Prepared
from tokenfab.frontend.tools import ToolStream


class ChatDeltas:
    def __init__(self, prep: Prepared) -> None:
        self.reasoning = (
            ReasoningStream(prep.reasoning, prep.reasoning_inside)
            if prep.reasoning is not None
            else None
        )
        self.tools = ToolStream(prep.tools) if prep.tools is not None else None
        self.called = False

    def feed(self, text: str, finished: bool) -> dict[str, Any]:
        """The delta for this output's text (empty dict: nothing to send yet)."""
        reasoning, content = "", text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(text)
            if finished:
                more_r, more_c = self.reasoning.finish()
                reasoning, content = reasoning + more_r, content + more_c
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if self.tools is not None:
            content = self.tools.feed(content)
            if finished:
                parsed = self.tools.finish()
                content += parsed.content or ""
                if parsed.calls:
                    self.called = True
                    delta["tool_calls"] = parsed.calls
        if content:
            delta["content"] = content
        return delta

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.called and reason == "stop" else reason
