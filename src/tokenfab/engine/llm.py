"""Offline batch inference in the shape vLLM users know:

from tokenfab import LLM, SamplingParams
llm = LLM()                      # the default model; or LLM("path/to/hf-folder-or.gguf")
outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
print(outs[0].text)
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenfab.config import EngineConfig
from tokenfab.engine.engine import LLMEngine
from tokenfab.engine.errors import InvalidRequestError
from tokenfab.protocol import GenerateRequest, PositionLogprobs, SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    """The generated tokens (not the prompt)."""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[PositionLogprobs] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    """With SamplingParams.prompt_logprobs: per prompt position (the first is None)."""
    num_cached_tokens: int = 0
    error: str | None = None
    """Set (with finish_reason "error") if the engine failed this request mid-run."""

    @property
    def outputs(self) -> list[RequestOutput]:
        """vLLM-style access (`out.outputs[0].text`): one completion per prompt here."""
        return [self]


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", **overrides: Any) -> None:
        # Offline batches queue everything up front: no waiting-queue cap unless asked for.
        config = EngineConfig(model=model, dtype=dtype, max_waiting=1 << 62)  # type: ignore[arg-type]
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise TypeError(f"unknown engine setting {key!r}")
            setattr(config, key, value)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); results in input order. All requests are
        checked before any runs: an invalid one raises InvalidRequestError naming it, and the
        LLM stays usable."""
        batch = _as_batch(prompts)
        plist = _params_list(params, len(batch))
        outputs: dict[str, RequestOutput] = {}
        requests: list[GenerateRequest] = []
        for i, (prompt, p) in enumerate(zip(batch, plist, strict=True)):
            ids = self._encode(prompt)
            req = GenerateRequest(
                request_id=f"llm-{next(self._ids)}", prompt_token_ids=ids, sampling=p
            )
            try:
                self.engine.validate(req)
            except InvalidRequestError as e:
                raise InvalidRequestError(f"prompt {i}: {e}") from None
            requests.append(req)
            outputs[req.request_id] = RequestOutput(
                req.request_id, prompt if isinstance(prompt, str) else None, ids
            )
        self._run(requests, outputs, use_tqdm and len(requests) > 1)
        return [outputs[r.request_id] for r in requests]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"}) or a list of them, with the
        model's chat template and the assistant turn opened."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[Prompt] = [self.apply_chat_template(c) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, params, use_tqdm)

    def apply_chat_template(self, conversation: list[Message]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template")
        out = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True
        )
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return list(ids)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if not all(isinstance(t, int) for t in prompt):
            raise InvalidRequestError("a token-id prompt must be a list of ints")
        return list(prompt)

    def _run(
        self, requests: list[GenerateRequest], outputs: dict[str, RequestOutput], bar: bool
    ) -> None:
        engine = self.engine
        added: list[str] = []
        try:
            for req in requests:
                engine.add_request(req)
                added.append(req.request_id)
            progress = _Progress(len(requests)) if bar else None
            with progress or contextlib.nullcontext():
                while engine.has_unfinished():
                    for out in engine.step():
                        res = outputs.get(out.request_id)
                        if res is None:
                            continue
                        res.token_ids.extend(out.token_ids)
                        res.text += out.text
                        if out.logprobs is not None:
                            res.logprobs = (res.logprobs or []) + out.logprobs
                        if out.prompt_logprobs is not None:
                            res.prompt_logprobs = out.prompt_logprobs
                        if out.finish_reason is not None:
                            res.finish_reason = out.finish_reason
                            res.stop_reason = out.stop_reason
                            res.num_cached_tokens = out.num_cached_tokens
                            res.error = out.error
                            if progress:
                                progress.advance(len(res.token_ids))
        finally:
            # Interrupted (Ctrl-C, error): leave the engine clean for the next call.
            for rid in added:
                engine.abort(rid)


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # one token-id prompt
    return items  # type: ignore[return-value]


def _params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    plist = list(params)
    if len(plist) != n:
        raise InvalidRequestError(f"{len(plist)} sampling params for {n} prompts")
    return plist


class _Progress:
    """A rich progress bar counting finished requests and generated tokens."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._p = Progress(
            TextColumn("generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[toks]} tokens"),
            TimeElapsedColumn(),
            console=Console(stderr=True),  # stdout stays clean for scripts
            transient=True,
        )
        self._task = self._p.add_task("generate", total=total, toks=0)
        self._toks = 0

    def __enter__(self) -> _Progress:
        self._p.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._p.__exit__(None, None, None)

    def advance(self, num_tokens: int) -> None:
        self._toks += num_tokens
        self._p.update(self._task, advance=1, toks=self._toks)
