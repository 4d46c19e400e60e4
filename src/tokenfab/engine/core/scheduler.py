"""Continuous batching: which sequences run in the next step, and how many tokens each.

Pure Python (no torch); time comes from an injected Clock, so the twin can drive it. Each call
to `schedule()` fills one step under a token budget:

1. running sequences in decode (one token each), oldest first;
2. running sequences still in prefill, each a chunk of what budget is left;
3. waiting sequences in arrival order (FCFS), taking their cached prefix and a first chunk,
   while sequence slots and free blocks last. A waiting head that does not fit blocks the
   queue (no overtaking), so large requests cannot starve.

When a running sequence needs a block and none is free, the newest running sequence not yet
scheduled this step is preempted: its blocks are freed (their cached hashes usually survive in
the prefix cache) and it goes back to the head of the waiting queue, to be recomputed later.
Everything is deterministic given the inputs.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

from tokenfab.clock import Clock, MonotonicClock
from tokenfab.engine.core.batch import SeqChunk, StepBatch
from tokenfab.engine.core.kv_cache import KVCacheManager
from tokenfab.engine.core.sequence import SeqStatus, Sequence
from tokenfab.engine.errors import QueueFullError


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    max_waiting: int = 4096
    max_prefill_tokens: int | None = None
    """Prompt tokens one step may compute (None: the whole step budget); decode tokens are
    not counted against it. With chunked prefill off a whole prompt still goes in one step."""


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    sample: bool


@dataclass(slots=True)
class Onboard:
    """Blocks of an admitted request to load from the tiers below G1 before the step runs
    (its chunk starts after them)."""

    chunk_index: int
    first_block: int
    """Index in the request's block table of the first block to load."""
    block_hashes: list[int]
    block_ids: list[int]


@dataclass
class SchedulerOutput:
    batch: StepBatch
    scheduled: list[ScheduledSeq]
    """In the same order as batch.chunks."""
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0
    onboard: list[Onboard] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, kv: KVCacheManager, clock: Clock | None = None
    ) -> None:
        self.config = config
        self.kv = kv
        self.clock = clock or MonotonicClock()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(
                f"the waiting queue is full ({len(self.waiting)} requests); retry later"
            )
        if seq.arrival_time == 0.0:
            seq.arrival_time = self.clock.now()
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Mark a sequence finished (stop, length, abort, error) and release its blocks."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            with contextlib.suppress(ValueError):  # may already be gone
                self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.kv.free(seq)

    # ------------------------------------------------------------------ one step

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        cap = self.config.max_prefill_tokens
        prefill_budget = budget if cap is None or not self.config.enable_chunked_prefill else cap
        out = SchedulerOutput(StepBatch([]), [])
        scheduled_ids: set[int] = set()

        # Decodes first (cheap, latency-critical), then unfinished prefills, both oldest first.
        decodes = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decodes + prefills:
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this step
            remaining = seq.num_tokens - seq.num_computed_tokens
            num_new = min(remaining, budget if remaining == 1 else min(budget, prefill_budget))
            if num_new <= 0 or not self._allocate_running(seq, num_new, scheduled_ids, out):
                continue
            self._add_chunk(out, seq, num_new)
            scheduled_ids.add(id(seq))
            budget -= num_new
            if remaining > 1:
                prefill_budget -= num_new

        # Admit waiting sequences; none while a preemption happened this step (memory is short).
        while (
            self.waiting
            and min(budget, prefill_budget) > 0
            and not out.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            prefix = self.kv.find_cached_prefix(seq)
            lower = self.kv.find_offloaded_prefix(seq, len(prefix))
            num_computed = (len(prefix) + len(lower)) * self.kv.block_size
            num_new = seq.num_tokens - num_computed
            if num_new > min(budget, prefill_budget):
                if not self.config.enable_chunked_prefill:
                    break
                num_new = min(budget, prefill_budget)
            if not self.kv.allocate(seq, num_computed + num_new, prefix):
                break
            self.waiting.popleft()
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = num_computed
                self.kv.record_prefix_query(seq.num_tokens, len(prefix) * self.kv.block_size)
            seq.num_computed_tokens = num_computed
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if lower:
                table = self.kv.block_table(seq.request_id)
                ids = table[len(prefix) : len(prefix) + len(lower)]
                out.onboard.append(Onboard(len(out.scheduled), len(prefix), lower, ids))
            self._add_chunk(out, seq, num_new)
            budget -= num_new
            prefill_budget -= num_new
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _allocate_running(
        self, seq: Sequence, num_new: int, scheduled_ids: set[int], out: SchedulerOutput
    ) -> bool:
        """Grow seq's blocks for num_new tokens, preempting the newest unscheduled running
        sequences as needed; False if seq itself had to be preempted."""
        while not self.kv.allocate(seq, seq.num_computed_tokens + num_new):
            victim = next(
                (s for s in reversed(self.running) if id(s) not in scheduled_ids and s is not seq),
                seq,
            )
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Victims are taken newest first, so pushing each to the front keeps arrival order.
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _add_chunk(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        start = seq.num_computed_tokens
        sample = start + num_new == seq.num_tokens
        out.batch.chunks.append(
            SeqChunk(
                token_ids=seq.token_ids[start : start + num_new],
                start_pos=start,
                block_table=self.kv.block_table(seq.request_id),
                sample=sample,
            )
        )
        out.scheduled.append(ScheduledSeq(seq, num_new, sample))

    # ------------------------------------------------------------------ after the step

    def update_computed(self, out: SchedulerOutput) -> None:
        """Advance progress after the runner computed the step, and register full blocks in
        the prefix cache. Sampled tokens are appended by the engine afterwards."""
        for s in out.scheduled:
            seq = s.seq
            if seq.status is not SeqStatus.RUNNING:
                continue
            seq.num_computed_tokens += s.num_new_tokens
            self.kv.commit(seq)
