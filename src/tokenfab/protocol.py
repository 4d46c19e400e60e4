"""Every message that crosses a component boundary.

msgspec Structs, encoded as msgpack on the wire (`encode` / `decode` below); never pickle.
Components know each other only through these types.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

FinishReason = Literal["stop", "length", "abort", "error"]

StructuredKind = Literal["json", "json_object", "regex", "choice", "grammar"]


class StructuredOutput(msgspec.Struct, kw_only=True, frozen=True):
    """A constraint on the generated text, enforced token by token (engine/structured.py)."""

    kind: StructuredKind
    spec: str
    """json: a JSON schema (as JSON text); json_object: ignored; regex: a regular expression;
    choice: a JSON list of strings; grammar: Lark or GBNF/EBNF text."""


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How to pick tokens and when to stop. Field names and defaults follow vLLM's, so users
    can carry code over."""

    max_tokens: int | None = 16
    """Generated-token cap; None means up to the model's context length."""
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 disables top-k."""
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the sampled token's logprob plus the top-k alternatives."""
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = {}
    """Added to the logits of these token ids before sampling (OpenAI's range: [-100, 100])."""
    structured: StructuredOutput | None = None
    prompt_logprobs: int | None = None
    """None: none; k >= 0: every prompt token's logprob (the first is null) plus top-k."""
    allowed_token_ids: list[int] = []
    """vLLM's allowed_token_ids: when non-empty, every other token is masked out."""
    bad_words_token_ids: list[list[int]] = []
    """vLLM's bad_words, tokenized: the last token of a word is masked out while the output
    ends with the tokens before it (a one-token word is never generated)."""

    def validate(self) -> None:
        """Raise ValueError with a message fit for an API client if any field is out of range."""
        _check(
            self.max_tokens is None or self.max_tokens >= 1,
            "max_tokens must be at least 1",
            self.max_tokens,
        )
        _check(self.min_tokens >= 0, "min_tokens must be non-negative", self.min_tokens)
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens must not exceed max_tokens",
            self.min_tokens,
        )
        _check(
            _finite(self.temperature) and self.temperature >= 0.0,
            "temperature must be a finite number >= 0",
            self.temperature,
        )
        _check(
            _finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]", self.top_p
        )
        _check(self.top_k >= -1, "top_k must be -1, 0 (disabled) or a positive integer", self.top_k)
        _check(
            _finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]", self.min_p
        )
        _check(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0.0,
            "repetition_penalty must be > 0",
            self.repetition_penalty,
        )
        _check(
            _finite(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
            "presence_penalty must be in [-2, 2]",
            self.presence_penalty,
        )
        _check(
            _finite(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
            "frequency_penalty must be in [-2, 2]",
            self.frequency_penalty,
        )
        _check(
            self.logprobs is None or 0 <= self.logprobs <= 20,
            "logprobs must be between 0 and 20",
            self.logprobs,
        )
        _check(
            self.seed is None or -(2**63) <= self.seed < 2**64,
            "seed must be in [-2**63, 2**64)",
            self.seed,
        )
        _check(
            self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
            "prompt_logprobs must be between 0 and 20",
            self.prompt_logprobs,
        )
        _check(
            all(_finite(v) and -100.0 <= v <= 100.0 for v in self.logit_bias.values()),
            "logit_bias values must be in [-100, 100]",
            self.logit_bias,
        )
        _check(
            all(t >= 0 for t in self.logit_bias),
            "logit_bias token ids must be non-negative",
            list(self.logit_bias),
        )
        _check(
            all(t >= 0 for t in self.allowed_token_ids),
            "allowed_token_ids must be non-negative",
            self.allowed_token_ids,
        )
        _check(
            all(w and all(t >= 0 for t in w) for w in self.bad_words_token_ids),
            "bad_words must tokenize to non-empty, non-negative token ids",
            self.bad_words_token_ids,
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            "stop strings must be non-empty",
            self.stop,
        )
        _check(len(self.stop) <= 16, "at most 16 stop strings", len(self.stop))
        _check(
            all(t >= 0 for t in self.stop_token_ids),
            "stop_token_ids must be non-negative",
            self.stop_token_ids,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _check(ok: bool, message: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{message} (got {value!r})")


class GenerateRequest(msgspec.Struct, kw_only=True):
    """A tokenized prompt to complete. Built by the frontend (or `LLM`), run by an engine."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    cache_salt: str | None = None
    """Extra key folded into every block hash, isolating this request's prefix cache."""
    lora_name: str | None = None
    remote_prefill: RemotePrefill | None = None
    """Disaggregated serving: the prompt is computed on another worker (see RemotePrefill)."""


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float


class PositionLogprobs(msgspec.Struct, array_like=True):
    """The sampled token's logprob and the top alternatives at one position."""

    token_id: int
    logprob: float
    top: list[TokenLogprob] = []


class GenerateOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One step of a request's stream: the tokens (and text) new since the previous output."""

    request_id: str
    token_ids: list[int] = []
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the request, if any."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    """Sent once, on the first output, when the request asked for prompt logprobs."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# ---------------------------------------------------------------- KV events (router input)


KVTier = Literal["device", "host", "disk", "remote"]
"""Where a worker holds a block: G1 its engine's pool, G2 host shared memory, G3 local disk,
G4 a remote store (tokenfab.kv). A router counts a hit in a lower tier as cheaper than
recomputing the block but dearer than a G1 hit."""


class BlockStored(msgspec.Struct, tag=True, kw_only=True):
    """Full blocks became cached (and so reusable by prefix) on an engine, in `tier`.
    Lower-tier events carry no token ids and no parent (the blocks' chain is in G1's events)."""

    event_id: int
    block_hashes: list[int]
    parent_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_name: str | None = None
    tier: KVTier = "device"


class BlockRemoved(msgspec.Struct, tag=True, kw_only=True):
    """Cached blocks were evicted from `tier` of that engine."""

    event_id: int
    block_hashes: list[int]
    tier: KVTier = "device"


class AllBlocksCleared(msgspec.Struct, tag=True, kw_only=True):
    """The engine dropped its whole prefix cache (e.g. reset)."""

    event_id: int


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, kw_only=True):
    """KV events of one engine, in event-id order, as published on the event plane."""

    worker_id: str
    events: list[KVEvent]
    timestamp: float = 0.0
    """Wall-clock seconds when published (the router's event-lag metric)."""


class LoadReport(msgspec.Struct, kw_only=True):
    """A worker's load and its engine's counters: what `engine.stats()` returns, what a worker
    publishes periodically for the router and planner, and what `/metrics` shows."""

    worker_id: str = ""
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    """Blocks held by running or waiting requests (the router's decode cost)."""
    kv_blocks_total: int = 0
    queued_prefill_tokens: int = 0
    """Prompt tokens admitted or waiting but not yet computed (the router's prefill cost)."""
    timestamp: float = 0.0
    last_event_id: int = 0
    """Id of the newest KV event the engine has emitted (0: none; the first is 1); a router
    that has seen less knows it missed some."""
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached."""
    prompt_tokens: int = 0
    prefill_tokens_computed: int = 0
    """Prompt tokens this engine ran through the model (not found cached, not imported from
    a prefill worker): the prefill work it did, wherever the request finished."""
    generation_tokens: int = 0
    requests_finished: int = 0
    num_steps: int = 0
    step_time_ema: float = 0.0
    """Seconds per engine step, exponentially averaged (0: no step yet)."""
    step_tokens_ema: float = 0.0
    """Tokens per engine step, averaged like `step_time_ema` (what a step's time is compared
    at: a prefill worker's long steps are not a straggler's)."""
    step_expected_s: float = 0.0
    """How long the step in progress should take, from its tokens and the engine's measured
    seconds per token (0: no step running, or nothing measured yet)."""
    kv_blocks_held: int = 0
    """Blocks kept for other workers to pull (disaggregated prefill)."""
    kv_blocks_imported: int = 0
    """Blocks received from other workers (total)."""
    kv_offloaded_blocks: int = 0
    """Blocks evicted from G1 and written to the tiers below it (total)."""
    kv_onboarded_blocks: int = 0
    """Blocks loaded back from the tiers below G1 instead of recomputed (total)."""
    kv_onboard_failed_blocks: int = 0
    """Blocks planned for loading from a tier that did not load (missing or failing their
    checksum) and were recomputed (total)."""
    step_age_s: float = 0.0
    """The step heartbeat: seconds since the engine's last step ended, on the worker's own
    clock when this report was made. With `running` it tells a hung engine (work, no steps)
    from an idle one, without comparing clocks across hosts."""
    state: WorkerState = "serving"
    state_reason: str = ""
    """Why the worker is draining or quarantined (empty while serving)."""


WorkerState = Literal["serving", "draining", "quarantined"]
"""serving: takes work; draining: finishing what it has (SIGTERM), takes none; quarantined:
its engine produced corrupt output (NaN/Inf logits) and it takes no work."""

WorkerRole = Literal["aggregated", "prefill", "decode"]


class WorkerInfo(msgspec.Struct, kw_only=True):
    """What a worker tells discovery about itself: everything a frontend, router or planner
    needs to send it work."""

    model: str
    max_model_len: int
    block_size: int
    role: WorkerRole = "aggregated"
    model_path: str = ""
    kv_blocks_total: int = 0
    max_num_seqs: int = 0
    data_address: str = ""
    """host:port of the worker's KV data plane ("" when it has none)."""
    engine: str = "tokenfab"


class KVSnapshot(msgspec.Struct, kw_only=True):
    """A worker's whole prefix cache at one event id: how a router that joined late or missed
    events learns the worker's state."""

    worker_id: str
    last_event_id: int
    block_hashes: list[int]
    tier_hashes: dict[str, list[int]] = {}
    """Blocks in the tiers below G1, by tier name (host, disk, remote)."""


class RouteRequest(msgspec.Struct, kw_only=True):
    """Ask a standalone router (`tokenfab router`, its `route` endpoint) where a request goes."""

    request_id: str
    block_hashes: list[int]
    """The prompt's chained block hashes (tokenfab.kv.hashing), as the engines compute them."""
    num_prompt_tokens: int
    exclude: list[str] = []
    """Workers not to choose (they failed this request already)."""


class RouteResponse(msgspec.Struct, kw_only=True):
    worker_id: str
    overlap_blocks: int
    predicted_hit_tokens: int


class SnapshotRequest(msgspec.Struct, kw_only=True):
    """Ask a worker for its KVSnapshot (its `kv_snapshot` endpoint)."""


class StatsRequest(msgspec.Struct, kw_only=True):
    """Ask a worker for a fresh LoadReport (its `stats` endpoint)."""


# ---------------------------------------------------------------- disaggregated serving


class RemotePrefill(msgspec.Struct, kw_only=True):
    """Attached to a GenerateRequest sent to a decode worker: have this prefill worker compute
    the prompt (and first token), then pull its KV blocks (tokenfab.kv.transfer)."""

    worker_id: str
    min_uncached_tokens: int = 0
    """Prefill locally instead when fewer prompt tokens than this are missing here."""
    hold_s: float = 30.0
    """How long the prefill worker keeps the blocks for the pull."""


class PrefillRequest(msgspec.Struct, kw_only=True):
    """A prefill worker's `prefill` endpoint: compute the prompt and its first token, and hold
    the prompt's full blocks for `hold_s` seconds (or until pulled with release)."""

    request: GenerateRequest
    hold_s: float = 30.0


class PrefillResponse(msgspec.Struct, kw_only=True):
    output: GenerateOutput
    """The first token's output. finish_reason set: the request is complete already."""
    hold_id: str
    block_hashes: list[int]
    """The held blocks' chained hashes (the prompt's leading full blocks)."""
    data_address: str
    """Where to pull them (`host:port` of the worker's KV data plane, or `inproc://id`)."""
    block_bytes: int


KVFrameKind = Literal["pull", "blocks", "done", "error"]


class KVFrameHeader(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Header of one KV data-plane frame (kv/transfer.py); `payload_bytes` of raw block bytes
    follow it."""

    kind: KVFrameKind
    hold_id: str = ""
    block_hashes: list[int] = []
    """pull: the blocks wanted, in chain order; blocks: the blocks in this frame's payload."""
    block_bytes: int = 0
    payload_bytes: int = 0
    checksum: int = 0
    """xxh3-64 of the payload."""
    release: bool = False
    """pull: let the hold go once these blocks are sent."""
    message: str = ""
    """error: what went wrong."""


class RoleChange(msgspec.Struct, kw_only=True):
    """Ask a worker to change role (its `set_role` endpoint; the planner sends it): it stops
    taking new requests, lets the ones in flight finish, switches, and announces itself
    again with the new role."""

    role: WorkerRole
    drain_timeout_s: float = 600.0
    """If requests are still in flight after this long, the worker keeps its old role and
    answers `failed` (nothing is aborted)."""


RoleChangePhase = Literal["draining", "done", "failed"]


class RoleChangeStatus(msgspec.Struct, kw_only=True):
    """A worker's answers to a RoleChange: `draining` (with the requests in flight) first,
    then `done` (the new role is announced) or `failed` (with why; the old role stays)."""

    worker_id: str
    role: WorkerRole
    """The role the worker has now."""
    phase: RoleChangePhase
    in_flight: int = 0
    message: str = ""


# Well-known names on the runtime (discovery component and event topics).
WORKER_COMPONENT = "worker"
ROUTER_COMPONENT = "router"
KV_EVENTS_TOPIC = "kv_events"
"""KVEventBatch messages from every worker."""
LOAD_TOPIC = "load"
"""LoadReport messages from every worker."""
SET_ROLE_ENDPOINT = "set_role"
"""A worker's control endpoint: RoleChange in, a stream of RoleChangeStatus out."""


# ---------------------------------------------------------------- wire encoding

_encoder = msgspec.msgpack.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decoder(typ: type) -> msgspec.msgpack.Decoder:
    """A reusable decoder for one message type (or a union)."""
    return msgspec.msgpack.Decoder(typ)
