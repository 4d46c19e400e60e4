"""From a validated API request to engine requests: limits, sampling parameters, prompts.

Every check that can fail for a client's input lives here and raises a 400 (`APIError`)
with the parameter name and the numbers involved.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import llguidance
import msgspec

from tokenfab.engine.structured import GrammarError, grammar_text
from tokenfab.frontend.beam import MAX_WIDTH as MAX_BEAM_WIDTH
from tokenfab.frontend.errors import APIError, bad_request
from tokenfab.frontend.prompts import Prompts
from tokenfab.frontend.reasoning import ReasoningFormat
from tokenfab.frontend.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from tokenfab.frontend.tools import ToolPlan, plan_tools
from tokenfab.protocol import GenerateRequest, SamplingParams, StructuredOutput

MAX_N = 64
MAX_SEQUENCES = 256
"""Prompts × n in one request."""
MAX_STOP_CHARS = 1024
_INT32 = 2**31 - 1
DEFAULT_MAX_TOKENS = 1024
"""Completion budget of a chat request without max_tokens (capped by the context's room)."""


@dataclass
class Limits:
    """Server-wide numbers a request is prepared against."""

    max_model_len: int
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS
    """Chat requests without max_tokens; None: the rest of the context."""
    vocab_size: int = 0


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
    prompt_logprobs: int | None = None
    """Asked for by the client (vLLM's prompt_logprobs); echo+logprobs scores the prompt
    without it."""
    continuous_usage: bool = False
    token_ids_as_text: bool = False
    """vLLM's return_tokens_as_token_ids: logprob tokens written `token_id:<id>`."""
    return_token_ids: bool = False
    """vLLM's return_token_ids: prompt and output token ids in the (non-streamed) answer."""
    tools: ToolPlan | None = None
    reasoning: ReasoningFormat | None = None
    reasoning_inside: bool = False
    """The prompt opened the reasoning block (the text starts inside it)."""

    beam_width: int = 0
    """use_beam_search: the number of beams (= n); 0 for sampling."""

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
            f"The model `{requested}` does not exist.",
            param="model",
            code="model_not_found",
        )


_UNSUPPORTED_IF_SET = (
    "logits_processors", "kv_transfer_params", "vllm_xargs",
    "functions", "function_call", "audio", "modalities", "prediction", "web_search_options",
    "documents", "chat_template", "mm_processor_kwargs", "suffix",
)  # fmt: skip
_UNSUPPORTED_UNLESS = {
    "length_penalty": 1.0,
    "spaces_between_special_tokens": True,
    "priority": 0,
}


def _unsupported(req: _Sampling) -> None:
    """Fields tokenfab knows but cannot honour: a 400 naming the field when they are set."""
    fields = type(req).model_fields
    for name in _UNSUPPORTED_IF_SET:
        if name in fields and getattr(req, name) is not None:
            raise bad_request(f"{name} is not supported", name)
    for name, default in _UNSUPPORTED_UNLESS.items():
        if getattr(req, name) != default:
            raise bad_request(f"{name} is not supported (only {default!r})", name)


def _logit_bias(req: _Sampling, vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(
                f"logit_bias keys must be token ids (got {key!r})", "logit_bias"
            ) from None
        if token < 0 or (vocab_size and token >= vocab_size):
            raise bad_request(
                f"token_id(s) [{token}] in logit_bias contain out-of-vocab token ids. "
                f"Vocabulary size: {vocab_size}",
                "logit_bias",
            )
        if not -100.0 <= value <= 100.0:
            raise bad_request(
                f"logit_bias values must be in [-100, 100] (got {value} for {key})", "logit_bias"
            )
        out[token] = float(value)
    return out


def _allowed_token_ids(req: _Sampling, vocab_size: int) -> list[int]:
    ids = req.allowed_token_ids
    if ids is None:
        return []
    if not ids:
        raise bad_request("allowed_token_ids is not None and empty!", "allowed_token_ids")
    if any(t < 0 or (vocab_size and t >= vocab_size) for t in ids):
        raise bad_request("allowed_token_ids contains out-of-vocab token id!", "allowed_token_ids")
    return list(ids)


def bad_words_token_ids(req: _Sampling, prompts: Prompts) -> list[list[int]]:
    """Each bad word as tokenized alone and after a space (vLLM's two spellings of a word:
    at the start of the text and inside it)."""
    out: list[list[int]] = []
    for word in req.bad_words or []:
        for spelling in (word.lstrip(), " " + word.lstrip()):
            ids = prompts.encode(spelling, add_special_tokens=False)
            if ids and ids not in out:
                out.append(ids)
    return out


def structured_output(req: _Sampling) -> StructuredOutput | None:
    """The request's one output constraint (response_format, structured_outputs or vLLM's
    older guided_*), checked here so a bad schema is a 400 before any engine sees it."""
    found: list[tuple[str, StructuredOutput]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", StructuredOutput(kind="json_object", spec="")))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request(
                "response_format.json_schema.schema is required for type json_schema",
                "response_format",
            )
        found.append(("response_format", _json(rf.json_schema.schema_)))
    so = req.structured_outputs
    if so is not None:
        kinds = [
            ("json", so.json_),
            ("regex", so.regex),
            ("choice", so.choice),
            ("grammar", so.grammar),
            ("json_object", so.json_object or None),
        ]
        given = [(k, v) for k, v in kinds if v is not None]
        if so.structural_tag is not None or so.whitespace_pattern is not None:
            raise bad_request(
                "structured_outputs.structural_tag and whitespace_pattern are not supported",
                "structured_outputs",
            )
        if len(given) != 1:
            raise bad_request(
                "You can only use one kind of constraint for structured outputs ("
                "json, regex, choice, grammar or json_object); got "
                f"{[k for k, _ in given] or 'none'}",
                "structured_outputs",
            )
        found.append(("structured_outputs", _constraint(*given[0])))
    for name, kind in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(req, name)
        if value is not None:
            found.append((name, _constraint(kind, value)))
    if len(found) > 1:
        raise bad_request(
            f"only one output constraint may be given (got {', '.join(n for n, _ in found)})",
            found[1][0],
        )
    if not found:
        return None
    name, constraint = found[0]
    try:
        error = llguidance.LLMatcher.validate_grammar(grammar_text(constraint))
    except GrammarError as e:
        error = str(e)
    if error:
        raise bad_request(f"Invalid {name}: {error}", name)
    return constraint


def _json(schema: object) -> StructuredOutput:
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return StructuredOutput(kind="json", spec=text)


def _constraint(kind: str, value: object) -> StructuredOutput:
    if kind == "json":
        return _json(value)
    if kind == "json_object":
        return StructuredOutput(kind="json_object", spec="")
    if kind == "choice":
        return StructuredOutput(kind="choice", spec=json.dumps(value))
    return StructuredOutput(kind=kind, spec=str(value))  # type: ignore[arg-type]


def _stream_flags(req: _Sampling) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats); stream_options need stream=true."""
    opts = req.stream_options
    if opts is None:
        return False, False
    if not req.stream:
        raise bad_request(
            "Stream options can only be defined when `stream=True`.", "stream_options"
        )
    # vLLM: per-chunk usage only when the final usage chunk is asked for too.
    return opts.include_usage, opts.include_usage and opts.continuous_usage_stats


def _common_checks(req: _Sampling) -> None:
    _unsupported(req)
    if not 1 <= req.n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N} (got {req.n})", "n")
    if req.prompt_logprobs is not None and not 0 <= req.prompt_logprobs <= 20:
        raise bad_request(
            f"prompt_logprobs must be between 0 and 20 (got {req.prompt_logprobs})",
            "prompt_logprobs",
        )
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request(
            "prompt_logprobs is not available when stream is enabled", "prompt_logprobs"
        )
    if req.return_token_ids and req.stream:
        raise bad_request("return_token_ids is not supported with stream=true", "return_token_ids")
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens < 1:
        raise bad_request(
            f"truncate_prompt_tokens must be at least 1 (got {req.truncate_prompt_tokens})",
            "truncate_prompt_tokens",
        )
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
    req: _Sampling,
    max_tokens: int,
    logprobs: int | None,
    limits: Limits,
    structured: StructuredOutput | None = None,
    prompt_logprobs: int | None = None,
    bad_words: list[list[int]] | None = None,
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
        logit_bias=_logit_bias(req, limits.vocab_size),
        structured=structured,
        prompt_logprobs=prompt_logprobs,
        allowed_token_ids=_allowed_token_ids(req, limits.vocab_size),
        bad_words_token_ids=bad_words or [],
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


def _request_id(prefix: str, given: str | None) -> str:
    return f"{prefix}-{given}" if given else f"{prefix}-{uuid.uuid4().hex}"


def _truncate(ids: list[int], keep: int | None, side: str | None = None) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last `keep` tokens (the first ones with
    truncation_side "right")."""
    if keep is None or len(ids) <= keep:
        return ids
    return ids[:keep] if side == "right" else ids[-keep:]


def _chat_logprobs(req: ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        if not 0 <= req.top_logprobs <= 20:
            raise bad_request(
                f"top_logprobs must be between 0 and 20 (got {req.top_logprobs})", "top_logprobs"
            )
    return (req.top_logprobs or 0) if req.logprobs else None


def _beam_width(req: CompletionRequest) -> int:
    """n when the request asks for beam search (its width), else 0; 400s for what beam search
    cannot combine with."""
    if not req.use_beam_search:
        return 0
    conflicts = {
        "stream": req.stream,
        "logprobs": req.logprobs is not None,
        "echo": req.echo,
        "response_format": req.response_format is not None,
        "prompt_logprobs": req.prompt_logprobs is not None,
    }
    for name, conflict in conflicts.items():
        if conflict:
            raise bad_request(f"{name} is not supported with use_beam_search", name)
    if req.n > MAX_BEAM_WIDTH:
        raise bad_request(
            f"use_beam_search: n (the beam width) must be at most {MAX_BEAM_WIDTH} (got {req.n})",
            "n",
        )
    return req.n


def prepare_chat(req: ChatCompletionRequest, prompts: Prompts, limits: Limits) -> Prepared:
    _common_checks(req)
    if req.use_beam_search:
        raise bad_request("use_beam_search is supported on /v1/completions only", "use_beam_search")
    if req.echo:
        raise bad_request("echo is not supported for chat completions", "echo")
    include_usage, continuous = _stream_flags(req)
    logprobs = _chat_logprobs(req)
    tools = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    structured = structured_output(req)
    if tools is not None and tools.structured() is not None:
        if structured is not None:
            raise bad_request(
                "tool_choice 'required' or a named function cannot be combined with another "
                "output constraint",
                "tool_choice",
            )
        structured = tools.structured()
    kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    text, ids = prompts.chat(
        req.messages,
        kwargs,
        tools=tools,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
    )
    ids = _truncate(ids, req.truncate_prompt_tokens, req.truncation_side)
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    max_tokens = _max_tokens(
        requested, name, len(ids), limits.max_model_len, default=limits.default_max_tokens
    )
    fmt = prompts.reasoning if req.include_reasoning else None
    return Prepared(
        request_id=_request_id("chatcmpl", req.request_id),
        prompts=[PreparedPrompt(text, ids)],
        n=req.n,
        sampling=[
            _sampling(
                req,
                max_tokens,
                logprobs,
                limits,
                structured,
                req.prompt_logprobs,
                bad_words_token_ids(req, prompts),
            )
        ],
        stream=req.stream,
        include_usage=include_usage,
        logprobs=logprobs,
        cache_salt=req.cache_salt,
        prompt_logprobs=req.prompt_logprobs,
        continuous_usage=continuous,
        token_ids_as_text=req.return_tokens_as_token_ids,
        return_token_ids=req.return_token_ids,
        tools=tools,
        reasoning=fmt,
        reasoning_inside=fmt is not None and text.rstrip().endswith(fmt.start),
    )


def _completion_prompts(req: CompletionRequest, prompts: Prompts) -> list[PreparedPrompt]:
    p = req.prompt
    if isinstance(p, str):
        return [PreparedPrompt(p, prompts.encode(p, req.add_special_tokens))]
    if not p:
        raise bad_request("the prompt is empty", "prompt")
    if all(isinstance(x, int) for x in p):
        return [PreparedPrompt(None, _check_ids(p))]  # type: ignore[arg-type]
    if all(isinstance(x, str) for x in p):
        return [PreparedPrompt(s, prompts.encode(s, req.add_special_tokens)) for s in p]  # type: ignore[union-attr]
    return [PreparedPrompt(None, _check_ids(ids)) for ids in p]  # type: ignore[arg-type]


def _check_ids(ids: list[int]) -> list[int]:
    for t in ids:
        if not 0 <= t <= _INT32:
            raise bad_request(f"prompt token ids must be non-negative (got {t})", "prompt")
    return ids


def prepare_completion(req: CompletionRequest, prompts: Prompts, limits: Limits) -> Prepared:
    _common_checks(req)
    include_usage, continuous = _stream_flags(req)
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request(f"best_of must equal n (got best_of={req.best_of}, n={req.n})", "best_of")
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise bad_request(f"logprobs must be between 0 and 20 (got {req.logprobs})", "logprobs")
    structured = structured_output(req)
    items = _completion_prompts(req, prompts)
    if req.truncate_prompt_tokens is not None:
        items = [
            PreparedPrompt(
                None, _truncate(i.token_ids, req.truncate_prompt_tokens, req.truncation_side)
            )
            if len(i.token_ids) > req.truncate_prompt_tokens
            else i
            for i in items
        ]
    if len(items) * req.n > MAX_SEQUENCES:
        raise bad_request(
            f"at most {MAX_SEQUENCES} sequences per request (got {len(items)} prompts × n={req.n})",
            "n",
        )
    # echo with logprobs scores the echoed prompt (the engine computes prompt logprobs).
    prompt_lp = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        prompt_lp = max(prompt_lp or 0, req.logprobs)
    sampling = []
    bad_words = bad_words_token_ids(req, prompts)
    for item in items:
        max_tokens = _max_tokens(
            req.max_tokens, "max_tokens", len(item.token_ids), limits.max_model_len, default=16
        )
        sampling.append(
            _sampling(req, max_tokens, req.logprobs, limits, structured, prompt_lp, bad_words)
        )
    return Prepared(
        request_id=_request_id("cmpl", req.request_id),
        prompts=items,
        n=req.n,
        sampling=sampling,
        stream=req.stream,
        include_usage=include_usage,
        logprobs=req.logprobs,
        echo=req.echo,
        cache_salt=req.cache_salt,
        prompt_logprobs=req.prompt_logprobs,
        continuous_usage=continuous,
        token_ids_as_text=req.return_tokens_as_token_ids,
        return_token_ids=req.return_token_ids,
        beam_width=_beam_width(req),
    )
