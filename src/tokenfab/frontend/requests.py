"""From a validated API request to engine requests: limits, sampling parameters, prompts.

Every check that can fail for a client's input lives here and raises a 400 (`APIError`)
with the parameter name and the numbers involved.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import msgspec

from tokenfab.frontend.errors import APIError, bad_request
from tokenfab.frontend.prompts import Prompts
from tokenfab.frontend.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from tokenfab.protocol import GenerateRequest, SamplingParams

MAX_N = 64
MAX_SEQUENCES = 256
"""Prompts × n in one request."""
MAX_STOP_CHARS = 1024
_INT32 = 2**31 - 1


@dataclass
class PreparedPrompt:
    text: str | None
    token_ids: list[int]


@dataclass
class Prepared:
    """What the API handlers need to run and answer one request."""

    request_id: str
    prompts: list[PreparedPrompt]
    n: int
    sampling: list[SamplingParams]
    """One per prompt (max_tokens depends on the prompt's length)."""
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool = False
    cache_salt: str | None = None
    created: int = 0
    engine_requests: list[GenerateRequest] = field(default_factory=list)

    def build(self) -> list[GenerateRequest]:
        """prompt-major, choice-minor: choice index = prompt_index * n + i."""
        out = []
        for p, (prompt, params) in enumerate(zip(self.prompts, self.sampling, strict=True)):
            for i in range(self.n):
                sp = params
                if params.seed is not None and i > 0:
                    sp = msgspec.structs.replace(params, seed=(params.seed + i) % 2**63)
                out.append(
                    GenerateRequest(
                        request_id=f"{self.request_id}-{p}-{i}",
                        prompt_token_ids=prompt.token_ids,
                        sampling=sp,
                        cache_salt=self.cache_salt,
                    )
                )
        self.engine_requests = out
        return out


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(
            404,
            f"The model `{requested}` does not exist (this server serves `{served}`).",
            param="model",
            code="model_not_found",
        )


def _common_checks(req: _Sampling) -> None:
    if not 1 <= req.n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N} (got {req.n})", "n")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"stop strings must be at most {MAX_STOP_CHARS} characters", "stop")
    if req.top_k is not None and req.top_k > _INT32:
        raise bad_request(f"top_k must be at most {_INT32} (got {req.top_k})", "top_k")
    if req.min_tokens > _INT32:
        raise bad_request(
            f"min_tokens must be at most {_INT32} (got {req.min_tokens})", "min_tokens"
        )
    for t in req.stop_token_ids or []:
        if not 0 <= t <= _INT32:
            raise bad_request(
                f"stop_token_ids must be in [0, {_INT32}] (got {t})", "stop_token_ids"
            )


def _sampling(
    req: _Sampling, max_tokens: int, logprobs: int | None, prompt_len: int, max_model_len: int
) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        seed=req.seed,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )
    try:
        params.validate()
    except ValueError as e:
        raise bad_request(str(e), _param_of(str(e))) from None
    return params


def _param_of(message: str) -> str | None:
    head = message.split(" ", 1)[0]
    return head if head.replace("_", "").isalpha() else None


def _max_tokens(
    requested: int | None,
    name: str,
    prompt_len: int,
    max_model_len: int,
    default: int | None = None,
) -> int:
    """The completion budget: the request's, else `default` (None: the rest of the context)."""
    if prompt_len == 0:
        raise bad_request("the prompt is empty", "prompt")
    if requested is not None and requested < 1:
        raise bad_request(f"{name} must be at least 1 (got {requested})", name)
    room = max_model_len - prompt_len
    wanted = 1 if requested is None else requested
    if wanted > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + wanted} tokens ({prompt_len} in the prompt, {wanted} in "
            f"the completion). Please reduce the length of the prompt or {name}.",
            name if requested is not None and room > 0 else "prompt",
            code="context_length_exceeded",
        )
    if requested is not None:
        return requested
    return room if default is None else min(default, room)


def _request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def prepare_chat(req: ChatCompletionRequest, prompts: Prompts, max_model_len: int) -> Prepared:
    _common_checks(req)
    if req.tools:
        raise bad_request("tools (tool calling) are not supported", "tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("only response_format type 'text' is supported", "response_format")
    logprobs: int | None = None
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        if not 0 <= req.top_logprobs <= 20:
            raise bad_request(
                f"top_logprobs must be between 0 and 20 (got {req.top_logprobs})", "top_logprobs"
            )
    if req.logprobs:
        logprobs = req.top_logprobs or 0
    text, ids = prompts.chat(req.messages, req.chat_template_kwargs)
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    max_tokens = _max_tokens(requested, name, len(ids), max_model_len)
    return Prepared(
        request_id=_request_id("chatcmpl"),
        prompts=[PreparedPrompt(text, ids)],
        n=req.n,
        sampling=[_sampling(req, max_tokens, logprobs, len(ids), max_model_len)],
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        logprobs=logprobs,
        cache_salt=req.cache_salt,
    )


def _completion_prompts(req: CompletionRequest, prompts: Prompts) -> list[PreparedPrompt]:
    p = req.prompt
    if isinstance(p, str):
        return [PreparedPrompt(p, prompts.encode(p))]
    if not p:
        raise bad_request("the prompt is empty", "prompt")
    if all(isinstance(x, int) for x in p):
        return [PreparedPrompt(None, _check_ids(p))]  # type: ignore[arg-type]
    if all(isinstance(x, str) for x in p):
        return [PreparedPrompt(s, prompts.encode(s)) for s in p]  # type: ignore[union-attr]
    return [PreparedPrompt(None, _check_ids(ids)) for ids in p]  # type: ignore[arg-type]


def _check_ids(ids: list[int]) -> list[int]:
    for t in ids:
        if not 0 <= t <= _INT32:
            raise bad_request(f"prompt token ids must be non-negative (got {t})", "prompt")
    return ids


def prepare_completion(req: CompletionRequest, prompts: Prompts, max_model_len: int) -> Prepared:
    _common_checks(req)
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request(f"best_of must equal n (got best_of={req.best_of}, n={req.n})", "best_of")
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise bad_request(f"logprobs must be between 0 and 20 (got {req.logprobs})", "logprobs")
    items = _completion_prompts(req, prompts)
    if len(items) * req.n > MAX_SEQUENCES:
        raise bad_request(
            f"at most {MAX_SEQUENCES} sequences per request (got {len(items)} prompts × n={req.n})",
            "n",
        )
    sampling = []
    for item in items:
        max_tokens = _max_tokens(
            req.max_tokens, "max_tokens", len(item.token_ids), max_model_len, default=16
        )
        sampling.append(
            _sampling(req, max_tokens, req.logprobs, len(item.token_ids), max_model_len)
        )
    return Prepared(
        request_id=_request_id("cmpl"),
        prompts=items,
        n=req.n,
        sampling=sampling,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        logprobs=req.logprobs,
        echo=req.echo,
        cache_salt=req.cache_salt,
    )
