"""Constrained decoding: grammars compiled once, one matcher per request, batched token masks.

Built on llguidance (Rust, lazy token-trie masks; one 8 MB wheel with no dependencies).
xgrammar computed masks faster at batch 64 (0.5 vs 4.0 ms a step for a 4-field schema,
`benchmarks/README.md`), but both are far below a decode step (~130 ms) and xgrammar pulls in
triton (~1 GB) on Linux; llguidance also takes Lark and GBNF grammars and regexes directly.

`GrammarCompiler.compile` turns a `StructuredOutput` into llguidance's grammar text and checks it
(cached by spec); `matcher` makes a request's `LLMatcher`; `fill_bitmask` computes the masks of a
step's constrained rows in one call (llguidance's parallel executor). The sampler applies the
masks (`apply_bitmask`); the engine feeds every sampled token back with `consume_token`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from tokenfab.protocol import StructuredOutput

_CACHE_SIZE = 256
# One fixed layout, the one json.dumps writes (and models saw most): free whitespace lets small
# models emit newlines forever inside an object.
_JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class GrammarError(ValueError):
    """A structured-output spec that does not compile (bad schema, regex or grammar)."""


def grammar_text(so: StructuredOutput) -> str:
    """llguidance's grammar for a spec (raises GrammarError for malformed input)."""
    try:
        if so.kind == "json":
            schema = json.loads(so.spec)
            if not isinstance(schema, dict | bool):
                raise GrammarError("a JSON schema must be an object")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        if so.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, defaults=_JSON_OPTIONS
            )
        if so.kind == "regex":
            return llguidance.grammar_from("regex", ascii_classes(so.spec))
        if so.kind == "choice":
            choices = json.loads(so.spec)
            if not choices or not all(isinstance(c, str) for c in choices):
                raise GrammarError("choice must be a non-empty list of strings")
            return llguidance.grammar_from("lark", _choice_lark(choices))
        if so.kind == "grammar":
            # Lark, or GBNF/EBNF (vLLM's xgrammar format), told apart by llguidance.
            return llguidance.grammar_from("grammar", so.spec)
    except GrammarError:
        raise
    except Exception as e:  # json.JSONDecodeError, llguidance's ValueError, ...
        raise GrammarError(f"invalid {so.kind} spec: {e}") from None
    raise GrammarError(f"unknown structured output kind {so.kind!r}")


_CLASSES = {"d": "0-9", "w": "0-9A-Za-z_", "s": " \\t\\n\\r\\f\\v"}


def ascii_classes(regex: str) -> str:
    """`\\d`, `\\w`, `\\s` as ASCII classes. llguidance's regexes are Unicode-aware, so
    `\\d{3}` let SmolLM2 write "🯸🯸🯸" (U+1FBF8, a digit); clients mean [0-9], as Python's
    `re.ASCII` and JavaScript read it."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            if nxt in _CLASSES:
                out.append(_CLASSES[nxt] if in_class else f"[{_CLASSES[nxt]}]")
            else:
                out.append(regex[i : i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def _choice_lark(choices: list[str]) -> str:
    return "start: " + " | ".join(json.dumps(c) for c in choices)


class GrammarCompiler:
    """Per-engine: the tokenizer's llguidance view and an LRU of checked grammars."""

    def __init__(self, tokenizer: Any, eos_token_id: int | None, vocab_size: int) -> None:
        self.tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=eos_token_id
        )
        self.vocab_size = vocab_size
        self._cache: OrderedDict[StructuredOutput, str] = OrderedDict()
        self.executor = llguidance.LLExecutor()

    def compile(self, so: StructuredOutput) -> str:
        grammar = self._cache.get(so)
        if grammar is not None:
            self._cache.move_to_end(so)
            return grammar
        grammar = grammar_text(so)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"invalid {so.kind} spec: {error}")
        self._cache[so] = grammar
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return grammar

    def matcher(self, so: StructuredOutput) -> llguidance.LLMatcher:
        m = llguidance.LLMatcher(self.tokenizer, self.compile(so))
        if m.is_error():
            raise GrammarError(f"invalid {so.kind} spec: {m.get_error()}")
        return m

    def fill_bitmask(self, matchers: list[llguidance.LLMatcher]) -> np.ndarray:
        """int32 [len(matchers), ceil(vocab / 32)]: bit t of row i set iff token t is allowed."""
        words = (self.vocab_size + 31) // 32
        mask = np.zeros((len(matchers), words), dtype=np.int32)
        self.executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], mask.ctypes.data, words * 4, len(matchers)
        )
        return mask


_FORBIDDEN = 1e30
"""Subtracted from forbidden logits: finite, so the penalty is one branch-free multiply-add
(allowed: +0) where a -inf masked_fill costs 3-7x more on a [64, 49k] step; exp() of it is
still exactly 0."""


def apply_bitmask(logits: torch.Tensor, rows: list[int], bitmask: np.ndarray) -> None:
    """In place: push every token a row's mask forbids out of reach (numpy bit unpacking;
    ~2.5 ms for 64 rows of a 49k vocabulary, where llguidance's own CPU kernel took ~1 s)."""
    vocab = logits.shape[1]
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    penalty = torch.from_numpy(bits).to(logits.dtype).sub_(1.0).mul_(_FORBIDDEN)
    if rows == list(range(logits.shape[0])):
        logits.add_(penalty)
    else:
        logits.index_add_(0, torch.tensor(rows, dtype=torch.long), penalty)
