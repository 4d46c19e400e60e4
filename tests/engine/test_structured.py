"""Constrained decoding: specs compile (or fail with a clear error), masks follow the grammar,
and the engine's output under a constraint is always in the language."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tokenfab.engine.structured import GrammarCompiler, GrammarError, grammar_text
from tokenfab.protocol import SamplingParams, StructuredOutput


@pytest.fixture(scope="module")
def compiler(tiny_llama: Path) -> GrammarCompiler:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return GrammarCompiler(tok, tok.eos_token_id, len(tok))


@pytest.mark.parametrize(
    "so",
    [
        StructuredOutput(kind="json", spec="{not json"),
        StructuredOutput(kind="json", spec='{"type": "wat"}'),
        StructuredOutput(kind="json", spec="[1, 2]"),
        StructuredOutput(kind="regex", spec="(unclosed"),
        StructuredOutput(kind="choice", spec="[]"),
        StructuredOutput(kind="grammar", spec="start: undefined_rule"),
    ],
)
def test_bad_specs_are_grammar_errors(compiler: GrammarCompiler, so: StructuredOutput) -> None:
    with pytest.raises(GrammarError):
        compiler.compile(so)


def test_gbnf_and_lark_grammars_compile() -> None:
    assert grammar_text(StructuredOutput(kind="grammar", spec='root ::= "yes" | "no"'))
    assert grammar_text(StructuredOutput(kind="grammar", spec='start: "yes" | "no"'))


def test_compiled_grammars_are_cached(compiler: GrammarCompiler) -> None:
    so = StructuredOutput(kind="regex", spec="[ab]{3}")
    assert compiler.compile(so) is compiler.compile(so)


def test_masks_walk_a_choice(compiler: GrammarCompiler, tiny_llama: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    m = compiler.matcher(StructuredOutput(kind="choice", spec=json.dumps(["yes", "no"])))
    mask = compiler.fill_bitmask([m])
    allowed = [t for t in range(len(tok)) if mask[0, t // 32] >> (t % 32) & 1]
    texts = {tok.decode([t]) for t in allowed}
    assert texts and all("yes".startswith(x) or "no".startswith(x) for x in texts), texts


@pytest.mark.parametrize(
    "so,check",
    [
        (StructuredOutput(kind="regex", spec=r"[0-9]{3}-[a-z]{2}"), r"[0-9]{3}-[a-z]{2}"),
        (StructuredOutput(kind="choice", spec=json.dumps(["alpha", "beta"])), r"alpha|beta"),
        (
            StructuredOutput(
                kind="json",
                spec=json.dumps(
                    {
                        "type": "object",
                        "properties": {"ok": {"type": "boolean"}, "k": {"enum": ["x", "y"]}},
                        "required": ["ok", "k"],
                        "additionalProperties": False,
                    }
                ),
            ),
            r'\{"ok": (true|false), "k": "[xy]"\}',
        ),
    ],
)
def test_engine_output_is_in_the_language(
    tiny_llama: Path, so: StructuredOutput, check: str
) -> None:
    from tokenfab.engine.llm import LLM

    llm = LLM(str(tiny_llama), num_kv_blocks=64, max_model_len=256)
    for temperature in (0.0, 1.0):
        params = SamplingParams(max_tokens=40, temperature=temperature, seed=1, structured=so)
        res = llm.generate(["hello", "the"], params)
        for r in res:
            assert re.fullmatch(check, r.text), r.text
            assert r.finish_reason == "stop"
