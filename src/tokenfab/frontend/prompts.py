"""Text ↔ tokens for the frontend: chat templates, prompt encoding, token strings for logprobs.

The frontend tokenizes so that workers receive token ids only (and the router can hash them).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from tokenfab.frontend.errors import bad_request
from tokenfab.frontend.reasoning import ReasoningFormat, reasoning_format
from tokenfab.frontend.schemas import ChatMessage
from tokenfab.frontend.tools import ToolPlan, conversation

# Used only when a model's tokenizer has no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "chat_template", "tokenize", "conversation", "return_dict", "return_tensors",
        "padding", "truncation", "max_length", "tokenizer_kwargs", "tools", "documents",
        "return_assistant_tokens_mask",
    }
)  # fmt: skip


def _template_kwargs(given: dict[str, Any] | None) -> dict[str, Any]:
    """Client-chosen template variables (e.g. enable_thinking): scalars only, and never the
    template itself or tokenizer options."""
    out: dict[str, Any] = {}
    for key, value in (given or {}).items():
        if key in _RESERVED_TEMPLATE_KWARGS:
            raise bad_request(f"chat_template_kwargs may not set {key!r}", "chat_template_kwargs")
        if not isinstance(value, str | int | float | bool | None):
            raise bad_request(
                f"chat_template_kwargs.{key} must be a string, number, boolean or null",
                "chat_template_kwargs",
            )
        out[key] = value
    return out


class Prompts:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.token_text = lru_cache(maxsize=65536)(self._token_text)
        own: str | None = getattr(tokenizer, "chat_template", None)
        self.template_knows_tools = bool(own) and "tools" in (own or "")
        self.reasoning: ReasoningFormat | None = reasoning_format(tokenizer)
        self.vocab_size = len(tokenizer)
        self.eos_token_id: int | None = tokenizer.eos_token_id

    def chat(
        self,
        messages: list[ChatMessage],
        template_kwargs: dict[str, Any] | None = None,
        *,
        tools: ToolPlan | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> tuple[str, list[int]]:
        """The chat template applied (with the generation prompt), as text and token ids."""
        if not messages:
            raise bad_request("messages must not be empty", param="messages")
        convo = conversation(messages, tools, self.template_knows_tools)
        kwargs = _template_kwargs(template_kwargs)
        add_generation_prompt = kwargs.pop("add_generation_prompt", add_generation_prompt)
        continue_final_message = kwargs.pop("continue_final_message", continue_final_message)
        if continue_final_message and add_generation_prompt:
            raise bad_request(
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                "continue_final_message",
            )
        if tools is not None and tools.in_prompt and self.template_knows_tools:
            kwargs["tools"] = tools.template_tools()
        template = (
            None if getattr(self.tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
        )
        try:
            text = self.tokenizer.apply_chat_template(
                convo,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=template,
                **kwargs,
            )
        except Exception as e:  # a template may reject a conversation (e.g. role order)
            raise bad_request(f"the chat template rejected the messages: {e}", "messages") from e
        if not isinstance(text, str):
            raise bad_request("chat_template_kwargs produced no text", "chat_template_kwargs")
        # The template already wrote the special tokens (BOS etc.) it wants.
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
