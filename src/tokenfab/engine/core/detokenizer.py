"""Incremental detokenization and stop strings for one request.

Decoding the whole output on every token would be O(n^2); instead each new token decodes a
short window: the text of ids[prefix:] minus the text of ids[prefix:read] is the new text. A
window whose text ends in U+FFFD stops at an incomplete UTF-8 character (byte-level BPE splits
multi-byte characters across tokens), so nothing is emitted until a later token completes it.
A few prompt tokens seed the window so tokenizers that strip a leading space at the start of a
decode (SentencePiece) still get the first output word right.

Stop strings are searched in the new text plus enough of the old to catch a stop string that
straddles tokens; while unfinished, the last (longest stop string - 1) characters are held
back so a stop string that later completes never leaks to the client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_PROMPT_CONTEXT = 4
_REPLACEMENT = "\ufffd"


def decode_fn(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """The fastest decode the tokenizer offers (the Rust backend when present)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode"):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    def __init__(
        self,
        decode: Callable[[list[int]], str],
        prompt_token_ids: list[int],
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._decode = decode
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = decode(self._ids) if self._ids else ""
        self.stop = stop or []
        self.include_stop = include_stop_str_in_output
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        """All output text so far (truncated at a stop string once one matched)."""
        self._emitted = 0

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append a generated token; return the stop string it completed, if any (then the
        text ends there)."""
        self._ids.append(token_id)
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            return None  # incomplete character (or nothing visible yet)
        delta = new_text[len(self._prefix_text) :]
        # Slide the window: what was read becomes the new prefix.
        self._prefix = self._read
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        old_len = len(self.text)
        self.text += delta
        return self._check_stop(old_len) if self.stop and check_stop else None

    def _check_stop(self, old_len: int) -> str | None:
        start = max(0, old_len - self._hold)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        return s

    def take(self, finished: bool) -> str:
        """Text not yet handed out; while unfinished, minus a tail that might begin a stop
        string."""
        end = len(self.text) if finished else max(self._emitted, len(self.text) - self._hold)
        out = self.text[self._emitted : end]
        self._emitted = end
        return out
