"""The real runner: the model (`ModelRunner`) plus everything that turns logits into tokens.

Per step: the thread count the tuner picks, the model over the batch (a failing batch is
re-run chunk by chunk so only the requests that fail alone fail), prompt logprobs from the
all-logits rows, the grammar masks, one batched sampling call, and each grammar fed its token.
Per request it keeps what sampling needs beyond the sequence: the seeded generator, the
tokens suppressed below min_tokens, and the grammar matcher.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokenfab.engine.core.batch import PromptLogprobs, SampledToken, StepBatch, StepResult
from tokenfab.engine.errors import InvalidRequestError
from tokenfab.engine.model.runner import ModelRunner
from tokenfab.engine.sampler import (
    Sampler,
    SampleResult,
    SampleRow,
    make_generator,
    position_logprobs,
)
from tokenfab.engine.structured import GrammarCompiler, GrammarError
from tokenfab.engine.threads import ThreadTuner

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from tokenfab.engine.core.scheduler import SchedulerOutput
    from tokenfab.engine.core.sequence import Sequence
    from tokenfab.engine.model.loader import LoadedModel
    from tokenfab.protocol import SamplingParams

    T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class _SampleState:
    suppress_until_min: list[int]
    generator: torch.Generator | None
    uses_history: bool
    matcher: Any = None
    """The request's grammar state (an llguidance LLMatcher) under structured output."""


class TorchRunner:
    """`Runner` over a loaded model: ModelRunner's logits in, sampled tokens out."""

    def __init__(
        self,
        loaded: LoadedModel,
        num_blocks: int,
        block_size: int,
        *,
        num_threads: int | None = None,
        seed: int = 0,
        tuner: ThreadTuner | None = None,
    ) -> None:
        self.model_runner = ModelRunner(loaded, num_blocks, block_size, num_threads=num_threads)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.tokenizer = loaded.tokenizer
        self.vocab_size: int = loaded.config.vocab_size
        self.eos_token_ids: list[int] = list(loaded.config.eos_token_ids)
        self.sampler = Sampler(seed)
        # Thread count measured per step unless fixed by the user (see threads.py).
        self._tuner = tuner
        self._grammars: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self._states: dict[str, _SampleState] = {}

    @property
    def num_threads(self) -> int:
        """The intra-op thread count steps currently run with."""
        return self._tuner.current if self._tuner else torch.get_num_threads()

    # ------------------------------------------------------------------ grammars

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

    # ------------------------------------------------------------------ requests

    def validate(self, params: SamplingParams) -> None:
        if params.structured is not None:
            spec = params.structured
            self._with_grammars(lambda g: g.compile(spec))

    def add(self, seq: Sequence) -> None:
        p = seq.params
        matcher = None
        if p.structured is not None:
            spec = p.structured
            matcher = self._with_grammars(lambda g: g.matcher(spec))
        self._states[seq.request_id] = _SampleState(
            suppress_until_min=sorted(set(p.stop_token_ids) | set(self.eos_token_ids)),
            generator=make_generator(p.seed) if p.seed is not None and not p.greedy else None,
            uses_history=p.repetition_penalty != 1.0
            or p.presence_penalty != 0.0
            or p.frequency_penalty != 0.0,
            matcher=matcher,
        )

    def drop(self, seq: Sequence) -> None:
        self._states.pop(seq.request_id, None)

    # ------------------------------------------------------------------ one step

    def execute(self, sched: SchedulerOutput) -> StepResult:
        result = StepResult()
        try:
            logits = self._execute(sched)
        except Exception:
            log.exception(
                "step of %d sequences failed; retrying them one by one", len(sched.scheduled)
            )
            logits = self._isolate_failure(sched, result)
        logits = self._take_prompt_logprobs(sched, logits, result)
        self._sample(sched, logits, result)
        return result

    def _execute(self, sched: SchedulerOutput) -> torch.Tensor:
        tuner = self._tuner
        if tuner is None:
            return self.model_runner.execute(sched.batch)
        work = sched.num_batched_tokens
        n = tuner.threads_for_next_step(work)
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        t0 = time.perf_counter()
        logits = self.model_runner.execute(sched.batch)
        tuner.record(time.perf_counter() - t0, work)
        return logits

    def _isolate_failure(self, sched: SchedulerOutput, result: StepResult) -> torch.Tensor:
        """Re-run each chunk of a failed step on its own (rewriting the same K/V positions is
        harmless), so only the requests that fail alone are failed; drops those from `sched`."""
        rows: list[torch.Tensor] = []
        keep_chunks, keep_sched = [], []
        for chunk, s in zip(sched.batch.chunks, sched.scheduled, strict=True):
            try:
                out = self.model_runner.execute(StepBatch([chunk]))
            except Exception as e:
                result.failed.append((s.seq, f"engine step failed: {e}"))
                continue
            keep_chunks.append(chunk)
            keep_sched.append(s)
            if chunk.sample or chunk.all_logits:
                rows.append(out)
        sched.batch.chunks[:] = keep_chunks
        sched.scheduled[:] = keep_sched
        vocab = self.vocab_size
        return torch.cat(rows) if rows else torch.empty((0, vocab), dtype=torch.float32)

    def _take_prompt_logprobs(
        self, sched: SchedulerOutput, logits: torch.Tensor, result: StepResult
    ) -> torch.Tensor:
        """Record the prompt logprobs in the all-logits rows; return the sampling rows only."""
        if not any(c.all_logits for c in sched.batch.chunks):
            return logits
        keep: list[int] = []
        row = 0
        for chunk, s in zip(sched.batch.chunks, sched.scheduled, strict=True):
            if chunk.all_logits:
                n = len(chunk.token_ids)
                lps = self._prompt_logprobs(s.seq, chunk.start_pos, logits[row : row + n])
                if lps is not None:
                    result.prompt_logprobs.append(lps)
                if chunk.sample:
                    keep.append(row + n - 1)
                row += n
            elif chunk.sample:
                keep.append(row)
                row += 1
        return logits[keep]

    def _prompt_logprobs(
        self, seq: Sequence, start: int, rows: torch.Tensor
    ) -> PromptLogprobs | None:
        """Row r predicts the token at position start + r + 1 (position 0 has none)."""
        prompt = seq.prompt_token_ids
        count = min(rows.shape[0], len(prompt) - 1 - start)
        if count <= 0:
            return None
        lp = torch.log_softmax(rows[:count].float(), dim=-1)
        top_n = seq.params.prompt_logprobs or 0
        entries = [position_logprobs(lp[r], prompt[start + r + 1], top_n) for r in range(count)]
        return PromptLogprobs(seq, start + 1, entries)

    def _sample(self, sched: SchedulerOutput, logits: torch.Tensor, result: StepResult) -> None:
        to_sample = [s.seq for s in sched.scheduled if s.sample]
        rows = [self._sample_row(seq) for seq in to_sample]
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
                    result.failed.append((seq, f"sampling failed: {e}"))
        for seq, res in zip(to_sample, results, strict=True):
            if res is None:
                continue
            try:
                stop = self._advance_grammar(seq, res.token_id)
            except Exception as e:
                log.exception("request %s failed", seq.request_id)
                result.failed.append((seq, f"request failed: {e}"))
                continue
            result.tokens.append(SampledToken(seq, res.token_id, res.logprobs, stop))

    def _grammar_bitmask(self, seqs: list[Sequence], rows: list[SampleRow]) -> Any:
        """One batched mask computation for the step's constrained rows (sets their mask_row)."""
        matchers = []
        for seq, row in zip(seqs, rows, strict=True):
            m = self._states[seq.request_id].matcher
            if m is not None:
                row.mask_row = len(matchers)
                matchers.append(m)
        return self.grammars.fill_bitmask(matchers) if matchers else None

    def _sample_row(self, seq: Sequence) -> SampleRow:
        st = self._states[seq.request_id]
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

    def _advance_grammar(self, seq: Sequence, token: int) -> bool:
        """Feed the sampled token to the grammar; True once it accepts nothing more (a
        complete JSON value ends the request without waiting for an EOS)."""
        matcher = self._states[seq.request_id].matcher
        if matcher is None or token in self.eos_token_ids:
            return False  # the usual EOS handling finishes the request
        if not matcher.consume_token(token):
            raise RuntimeError(f"grammar rejected token {token}: {matcher.get_error()}")
        return bool(matcher.is_stopped())
