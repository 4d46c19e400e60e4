"""The step loop without a model: schedule -> runner.execute -> advance -> outputs.

`EngineCore` owns the requests, the scheduler and the KV cache's bookkeeping, and asks a
`Runner` for each step's tokens. It decides when a request ends (stop tokens, stop strings,
grammar, length), counts, and builds the `GenerateOutput`s. Pure Python: no torch, and time
only from the injected Clock, so the twin steps it under a virtual clock with a `SimRunner`.
`LLMEngine` (engine/engine.py) is this with the real model plugged in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenfab.clock import Clock, MonotonicClock
from tokenfab.engine.core.batch import PromptLogprobs, SampledToken
from tokenfab.engine.core.detokenizer import IncrementalDetokenizer
from tokenfab.engine.core.kv_cache import EventSink, KVCacheManager
from tokenfab.engine.core.runner import Runner
from tokenfab.engine.core.scheduler import (
    ScheduledSeq,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from tokenfab.engine.core.sequence import Sequence
from tokenfab.engine.core.tiers import Offloader, OffloadStats
from tokenfab.engine.errors import CorruptLogitsError, InvalidRequestError
from tokenfab.kv.hashing import request_extra_keys
from tokenfab.protocol import (
    GenerateOutput,
    GenerateRequest,
    KVSnapshot,
    LoadReport,
    PositionLogprobs,
    SamplingParams,
)

log = logging.getLogger(__name__)


def _prompt_tokens_in(scheduled: list[ScheduledSeq]) -> int:
    """Prompt tokens a step computes (before `update_computed`): its prefill work."""
    n = 0
    for s in scheduled:
        done = s.seq.num_computed_tokens
        n += max(0, min(done + s.num_new_tokens, s.seq.num_prompt_tokens) - done)
    return n


PREFILL_STEP_TOKENS = 32
"""Steps of at least this many tokens measure the engine's seconds per prompt token."""

DecodeFactory = Callable[[bool], Callable[[list[int]], str]]
"""skip_special_tokens -> a decode function (from the tokenizer); None: no text at all."""


@dataclass
class _RequestState:
    detok: IncrementalDetokenizer | None
    """None without a tokenizer (a simulated engine emits token ids only)."""
    stop_token_ids: frozenset[int]
    """Ids that end the request: stop_token_ids, plus EOS unless ignore_eos."""
    max_output_tokens: int
    pending_logprobs: list[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    """Filled by position while the prompt is computed; sent with the first output."""


class EngineCore:
    """Synchronous engine: add_request(), step() until has_unfinished() is False."""

    def __init__(
        self,
        runner: Runner,
        *,
        vocab_size: int,
        eos_token_ids: list[int],
        max_model_len: int,
        scheduler_config: SchedulerConfig,
        enable_prefix_caching: bool = True,
        event_sink: EventSink | None = None,
        clock: Clock | None = None,
        decode: DecodeFactory | None = None,
        offload: Offloader | None = None,
    ) -> None:
        self.runner: Runner = runner
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = max_model_len
        self._decode = decode
        self.offload = offload
        """The KV tiers below G1 (None: G1 only); it moves the bytes, `step` says when."""
        self.kv = KVCacheManager(
            runner.num_blocks,
            runner.block_size,
            enable_prefix_caching,
            event_sink,
            lower_tiers=offload.store if offload is not None else None,
        )
        self._clock: Clock = clock or MonotonicClock()
        self.scheduler = Scheduler(scheduler_config, self.kv, self._clock)
        self._seqs: dict[str, Sequence] = {}
        self._prompt_tokens = 0
        self._prefill_tokens = 0
        self._generation_tokens = 0
        self._finished = 0
        self._steps = 0
        self._step_time_ema = 0.0
        self._step_tokens_ema = 0.0
        self._token_cost_ema = 0.0
        """Seconds per scheduled token on prefill-sized steps (0: none measured yet)."""
        self._first_step_seen = False
        self._step_tokens = 0
        """Tokens of the step in progress (0: none): read by `stats` from another thread."""
        self._last_step_end: float | None = None
        self._announce_tiers()

    def _announce_tiers(self) -> None:
        """KV events for what the lower tiers already hold (a G3 directory kept across a
        restart, a host segment other workers filled)."""
        if self.offload is not None:
            for tier, hashes in self.offload.store.known():
                self.kv.emit_tier_events(tier, hashes, [])

    def close(self) -> None:
        """Write G1's cached blocks to the lower tiers, finish the writes and release the tiers
        (G3 keeps its extents for the next engine)."""
        if self.offload is not None:
            self.offload.save_cached(self.kv)
            self.offload.close()
            self.offload = None
            self.kv.lower_tiers = None

    # ------------------------------------------------------------------ requests

    def validate(self, req: GenerateRequest) -> None:
        """Raise InvalidRequestError (with the numbers) if `req` cannot be served. Reads no
        mutable state, so any thread may call it."""
        p = req.sampling
        try:
            p.validate()
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        n = len(req.prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt is empty: at least one token is needed")
        bad = next(
            ((i, t) for i, t in enumerate(req.prompt_token_ids) if not 0 <= t < self.vocab_size),
            None,
        )
        if bad is not None:
            raise InvalidRequestError(
                f"prompt token id {bad[1]} at position {bad[0]} is outside the vocabulary "
                f"(size {self.vocab_size})"
            )
        bad_stop = [t for t in p.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise InvalidRequestError(
                f"stop_token_ids {bad_stop} are outside the vocabulary (size {self.vocab_size})"
            )
        bad_bias = [t for t in p.logit_bias if t >= self.vocab_size]
        if bad_bias:
            raise InvalidRequestError(
                f"logit_bias token ids {bad_bias} are outside the vocabulary "
                f"(size {self.vocab_size})"
            )
        bad_allowed = [t for t in p.allowed_token_ids if t >= self.vocab_size]
        if bad_allowed:
            raise InvalidRequestError(
                f"allowed_token_ids {bad_allowed} are outside the vocabulary "
                f"(size {self.vocab_size})"
            )
        self.runner.validate(p)
        need = n + (p.max_tokens or 1)
        if need > self.max_model_len:
            what = f"max_tokens {p.max_tokens}" if p.max_tokens else "one generated token"
            raise InvalidRequestError(
                f"prompt has {n} tokens; max_model_len is {self.max_model_len} "
                f"({what} would need {need})"
            )

    def add_request(self, req: GenerateRequest) -> None:
        self.validate(req)
        if req.request_id in self._seqs:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use")
        p = req.sampling
        extra_keys = request_extra_keys(req.lora_name, req.cache_salt)
        if p.prompt_logprobs is not None:
            # Every prompt position needs its logits: no cached prefix may be reused.
            extra_keys = (*extra_keys, f"prompt_logprobs={req.request_id}")
        seq = Sequence(
            req.request_id,
            list(req.prompt_token_ids),
            p,
            block_size=self.runner.block_size,
            extra_keys=extra_keys,
            lora_name=req.lora_name,
            max_total_tokens=self.max_model_len,
        )
        stop_ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        room = self.max_model_len - len(req.prompt_token_ids)
        seq.state = _RequestState(
            detok=None
            if self._decode is None
            else IncrementalDetokenizer(
                self._decode(p.skip_special_tokens),
                seq.prompt_token_ids,
                list(p.stop),
                p.include_stop_str_in_output,
            ),
            stop_token_ids=frozenset(stop_ids),
            max_output_tokens=min(p.max_tokens or room, room),
            prompt_logprobs=None
            if p.prompt_logprobs is None
            else [None] * len(req.prompt_token_ids),
        )
        self.runner.add(seq)  # may raise InvalidRequestError (a grammar)
        try:
            self.scheduler.add(seq)  # may raise QueueFullError
        except BaseException:
            self.runner.drop(seq)
            raise
        self._seqs[req.request_id] = seq

    def abort(self, request_id: str) -> GenerateOutput | None:
        """Stop a request and free its blocks; returns its final output (None if unknown)."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self._finish(seq, "abort")
        return self._output(seq, [], finished=True)

    def warm_up(self, prompt_tokens: int = 96, output_tokens: int = 4) -> None:
        """Run one short request through prefill and decode, then forget it: the first
        forward pass of a process pays one-time costs (oneDNN and OpenMP set-up, first-touch
        of buffers; ~2 s measured on the 2-CPU machine) that would otherwise land on the
        first client's TTFT. A second prompt's prefill then measures the seconds per token
        (`expected_step_seconds`). Afterwards the engine is as if new: counters at zero, an
        empty prefix cache and no KV events (routers see a fresh engine)."""
        n = min(prompt_tokens, self.max_model_len - output_tokens - 1)
        if n < 1 or self.has_unfinished():
            return
        sink, self.kv.event_sink = self.kv.event_sink, None
        tiers, self.kv.lower_tiers = self.kv.lower_tiers, None  # keep warm-up blocks out
        try:
            for k, max_tokens in enumerate((output_tokens, 1)):
                ids = [(i * 7919 + k) % (self.vocab_size - 1) + 1 for i in range(n)]
                self.add_request(
                    GenerateRequest(
                        request_id=f"tokenfab-warm-up-{k}",
                        prompt_token_ids=ids,
                        sampling=SamplingParams(
                            max_tokens=max_tokens, ignore_eos=True, temperature=0.0
                        ),
                    )
                )
                while self.has_unfinished():
                    self.step()
            self.kv.reset_prefix_cache()
        finally:
            self.kv.event_sink = sink
            self.kv.lower_tiers = tiers
        self.kv.restart_events()
        self._announce_tiers()
        self._prompt_tokens = self._generation_tokens = self._finished = self._steps = 0
        self._prefill_tokens = 0
        # the set-up step's seconds would linger in the averages
        self._step_time_ema = self._step_tokens_ema = 0.0
        self.kv.prefix_queries = self.kv.prefix_hits = 0

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self._seqs)

    @property
    def stats_steps(self) -> int:
        """Steps that ran (scheduled at least one token)."""
        return self._steps

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache (only when idle); emits AllBlocksCleared."""
        done = self.kv.reset_prefix_cache()
        self.kv.flush_events()
        return done

    # ------------------------------------------------------------------ one step

    def step(self) -> list[GenerateOutput]:
        """Run one scheduled step; return the outputs of the requests it advanced."""
        sched = self.scheduler.schedule()
        if self.offload is not None:
            # Offload evicted blocks, then onboard into fresh ones, before the model runs.
            self.offload.before_step(sched, self.kv)
        if sched.is_empty:
            self._flush_events()
            return []
        self._steps += 1
        started = self._clock.now()
        self._mark_prompt_logits(sched)
        self._step_tokens = sched.num_batched_tokens
        self._prefill_tokens += _prompt_tokens_in(sched.scheduled)
        try:
            result = self.runner.execute(sched)
        except CorruptLogitsError:
            self._step_tokens = 0
            # Not a failure of some requests to isolate: the runner's numbers cannot be
            # trusted, so it goes up to the owner (AsyncEngine quarantines the engine). The
            # step did end, so the heartbeat moves (a quarantined worker is not also "hung").
            self._last_step_end = self._clock.now()
            raise
        outputs: list[GenerateOutput] = []
        for seq, message in result.failed:
            outputs.extend(self._fail([seq], message))
        self.scheduler.update_computed(sched)
        for lps in result.prompt_logprobs:
            self._record_prompt_logprobs(lps)
        for sampled in result.tokens:
            if sampled.seq.is_finished:
                continue
            try:
                outputs.append(self._advance(sampled))
            except Exception as e:
                log.exception("request %s failed", sampled.seq.request_id)
                outputs.extend(self._fail([sampled.seq], f"request failed: {e}"))
        self._flush_events()
        self._last_step_end = end = self._clock.now()
        seconds = result.seconds
        self._record_step_time(end - started if seconds is None else seconds, self._step_tokens)
        return outputs

    def _flush_events(self) -> None:
        if self.offload is not None:
            self.offload.after_step(self.kv)
        self.kv.flush_events()

    def _record_step_time(self, seconds: float, tokens: int) -> None:
        self._step_tokens = 0
        ema = self._step_time_ema
        self._step_time_ema = seconds if ema == 0.0 else 0.9 * ema + 0.1 * seconds
        self._step_tokens_ema = tokens if ema == 0.0 else 0.9 * self._step_tokens_ema + 0.1 * tokens
        # The per-token cost comes from prefill-sized steps only (a decode step's time is
        # mostly fixed cost), and never from a process's first step, which pays one-time
        # set-up (warm_up runs a second prefill so a fresh engine has a figure).
        if tokens >= PREFILL_STEP_TOKENS and self._first_step_seen:
            cost, old = seconds / tokens, self._token_cost_ema
            self._token_cost_ema = cost if old == 0.0 else 0.7 * old + 0.3 * cost
        self._first_step_seen = True

    def set_prefill_budget(self, tokens: int | None) -> None:
        """Prompt tokens one step may compute from now on (None: the whole step budget); a
        worker's role decides it."""
        if tokens is not None and tokens < 1:
            raise ValueError(f"a prefill budget must be at least 1 token, got {tokens}")
        self.scheduler.config.max_prefill_tokens = tokens

    def expected_step_seconds(self) -> float:
        """How long the step in progress should take (0: none running, or nothing measured):
        what a health check waits for before it calls a busy engine hung, so a long prefill
        on a slow machine is not mistaken for a hang."""
        tokens = self._step_tokens
        if tokens == 0:
            return 0.0
        return max(self._step_time_ema, self._token_cost_ema * tokens)

    def _mark_prompt_logits(self, sched: SchedulerOutput) -> None:
        """Ask the runner for every row of the prompt chunks of prompt-logprobs requests."""
        for chunk, s in zip(sched.batch.chunks, sched.scheduled, strict=True):
            st: _RequestState = s.seq.state
            if st.prompt_logprobs is not None and chunk.start_pos < s.seq.num_prompt_tokens:
                chunk.all_logits = True

    def _record_prompt_logprobs(self, lps: PromptLogprobs) -> None:
        st: _RequestState = lps.seq.state
        if st.prompt_logprobs is None:
            return
        for r, entry in enumerate(lps.entries):
            st.prompt_logprobs[lps.first + r] = entry

    def _advance(self, sampled: SampledToken) -> GenerateOutput:
        seq, token = sampled.seq, sampled.token_id
        st: _RequestState = seq.state
        p = seq.params
        seq.append_token(token)
        self._generation_tokens += 1
        if seq.num_output_tokens == 1:
            self._prompt_tokens += seq.num_prompt_tokens
        if sampled.logprobs is not None:
            st.pending_logprobs.append(sampled.logprobs)
        reason: str | None = None
        stop_reason: str | int | None = None
        detok = st.detok
        past_min = seq.num_output_tokens > p.min_tokens
        if sampled.grammar_stop:
            reason = "stop"
            if detok is not None:
                detok.add(token)
        elif token in st.stop_token_ids and past_min:
            reason = "stop"
            stop_reason = token if token in p.stop_token_ids else None
            if p.include_stop_str_in_output and detok is not None:
                detok.add(token)
        elif detok is not None:
            matched = detok.add(token, check_stop=past_min)
            if matched is not None:
                reason, stop_reason = "stop", matched
        if reason is None and (
            seq.num_output_tokens >= st.max_output_tokens or seq.num_tokens >= self.max_model_len
        ):
            reason = "length"
        if reason is not None:
            self._finish(seq, reason, stop_reason)
            self._seqs.pop(seq.request_id, None)
        return self._output(seq, [token], finished=reason is not None)

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        self.scheduler.finish(seq, reason, stop_reason)
        self.runner.drop(seq)
        self._finished += 1

    def _output(self, seq: Sequence, tokens: list[int], finished: bool) -> GenerateOutput:
        st: _RequestState = seq.state
        lps = None
        if seq.params.logprobs is not None:
            lps, st.pending_logprobs = st.pending_logprobs, []
        prompt_lps = None
        if st.prompt_logprobs is not None and (tokens or finished):
            prompt_lps, st.prompt_logprobs = st.prompt_logprobs, None
        return GenerateOutput(
            request_id=seq.request_id,
            token_ids=tokens,
            text=st.detok.take(finished) if st.detok is not None else "",
            logprobs=lps,
            finish_reason=seq.finish_reason if finished else None,  # type: ignore[arg-type]
            stop_reason=seq.stop_reason if finished else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=max(seq.num_cached_tokens, 0),
            prompt_logprobs=prompt_lps,
        )

    def _fail(self, seqs: list[Sequence], message: str) -> list[GenerateOutput]:
        outs = []
        for seq in seqs:
            if seq.is_finished:
                continue
            self._finish(seq, "error")
            self._seqs.pop(seq.request_id, None)
            out = self._output(seq, [], finished=True)
            out.error = message
            outs.append(out)
        self.kv.flush_events()
        return outs

    def fail_all(self, message: str) -> list[GenerateOutput]:
        """Fail every request (used when the loop itself hit an unexpected error)."""
        return self._fail(list(self._seqs.values()), message)

    def stats(self) -> LoadReport:
        """The engine's load and counters (worker_id and timestamp left for the worker)."""
        sched = self.scheduler
        queued = sum(
            max(0, seq.num_prompt_tokens - seq.num_computed_tokens)
            for seq in (*sched.running, *sched.waiting)
        )
        tiers = self.offload.stats if self.offload is not None else OffloadStats()
        return LoadReport(
            kv_offloaded_blocks=tiers.offloaded_blocks,
            kv_onboarded_blocks=tiers.onboarded_blocks,
            kv_onboard_failed_blocks=tiers.onboard_shortfall_blocks,
            running=len(sched.running),
            waiting=len(sched.waiting),
            kv_blocks_used=self.kv.num_used_blocks,
            kv_blocks_total=self.kv.num_blocks,
            queued_prefill_tokens=queued,
            last_event_id=self.kv.last_event_id,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=sched.num_preemptions,
            prompt_tokens=self._prompt_tokens,
            prefill_tokens_computed=self._prefill_tokens,
            generation_tokens=self._generation_tokens,
            requests_finished=self._finished,
            num_steps=self._steps,
            step_time_ema=self._step_time_ema,
            step_tokens_ema=self._step_tokens_ema,
            step_expected_s=self.expected_step_seconds(),
            step_age_s=self.step_age(),
        )

    def step_age(self) -> float:
        """Seconds since the last step ended (0 before the first): the step heartbeat."""
        last = self._last_step_end
        return 0.0 if last is None else max(0.0, self._clock.now() - last)

    def kv_snapshot(self, worker_id: str = "") -> KVSnapshot:
        """Every cached block hash with the id of the newest KV event: what a router that
        missed events resyncs from."""
        return KVSnapshot(
            worker_id=worker_id,
            last_event_id=self.kv.last_event_id,
            block_hashes=self.kv.cached_hashes(),
            tier_hashes=dict(self.offload.store.known()) if self.offload is not None else {},
        )
