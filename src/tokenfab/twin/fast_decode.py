"""Decode in closed form: k steps of an all-decode batch applied at once.

While an engine's batch is only decoding sequences (nothing waiting, no prefill), every step
is the same batch one token further along, so the simulator need not run them one by one: the
batch advances k tokens per sequence with the same KV-cache effects (blocks allocated for the
k positions, full blocks committed to the prefix cache, events emitted) as k real steps, and
the step times form a closed-form series. k stops one short of the first sequence to finish,
so finishing still goes through the real step loop; an arrival for the engine cuts the run
short at the step in progress (see `Simulator`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenfab.engine.core.step import EngineCore
from tokenfab.twin.sim_runner import SIM_TOKEN
from tokenfab.twin.step_time import LinearStepTime


@dataclass(frozen=True, slots=True)
class DecodeRun:
    """k steps of a batch of n decoding sequences attending to `context` tokens at step 0."""

    steps: int
    n: int
    context: int
    step_time: LinearStepTime

    def end(self, i: int) -> float:
        """Seconds from the run's start to the end of its i-th step (1-based)."""
        st = self.step_time
        per = st.base_s + self.n * st.per_decode_seq_s
        return i * (per + self.context * st.per_context_token_s) + (
            st.per_context_token_s * self.n * i * (i - 1) / 2
        )

    def steps_by(self, seconds: float) -> int:
        """Steps finished within `seconds` of the start, plus the one in progress (<= steps)."""
        lo, hi = 0, self.steps
        while lo < hi:  # the first i whose end is past `seconds`
            mid = (lo + hi) // 2
            if self.end(mid + 1) <= seconds:
                lo = mid + 1
            else:
                hi = mid
        return min(lo + 1, self.steps)


def plan_run(core: EngineCore, step_time: LinearStepTime, min_steps: int = 2) -> DecodeRun | None:
    """The closed-form run the engine would make now, or None where its next step must be
    simulated (waiting requests, a prefill, too few steps, or too few free blocks)."""
    sched = core.scheduler
    running = sched.running
    if sched.waiting or not running or len(running) > sched.config.max_num_batched_tokens:
        return None
    k = 1 << 62
    extra_blocks = 0
    bs = core.kv.block_size
    context = 0
    for seq in running:
        if seq.num_tokens - seq.num_computed_tokens != 1:
            return None
        left = min(
            seq.state.max_output_tokens - seq.num_output_tokens,
            core.max_model_len - seq.num_tokens,
        )
        k = min(k, left - 1)
        context += seq.num_computed_tokens
    if k < min_steps:
        return None
    for seq in running:
        have = len(core.kv.block_table(seq.request_id))
        extra_blocks += max(0, -(-(seq.num_computed_tokens + k) // bs) - have)
    if extra_blocks > core.kv.num_free_blocks:
        return None
    return DecodeRun(k, len(running), context, step_time)


def apply_run(core: EngineCore, steps: int) -> None:
    """Advance every running sequence `steps` decode steps, as that many real steps would."""
    kv = core.kv
    for seq in list(core.scheduler.running):
        target = seq.num_computed_tokens + steps
        if not kv.allocate(seq, target):
            raise RuntimeError("a planned decode run no longer fits the KV cache")
        for _ in range(steps):
            seq.append_token(SIM_TOKEN)
        seq.num_computed_tokens = target
        kv.commit(seq)
    kv.flush_events()
