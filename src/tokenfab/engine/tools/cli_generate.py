"""The work behind `tokenfab generate` (kept out of cli.py so the CLI starts without torch)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from typing import Any, TextIO

from tokenfab.config import EngineConfig
from tokenfab.engine.errors import InvalidRequestError
from tokenfab.protocol import GenerateRequest, SamplingParams


def build_prompt(tokenizer: Any, prompt: str, system: str | None, raw: bool) -> list[int]:
    if raw or not getattr(tokenizer, "chat_template", None):
        return list(tokenizer.encode(prompt))
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def run_generate(
    prompt: str,
    *,
    model: str | None,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    system: str | None,
    raw: bool,
    dtype: str,
    stream: TextIO | None,
    clock: Callable[[], float],
) -> dict[str, Any]:
    """Load the model, answer `prompt`, write text deltas to `stream` as they come."""
    from tokenfab.engine.engine import LLMEngine

    if not prompt.strip():
        raise InvalidRequestError("the prompt is empty")
    t0 = clock()
    status = _status("loading model") if stream is not None and sys.stderr.isatty() else None
    try:
        engine = LLMEngine(EngineConfig(model=model, dtype=dtype, num_kv_blocks=512))  # type: ignore[arg-type]
    finally:
        if status is not None:
            status.stop()
    t_loaded = clock()
    ids = build_prompt(engine.tokenizer, prompt, system, raw)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    req = GenerateRequest(
        request_id=f"cli-{next(itertools.count())}", prompt_token_ids=ids, sampling=params
    )
    engine.add_request(req)
    text: list[str] = []
    num_tokens = 0
    finish: str | None = None
    t_first: float | None = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.error:
                raise RuntimeError(out.error)
            if t_first is None:
                t_first = clock()
            num_tokens += len(out.token_ids)
            text.append(out.text)
            if stream is not None and out.text:
                stream.write(out.text)
                stream.flush()
            finish = out.finish_reason or finish
    t_end = clock()
    decode_s = t_end - (t_first or t_end)
    return {
        "model": engine.model_name,
        "prompt": prompt,
        "text": "".join(text),
        "finish_reason": finish,
        "num_prompt_tokens": len(ids),
        "num_generated_tokens": num_tokens,
        "load_s": round(t_loaded - t0, 3),
        "ttft_s": round((t_first or t_end) - t_loaded, 3),
        "decode_tokens_per_s": round((num_tokens - 1) / decode_s, 1) if decode_s > 0 else None,
    }


def _status(message: str) -> Any:
    from rich.console import Console

    status = Console(stderr=True).status(message)
    status.start()
    return status
