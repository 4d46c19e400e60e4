"""Scheduler: token budget, chunked prefill, FCFS, preemption by recompute, caps. No torch."""

from __future__ import annotations

import pytest

from tokenfab.clock import ManualClock
from tokenfab.engine.core.kv_cache import KVCacheManager
from tokenfab.engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tokenfab.engine.core.sequence import SeqStatus, Sequence
from tokenfab.engine.errors import QueueFullError

BS = 4


def make(num_blocks: int = 64, **cfg: int | bool) -> tuple[Scheduler, KVCacheManager, ManualClock]:
    kv = KVCacheManager(num_blocks=num_blocks, block_size=BS)
    clock = ManualClock(100.0)
    return Scheduler(SchedulerConfig(**cfg), kv, clock), kv, clock  # type: ignore[arg-type]


def seq(rid: str, n: int, base: int = 0) -> Sequence:
    return Sequence(rid, list(range(base, base + n)), block_size=BS)


def finish_step(sched: Scheduler, out: SchedulerOutput, max_out: int = 1000) -> None:
    """What the engine does after the runner: advance, append a token, stop at max_out."""
    sched.update_computed(out)
    for s in out.scheduled:
        if s.sample and s.seq.status is SeqStatus.RUNNING:
            s.seq.append_token(7)
            if s.seq.num_output_tokens >= max_out:
                sched.finish(s.seq, "length")


def test_budget_and_chunked_prefill_split_long_prompts() -> None:
    sched, kv, _ = make(max_num_batched_tokens=10)
    a = seq("a", 25)
    sched.add(a)
    sizes = []
    for _ in range(3):
        out = sched.schedule()
        assert out.num_batched_tokens <= 10
        sizes.append([(c.start_pos, len(c.token_ids), c.sample) for c in out.batch.chunks])
        finish_step(sched, out)
    assert sizes == [[(0, 10, False)], [(10, 10, False)], [(20, 5, True)]]
    assert a.num_output_tokens == 1 and a.num_computed_tokens == 25


def test_decodes_come_first_then_prefill_chunks_and_fcfs_admission() -> None:
    sched, _, clock = make(max_num_batched_tokens=8)
    a = seq("a", 3)
    sched.add(a)
    finish_step(sched, sched.schedule())  # a prefilled, now decoding
    clock.advance(1)
    b, c = seq("b", 20, 100), seq("c", 2, 200)
    sched.add(b)
    sched.add(c)
    out = sched.schedule()
    ids = [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled]
    # a's decode first, then b's chunk fills the budget; c (later) must wait its turn.
    assert ids == [("a", 1), ("b", 7)]
    assert b.arrival_time == 101.0
    finish_step(sched, out)
    out = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]


def test_max_num_seqs_caps_running() -> None:
    sched, _, _ = make(max_num_seqs=2)
    for i in range(4):
        sched.add(seq(f"r{i}", 3, i * 10))
    out = sched.schedule()
    assert [s.seq.request_id for s in out.scheduled] == ["r0", "r1"]
    assert len(sched.waiting) == 2


def test_waiting_cap_raises_queue_full() -> None:
    sched, _, _ = make(max_waiting=2)
    sched.add(seq("a", 3))
    sched.add(seq("b", 3))
    with pytest.raises(QueueFullError):
        sched.add(seq("c", 3))


def test_preemption_frees_newest_and_recomputes_it_later() -> None:
    # 7 blocks of 4 tokens; three 8-token prompts take 2 blocks each; decoding needs more.
    sched, kv, _ = make(num_blocks=7)
    seqs = [seq(f"r{i}", 8, i * 10) for i in range(3)]
    for s in seqs:
        sched.add(s)
    finish_step(sched, sched.schedule())
    assert kv.num_free_blocks == 1 and all(s.num_tokens == 9 for s in seqs)
    out = sched.schedule()
    # r0 takes the free block; r1 needs one more: the newest running (r2) is preempted.
    assert [p.request_id for p in out.preempted] == ["r2"]
    assert [s.seq.request_id for s in out.scheduled] == ["r0", "r1"]
    assert [s.request_id for s in sched.waiting] == ["r2"]
    assert sched.num_preemptions == 1 and seqs[2].num_computed_tokens == 0
    finish_step(sched, out, max_out=2)  # r0 and r1 finish
    out = sched.schedule()
    # r2 comes back, recomputing prompt + its generated token; its first block (still cached,
    # the LRU evicted only its deeper block) is reused.
    assert [s.seq.request_id for s in out.scheduled] == ["r2"]
    assert seqs[2].num_computed_tokens == 4 and out.scheduled[0].num_new_tokens == 5
    finish_step(sched, out, max_out=3)
    for _ in range(20):
        if not sched.has_unfinished():
            break
        finish_step(sched, sched.schedule(), max_out=3)
    assert not sched.has_unfinished()
    assert [s.num_output_tokens for s in seqs] == [2, 2, 3]
    assert kv.num_free_blocks == 7


def test_preempts_itself_when_it_is_the_newest() -> None:
    sched, kv, _ = make(num_blocks=5)
    a, b = seq("a", 8), seq("b", 8, 50)
    sched.add(a)
    sched.add(b)
    finish_step(sched, sched.schedule())
    out = sched.schedule()
    # a (older) takes the last free block; b finds no unscheduled victim but itself.
    assert [p.request_id for p in out.preempted] == ["b"]
    assert [s.seq.request_id for s in out.scheduled] == ["a"]
    assert b.num_preemptions == 1 and b.status is SeqStatus.WAITING


def test_waiting_head_that_does_not_fit_blocks_the_queue() -> None:
    sched, _, _ = make(num_blocks=4, max_num_batched_tokens=64)
    big, small = seq("big", 13), seq("small", 3, 100)
    sched.add(seq("first", 7, 200))
    finish_step(sched, sched.schedule())
    sched.add(big)
    sched.add(small)
    out = sched.schedule()
    # big needs 4 blocks, only 2 free; small must not overtake it.
    assert [s.seq.request_id for s in out.scheduled] == ["first"]


def test_finish_and_abort_release_blocks() -> None:
    sched, kv, _ = make()
    a, b = seq("a", 9), seq("b", 5, 50)
    sched.add(a)
    sched.add(b)
    finish_step(sched, sched.schedule())
    sched.finish(a, "abort")
    assert a.status is SeqStatus.FINISHED and a.finish_reason == "abort"
    assert kv.block_table("a") == [] and kv.num_used_blocks == 2
    sched.add(c := seq("c", 3, 90))
    sched.finish(c, "abort")  # aborted while waiting
    assert not sched.waiting and len(sched.running) == 1


def test_schedule_is_deterministic() -> None:
    def trace() -> list[list[tuple[str, int]]]:
        sched, _, _ = make(num_blocks=12, max_num_batched_tokens=9)
        for i, n in enumerate([5, 17, 3, 11, 8]):
            sched.add(seq(f"r{i}", n, i * 100))
        steps = []
        for _ in range(60):
            if not sched.has_unfinished():
                break
            out = sched.schedule()
            steps.append([(s.seq.request_id, s.num_new_tokens) for s in out.scheduled])
            finish_step(sched, out, max_out=6)
        assert not sched.has_unfinished()
        return steps

    assert trace() == trace()


def check_invariants(sched: Scheduler, kv: KVCacheManager) -> None:
    refs = [0] * kv.num_blocks
    for s in sched.running:
        table = kv.block_table(s.request_id)
        assert len(table) * BS >= s.num_computed_tokens
        for b in table:
            refs[b] += 1
    for s in sched.waiting:
        assert kv.block_table(s.request_id) == []
    assert refs == [kv.ref_count(b) for b in range(kv.num_blocks)]
    assert kv.num_free_blocks == refs.count(0)
    for h, b in kv._cached.items():  # every cached hash names a block that carries it
        assert kv._blocks[b].block_hash == h


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_keep_the_books_straight(seed: int) -> None:
    """Arrivals, aborts, chunking, prefix hits and preemptions (most seeds) at random: ref
    counts, free list and cache map stay consistent, and everything drains."""
    import random

    rng = random.Random(seed)
    sched, kv, clock = make(
        num_blocks=rng.choice([12, 20, 40]), max_num_batched_tokens=rng.choice([5, 16, 64])
    )
    shared = [rng.randrange(1000) for _ in range(12)]
    target: dict[str, int] = {}
    for step in range(400):
        if step < 300 and rng.random() < 0.3:
            n = rng.randrange(1, 30)
            body = [rng.randrange(1000) for _ in range(n)]
            s = Sequence(f"r{step}", (shared + body) if rng.random() < 0.5 else body, block_size=BS)
            # As the engine guarantees: prompt + output fits the pool (max_model_len).
            target[s.request_id] = min(rng.randrange(1, 12), kv.num_blocks * BS - s.num_tokens)
            sched.add(s)
        if rng.random() < 0.05 and sched.running:
            sched.finish(rng.choice(sched.running), "abort")
        out = sched.schedule()
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        check_invariants(sched, kv)
        sched.update_computed(out)
        for s in out.scheduled:
            if s.sample and s.seq.status is SeqStatus.RUNNING:
                s.seq.append_token(rng.randrange(1000))
                if s.seq.num_output_tokens >= target[s.seq.request_id]:
                    sched.finish(s.seq, "length")
        check_invariants(sched, kv)
        clock.advance(0.01)
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        sched.update_computed(out)
        for s in out.scheduled:
            if s.sample and s.seq.status is SeqStatus.RUNNING:
                s.seq.append_token(1)
                if s.seq.num_output_tokens >= target[s.seq.request_id]:
                    sched.finish(s.seq, "length")
    assert not sched.has_unfinished()
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.prefix_hits > 0  # the shared prefix was reused


def test_a_prefill_cap_chunks_prompts_but_not_decodes() -> None:
    """max_prefill_tokens limits the prompt tokens of a step; decode tokens do not count."""
    sched, _, _ = make(num_blocks=256, max_num_batched_tokens=64, max_prefill_tokens=8)
    seqs = [seq(f"s{i}", 4, base=10 * i) for i in range(12)]
    for s_ in seqs:
        sched.add(s_)
    prompt_tokens, decode_tokens = [], []
    for _ in range(6):
        out = sched.schedule()
        chunks = out.batch.chunks
        prompt_tokens.append(sum(len(c.token_ids) for c in chunks if c.start_pos < 4))
        decode_tokens.append(sum(len(c.token_ids) for c in chunks if c.start_pos >= 4))
        finish_step(sched, out)
    assert prompt_tokens == [8] * 6  # two 4-token prompts per step
    assert decode_tokens == [0, 2, 4, 6, 8, 10]  # the earlier ones decode beside them
    out = sched.schedule()  # every sequence decodes in one step: 12 tokens > the cap of 8
    assert len(out.scheduled) == 12 and out.num_batched_tokens == 12
