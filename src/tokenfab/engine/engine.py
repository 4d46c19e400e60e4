"""The step loop: scheduler -> runner -> sampler -> detokenizer -> outputs.

`LLMEngine` is synchronous and single-threaded (used by `LLM` and by `AsyncEngine`'s thread).
`AsyncEngine` runs an LLMEngine in one background thread (torch releases the GIL while it
computes) and hands each step's outputs to asyncio with one `call_soon_threadsafe` per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from tokenfab.clock import Clock, MonotonicClock
from tokenfab.config import EngineConfig
from tokenfab.engine.detokenizer import IncrementalDetokenizer, decode_fn
from tokenfab.engine.errors import (
    EngineDeadError,
    EngineError,
    InvalidRequestError,
    QueueFullError,
)
from tokenfab.engine.kv_cache import EventSink, KVCacheManager
from tokenfab.engine.runner import Runner, StepBatch
from tokenfab.engine.sampler import (
    Sampler,
    SampleResult,
    SampleRow,
    make_generator,
    position_logprobs,
)
from tokenfab.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tokenfab.engine.sequence import Sequence
from tokenfab.engine.structured import GrammarCompiler, GrammarError
from tokenfab.engine.threads import ThreadTuner, available_cpus, settle_threadsafe
from tokenfab.kv.hashing import request_extra_keys
from tokenfab.kv.offload import KVOffloader, build_offloader
from tokenfab.protocol import (
    GenerateOutput,
    GenerateRequest,
    KVSnapshot,
    LoadReport,
    PositionLogprobs,
    SamplingParams,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _RequestState:
    detok: IncrementalDetokenizer
    stop_token_ids: frozenset[int]
    """Ids that end the request: stop_token_ids, plus EOS unless ignore_eos."""
    suppress_until_min: list[int]
    max_output_tokens: int
    generator: torch.Generator | None
    uses_history: bool
    pending_logprobs: list[PositionLogprobs] = field(default_factory=list)
    matcher: Any = None
    """The request's grammar state (an llguidance LLMatcher) under structured output."""
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    """Filled by position while the prompt is computed; sent with the first output."""


class LLMEngine:
    """Synchronous engine: add_request(), step() until has_unfinished() is False."""

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        event_sink: EventSink | None = None,
        clock: Clock | None = None,
        loaded: Any = None,
        runner: Runner | None = None,
    ) -> None:
        from tokenfab.engine.loader import load_model
        from tokenfab.engine.runner import TorchRunner, kv_bytes_per_block

        self.config = config = config or EngineConfig()
        if loaded is None:
            loaded = load_model(config.model, config.dtype, config.device)
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_config = mc = loaded.config
        self.model_name: str = loaded.name
        self.vocab_size: int = mc.vocab_size
        self.eos_token_ids: list[int] = list(mc.eos_token_ids)

        bs = config.block_size
        if config.num_kv_blocks:
            num_blocks = config.num_kv_blocks
        else:
            per_block = kv_bytes_per_block(mc, bs)
            num_blocks = max(1, int(config.kv_cache_memory_gb * (1 << 30)) // per_block)
        if config.max_model_len and config.max_model_len > mc.max_position_embeddings:
            # Positions past the model's trained context have no rotary table (and no meaning).
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's context length "
                f"{mc.max_position_embeddings}"
            )
        context = config.max_model_len or mc.max_position_embeddings
        # A request must fit the pool on its own, or it could never be scheduled.
        self.max_model_len: int = min(context, num_blocks * bs)
        if self.max_model_len < context:
            log.warning(
                "max_model_len lowered from %d to %d: the KV pool holds only %d blocks of %d",
                context, self.max_model_len, num_blocks, bs,
            )  # fmt: skip
        budget = config.max_num_batched_tokens
        if not config.enable_chunked_prefill:
            budget = max(budget, self.max_model_len)  # a whole prompt must fit one step
        self.runner: Runner = runner or TorchRunner(
            loaded, num_blocks, bs, num_threads=config.num_threads
        )
        self.offload: KVOffloader | None = build_offloader(config, self.runner)
        self.kv = KVCacheManager(
            num_blocks,
            bs,
            config.enable_prefix_caching,
            event_sink,
            lower_tiers=self.offload.store if self.offload is not None else None,
        )
        self._clock: Clock = clock or MonotonicClock()
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=budget,
                enable_chunked_prefill=config.enable_chunked_prefill,
                max_waiting=config.max_waiting,
            ),
            self.kv,
            self._clock,
        )
        self.sampler = Sampler(config.seed)
        # Thread count measured per step unless fixed by the user (see threads.py).
        cpus = available_cpus()
        self._tuner = (
            ThreadTuner(cpus)
            if config.num_threads is None and config.device == "cpu" and cpus > 1
            else None
        )
        self._grammars: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self._seqs: dict[str, Sequence] = {}
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._finished = 0
        self._steps = 0
        self._step_time_ema = 0.0
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

    @property
    def grammars(self) -> GrammarCompiler:
        """Built on first use: the tokenizer's llguidance view costs ~0.3 s."""
        with self._grammar_lock:
            if self._grammars is None:
                eos = self.eos_token_ids[0] if self.eos_token_ids else None
                self._grammars = GrammarCompiler(self.tokenizer, eos, self.vocab_size)
            return self._grammars

    def _with_grammars(self, use: Callable[[GrammarCompiler], T]) -> T:
        """`use(compiler)` under the compiler's lock; a bad grammar is the client's error."""
        try:
            grammars = self.grammars
            with self._grammar_lock:
                return use(grammars)
        except GrammarError as e:
            raise InvalidRequestError(str(e)) from None

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
        if p.structured is not None:
            spec = p.structured
            self._with_grammars(lambda g: g.compile(spec))
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
        matcher = None
        if p.structured is not None:
            spec = p.structured
            matcher = self._with_grammars(lambda g: g.matcher(spec))
        seq = Sequence(
            req.request_id,
            list(req.prompt_token_ids),
            p,
            block_size=self.config.block_size,
            extra_keys=extra_keys,
            lora_name=req.lora_name,
            max_total_tokens=self.max_model_len,
        )
        stop_ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        room = self.max_model_len - len(req.prompt_token_ids)
        seq.state = _RequestState(
            detok=IncrementalDetokenizer(
                decode_fn(self.tokenizer, p.skip_special_tokens),
                seq.prompt_token_ids,
                list(p.stop),
                p.include_stop_str_in_output,
            ),
            stop_token_ids=frozenset(stop_ids),
            suppress_until_min=sorted(set(p.stop_token_ids) | set(self.eos_token_ids)),
            max_output_tokens=min(p.max_tokens or room, room),
            generator=make_generator(p.seed) if p.seed is not None and not p.greedy else None,
            uses_history=p.repetition_penalty != 1.0
            or p.presence_penalty != 0.0
            or p.frequency_penalty != 0.0,
            matcher=matcher,
            prompt_logprobs=None
            if p.prompt_logprobs is None
            else [None] * len(req.prompt_token_ids),
        )
        self.scheduler.add(seq)  # may raise QueueFullError
        self._seqs[req.request_id] = seq

    def abort(self, request_id: str) -> GenerateOutput | None:
        """Stop a request and free its blocks; returns its final output (None if unknown)."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        self._finished += 1
        return self._output(seq, [], finished=True)

    def warm_up(self, prompt_tokens: int = 96, output_tokens: int = 4) -> None:
        """Run one short request through prefill and decode, then forget it: the first
        forward pass of a process pays one-time costs (oneDNN and OpenMP set-up, first-touch
        of buffers; ~2 s measured on the 2-CPU machine) that would otherwise land on the
        first client's TTFT. Afterwards the engine is as if new: counters at zero, an empty
        prefix cache and no KV events (routers see a fresh engine)."""
        n = min(prompt_tokens, self.max_model_len - output_tokens - 1)
        if n < 1 or self.has_unfinished():
            return
        ids = [(i * 7919) % (self.vocab_size - 1) + 1 for i in range(n)]
        req = GenerateRequest(
            request_id="tokenfab-warm-up",
            prompt_token_ids=ids,
            sampling=SamplingParams(max_tokens=output_tokens, ignore_eos=True, temperature=0.0),
        )
        sink, self.kv.event_sink = self.kv.event_sink, None
        tiers, self.kv.lower_tiers = self.kv.lower_tiers, None  # keep warm-up blocks out
        try:
            self.add_request(req)
            while self.has_unfinished():
                self.step()
            self.kv.reset_prefix_cache()
        finally:
            self.kv.event_sink = sink
            self.kv.lower_tiers = tiers
        self.kv.restart_events()
        self._announce_tiers()
        self._prompt_tokens = self._generation_tokens = self._finished = self._steps = 0
        self.kv.prefix_queries = self.kv.prefix_hits = 0

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self._seqs)

    @property
    def num_threads(self) -> int:
        """The intra-op thread count steps currently run with."""
        return self._tuner.current if self._tuner else torch.get_num_threads()

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
            self.offload.before_step(sched, self.kv)
        if sched.is_empty:
            self._flush_events()
            return []
        self._steps += 1
        started = self._clock.now()
        self._mark_prompt_logits(sched)
        failed: list[GenerateOutput] = []
        try:
            logits = self._execute(sched)
        except Exception:
            log.exception(
                "step of %d sequences failed; retrying them one by one", len(sched.scheduled)
            )
            logits, failed = self._isolate_failure(sched)
        self.scheduler.update_computed(sched)
        logits = self._take_prompt_logprobs(sched, logits)
        outputs = self._sample_and_advance(sched, logits)
        self._flush_events()
        self._record_step_time(self._clock.now() - started)
        return failed + outputs

    def _flush_events(self) -> None:
        if self.offload is not None:
            self.offload.after_step(self.kv)
        self.kv.flush_events()

    def _record_step_time(self, seconds: float) -> None:
        ema = self._step_time_ema
        self._step_time_ema = seconds if ema == 0.0 else 0.9 * ema + 0.1 * seconds

    def _execute(self, sched: SchedulerOutput) -> torch.Tensor:
        tuner = self._tuner
        if tuner is None:
            return self.runner.execute(sched.batch)
        work = sched.num_batched_tokens
        n = tuner.threads_for_next_step(work)
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        t0 = time.perf_counter()
        logits = self.runner.execute(sched.batch)
        tuner.record(time.perf_counter() - t0, work)
        return logits

    def _isolate_failure(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[GenerateOutput]]:
        """Re-run each chunk of a failed step on its own (rewriting the same K/V positions is
        harmless), so only the requests that fail alone are failed; drops those from `sched`."""
        rows: list[torch.Tensor] = []
        failed: list[GenerateOutput] = []
        keep_chunks, keep_sched = [], []
        for chunk, s in zip(sched.batch.chunks, sched.scheduled, strict=True):
            try:
                out = self.runner.execute(StepBatch([chunk]))
            except Exception as e:
                failed.extend(self._fail([s.seq], f"engine step failed: {e}"))
                continue
            keep_chunks.append(chunk)
            keep_sched.append(s)
            if chunk.sample or chunk.all_logits:
                rows.append(out)
        sched.batch.chunks[:] = keep_chunks
        sched.scheduled[:] = keep_sched
        vocab = self.vocab_size
        logits = torch.cat(rows) if rows else torch.empty((0, vocab), dtype=torch.float32)
        return logits, failed

    def _mark_prompt_logits(self, sched: SchedulerOutput) -> None:
        """Ask the runner for every row of the prompt chunks of prompt-logprobs requests."""
        for chunk, s in zip(sched.batch.chunks, sched.scheduled, strict=True):
            st: _RequestState = s.seq.state
            if st.prompt_logprobs is not None and chunk.start_pos < s.seq.num_prompt_tokens:
                chunk.all_logits = True

    def _take_prompt_logprobs(self, sched: SchedulerOutput, logits: torch.Tensor) -> torch.Tensor:
        """Record the prompt logprobs in the all-logits rows; return the sampling rows only."""
        if not any(c.all_logits for c in sched.batch.chunks):
            return logits
        keep: list[int] = []
        row = 0
        for chunk, s in zip(sched.batch.chunks, sched.scheduled, strict=True):
            if chunk.all_logits:
                n = len(chunk.token_ids)
                self._record_prompt_logprobs(s.seq, chunk.start_pos, logits[row : row + n])
                if chunk.sample:
                    keep.append(row + n - 1)
                row += n
            elif chunk.sample:
                keep.append(row)
                row += 1
        return logits[keep]

    def _record_prompt_logprobs(self, seq: Sequence, start: int, rows: torch.Tensor) -> None:
        """Row r predicts the token at position start + r + 1 (position 0 has none)."""
        st: _RequestState = seq.state
        assert st.prompt_logprobs is not None
        prompt = seq.prompt_token_ids
        count = min(rows.shape[0], len(prompt) - 1 - start)
        if count <= 0:
            return
        lp = torch.log_softmax(rows[:count].float(), dim=-1)
        top_n = seq.params.prompt_logprobs or 0
        for r in range(count):
            pos = start + r + 1
            st.prompt_logprobs[pos] = position_logprobs(lp[r], prompt[pos], top_n)

    def _sample_and_advance(
        self, sched: SchedulerOutput, logits: torch.Tensor
    ) -> list[GenerateOutput]:
        to_sample = [s.seq for s in sched.scheduled if s.sample]
        rows = [self._sample_row(seq) for seq in to_sample]
        outputs: list[GenerateOutput] = []
        bitmask = self._grammar_bitmask(to_sample, rows)
        try:
            results: list[SampleResult | None] = list(self.sampler(logits, rows, bitmask))
        except Exception:
            log.exception("batched sampling failed; sampling rows one by one")
            results = []
            for i, (seq, row) in enumerate(zip(to_sample, rows, strict=True)):
                try:
                    results.append(self.sampler(logits[i : i + 1], [row], bitmask)[0])
                except Exception as e:
                    results.append(None)
                    outputs.extend(self._fail([seq], f"sampling failed: {e}"))
        for seq, res in zip(to_sample, results, strict=True):
            if res is None:
                continue
            try:
                outputs.append(self._advance(seq, res.token_id, res.logprobs))
            except Exception as e:
                log.exception("request %s failed", seq.request_id)
                outputs.extend(self._fail([seq], f"request failed: {e}"))
        return outputs

    def _grammar_bitmask(self, seqs: list[Sequence], rows: list[SampleRow]) -> Any:
        """One batched mask computation for the step's constrained rows (sets their mask_row)."""
        matchers = []
        for seq, row in zip(seqs, rows, strict=True):
            m = seq.state.matcher
            if m is not None:
                row.mask_row = len(matchers)
                matchers.append(m)
        return self.grammars.fill_bitmask(matchers) if matchers else None

    def _sample_row(self, seq: Sequence) -> SampleRow:
        st: _RequestState = seq.state
        p = seq.params
        suppress = st.suppress_until_min if seq.num_output_tokens < p.min_tokens else []
        # Token history is only read by penalties; skip the O(length) copy otherwise.
        history = st.uses_history
        return SampleRow(
            p,
            seq.prompt_token_ids if history else [],
            seq.output_token_ids if history else [],
            st.generator,
            suppress,
        )

    def _advance(
        self, seq: Sequence, token: int, logprobs: PositionLogprobs | None
    ) -> GenerateOutput:
        st: _RequestState = seq.state
        p = seq.params
        seq.append_token(token)
        self._generation_tokens += 1
        if seq.num_output_tokens == 1:
            self._prompt_tokens += seq.num_prompt_tokens
        if logprobs is not None:
            st.pending_logprobs.append(logprobs)
        reason: str | None = None
        stop_reason: str | int | None = None
        if st.matcher is not None:
            reason = self._advance_grammar(st.matcher, token)
        past_min = seq.num_output_tokens > p.min_tokens
        if reason is not None:
            st.detok.add(token)
        elif token in st.stop_token_ids and past_min:
            reason = "stop"
            stop_reason = token if token in p.stop_token_ids else None
            if p.include_stop_str_in_output:
                st.detok.add(token)
        else:
            matched = st.detok.add(token, check_stop=past_min)
            if matched is not None:
                reason, stop_reason = "stop", matched
        if reason is None and (
            seq.num_output_tokens >= st.max_output_tokens or seq.num_tokens >= self.max_model_len
        ):
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason, stop_reason)
            self._seqs.pop(seq.request_id, None)
            self._finished += 1
        return self._output(seq, [token], finished=reason is not None)

    def _advance_grammar(self, matcher: Any, token: int) -> str | None:
        """Feed the sampled token to the grammar; "stop" once it accepts nothing more (a
        complete JSON value ends the request without waiting for an EOS)."""
        if token in self.eos_token_ids:
            return None  # the usual EOS handling finishes the request
        if not matcher.consume_token(token):
            raise RuntimeError(f"grammar rejected token {token}: {matcher.get_error()}")
        return "stop" if matcher.is_stopped() else None

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
            text=st.detok.take(finished),
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
            self.scheduler.finish(seq, "error")
            self._seqs.pop(seq.request_id, None)
            self._finished += 1
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
        return LoadReport(
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
            generation_tokens=self._generation_tokens,
            requests_finished=self._finished,
            num_steps=self._steps,
            step_time_ema=self._step_time_ema,
        )

    def kv_snapshot(self, worker_id: str = "") -> KVSnapshot:
        """Every cached block hash with the id of the newest KV event: what a router that
        missed events resyncs from."""
        return KVSnapshot(
            worker_id=worker_id,
            last_event_id=self.kv.last_event_id,
            block_hashes=self.kv.cached_hashes(),
            tier_hashes=dict(self.offload.store.known()) if self.offload is not None else {},
        )


# ---------------------------------------------------------------------- async


_STOP = object()


class AsyncEngine:
    """An LLMEngine stepping in a background thread, with an asyncio API.

    Threading: `generate`, `abort`, `stats` are called on the event loop that called
    `start()`. Requests and aborts reach the engine thread through a queue; outputs come back
    via `loop.call_soon_threadsafe`, once per step. The `event_sink` (KV events) is called on
    the engine thread, once per step with that step's events: hop to the loop with
    `call_soon_threadsafe` if it touches asyncio objects.
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        event_sink: EventSink | None = None,
        clock: Clock | None = None,
        loaded: Any = None,
    ) -> None:
        self.config = config or EngineConfig()
        self._event_sink = event_sink
        self._clock = clock
        self._loaded = loaded
        self._engine: LLMEngine | None = None
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue[GenerateOutput | BaseException]] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: str | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._engine is not None:
            return
        self._loop = loop = asyncio.get_running_loop()
        built: asyncio.Future[LLMEngine] = loop.create_future()
        # The engine is built on the thread that will step it: torch work from two long-lived
        # threads gives OpenMP two thread teams, and with more team threads than cores libgomp
        # stops spin-waiting between parallel regions, so every op pays a futex wake-up
        # (measured: a 2-thread decode step 1.8x slower, no faster than 1 thread).
        self._thread = threading.Thread(
            target=self._run, args=(built,), name="tokenfab-engine", daemon=True
        )
        self._thread.start()
        try:
            self._engine = await built
        except BaseException:
            self._thread.join()
            self._thread = None
            raise
        finally:
            self._loaded = None

    async def shutdown(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._inbox.put(_STOP)
        await asyncio.to_thread(thread.join)
        self._dead = "the engine was shut down"
        for rid, q in list(self._queues.items()):
            q.put_nowait(GenerateOutput(request_id=rid, finish_reason="abort"))

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise EngineDeadError("the engine is not started (await engine.start())")
        return self._engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._dead is None

    # ------------------------------------------------------------------ requests

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream the request's outputs (deltas); the last has finish_reason set. Raises
        InvalidRequestError / QueueFullError before the first output. Closing the iterator
        early (break, cancellation, client gone) aborts the request and frees its blocks."""
        engine = self.engine
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        engine.validate(req)
        rid = req.request_id
        if rid in self._queues:
            raise InvalidRequestError(f"request id {rid!r} is already in use")
        waiting = len(engine.scheduler.waiting) + self._inbox.qsize()
        if waiting >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({waiting} requests); retry later")
        q: asyncio.Queue[GenerateOutput | BaseException] = asyncio.Queue()
        self._queues[rid] = q
        self._inbox.put(("add", req))
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self._inbox.put(("abort", rid))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stats(self) -> LoadReport:
        return self.engine.stats()

    async def kv_snapshot(self, worker_id: str = "") -> KVSnapshot:
        """The engine's KVSnapshot, taken on the engine thread between steps (the cache is
        consistent with the event ids there)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[KVSnapshot] = loop.create_future()
        self._inbox.put(("snapshot", (worker_id, done)))
        return await done

    # ------------------------------------------------------------------ engine thread

    def _run(self, built: asyncio.Future[LLMEngine]) -> None:
        # torch releases the GIL inside ops, so this thread computes while the loop serves.
        loop = self._loop
        assert loop is not None
        try:
            engine = LLMEngine(
                self.config, event_sink=self._event_sink, clock=self._clock, loaded=self._loaded
            )
        except BaseException as e:
            settle_threadsafe(loop, built, e)
            return
        if self.config.warm_up:
            try:
                engine.warm_up()
            except Exception:  # a failed warm-up costs the first request's latency only
                log.exception("engine warm-up failed")
        settle_threadsafe(loop, built, engine)
        try:
            self._loop_forever(engine)
            engine.close()
        except BaseException as e:  # a bug in the loop itself: fail everyone, refuse new work
            log.exception("engine thread died")
            self._dead = f"the engine thread died: {e}"
            dead = [
                GenerateOutput(request_id=rid, finish_reason="error", error=self._dead)
                for rid in list(self._queues)
            ]
            self._post(list(dead))

    def _loop_forever(self, engine: LLMEngine) -> None:
        while True:
            # Block only when idle; otherwise take whatever arrived and step.
            commands = [self._inbox.get()] if not engine.has_unfinished() else []
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            outputs: list[GenerateOutput | tuple[str, BaseException]] = []
            for cmd in commands:
                if cmd is _STOP:
                    return
                self._handle(engine, cmd, outputs)
            if engine.has_unfinished():
                try:
                    steps_before = engine.stats_steps
                    outputs.extend(engine.step())
                    if engine.stats_steps == steps_before:
                        # Nothing could be scheduled (should not happen: any single request
                        # fits the pool); do not spin.
                        time.sleep(0.005)
                except Exception as e:  # a bug outside the model: fail all, keep the loop
                    log.exception("engine loop error")
                    outputs.extend(engine.fail_all(f"engine error: {e}"))
            if outputs:
                self._post(outputs)

    def _handle(
        self,
        engine: LLMEngine,
        cmd: tuple[str, Any],
        outputs: list[GenerateOutput | tuple[str, BaseException]],
    ) -> None:
        kind, arg = cmd
        if kind == "add":
            try:
                engine.add_request(arg)
            except EngineError as e:
                outputs.append((arg.request_id, e))
            except Exception as e:
                log.exception("could not add request %s", arg.request_id)
                outputs.append((arg.request_id, EngineError(f"could not add request: {e}")))
        elif kind == "abort":
            out = engine.abort(arg)
            if out is not None:
                outputs.append(out)
        elif kind == "snapshot":
            worker_id, done = arg
            assert self._loop is not None
            settle_threadsafe(self._loop, done, engine.kv_snapshot(worker_id))

    def _post(self, outputs: list[GenerateOutput | tuple[str, BaseException]]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # The loop may close between the check and the call.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[GenerateOutput | tuple[str, BaseException]]) -> None:
        for out in outputs:
            if isinstance(out, tuple):
                rid, item = out[0], out[1]
            else:
                rid, item = out.request_id, out
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(item)
