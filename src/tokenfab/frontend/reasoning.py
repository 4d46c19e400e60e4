"""Reasoning models: split a choice's text into `reasoning_content` and `content`.

One parser per family, chosen from the tokenizer: families that think inside
`<think>...</think>` (Qwen3, DeepSeek-R1, QwQ, ...) have both tags as tokens. When the chat
template already opened the block (the prompt ends with `<think>`, as R1's does) the text
starts inside the reasoning. Streaming holds back a partial tag, so no delta carries half
of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReasoningFormat:
    start: str
    end: str


THINK = ReasoningFormat("<think>", "</think>")


def reasoning_format(tokenizer: Any) -> ReasoningFormat | None:
    """The family's format, if its vocabulary has the tags as tokens."""
    vocab = tokenizer.get_vocab()
    if THINK.start in vocab and THINK.end in vocab:
        return THINK
    return None


def split_reasoning(text: str, fmt: ReasoningFormat, inside: bool) -> tuple[str | None, str]:
    """(reasoning, content) of a whole text."""
    if not inside:
        stripped = text.lstrip()
        if not stripped.startswith(fmt.start):
            return None, text
        text = stripped[len(fmt.start) :]
    reasoning, closed, content = text.partition(fmt.end)
    if not closed:  # still thinking when it stopped
        return reasoning, ""
    return reasoning, content.lstrip("\n")


class ReasoningStream:
    """Incremental `split_reasoning`: feed text deltas, get (reasoning, content) deltas."""

    def __init__(self, fmt: ReasoningFormat, inside: bool) -> None:
        self.fmt = fmt
        self.state = "inside" if inside else "start"
        self.buf = ""

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        reasoning = content = ""
        if self.state == "start":
            head = self.buf.lstrip()
            if self.fmt.start.startswith(head):
                return "", ""  # might still be the opening tag
            if head.startswith(self.fmt.start):
                self.state, self.buf = "inside", head[len(self.fmt.start) :]
            else:
                self.state = "after"
        if self.state == "inside":
            at = self.buf.find(self.fmt.end)
            if at < 0:
                keep = _partial_suffix(self.buf, self.fmt.end)
                reasoning, self.buf = (
                    self.buf[: len(self.buf) - keep],
                    self.buf[len(self.buf) - keep :],
                )
                return reasoning, ""
            reasoning = self.buf[:at]
            self.buf = self.buf[at + len(self.fmt.end) :].lstrip("\n")
            self.state = "after"
        if self.state == "after":
            content, self.buf = self.buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        rest, self.buf = self.buf, ""
        if self.state == "inside":
            return rest, ""
        return "", rest


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
