from __future__ import annotations

import random
from collections import Counter

import pytest

from tokenfab.router.scoring import (
    WorkerLoad,
    choose,
    decode_blocks,
    prefill_blocks,
    sample_index,
    softmax_probabilities,
    uniform_index,
)

BS = 16


def pick(loads: list[WorkerLoad], tokens: int = 64, seed: int = 0, **kw: float) -> str:
    return choose(loads, tokens, BS, random.Random(seed), **kw).worker_id


def test_costs_count_uncached_queued_and_active_blocks() -> None:
    load = WorkerLoad("w", overlap_blocks=2, queued_prefill_tokens=32, active_blocks=10)
    # 64 prompt tokens = 4 blocks, 2 cached: 2 to compute, plus 2 queued ahead.
    assert prefill_blocks(load, 64, BS) == 4.0
    # 10 active, plus the request's 2 new blocks.
    assert decode_blocks(load, 64, BS) == 12.0
    # A partial last block is compute and memory too.
    assert prefill_blocks(WorkerLoad("w"), 40, BS) == 2.5
    assert decode_blocks(WorkerLoad("w"), 40, BS) == 3.0


def test_pending_overlap_is_not_a_queue_ahead_of_the_request() -> None:
    # Another request is computing this prompt's 4 blocks there: riding on it costs nothing.
    riding = WorkerLoad("w", overlap_blocks=4, pending_overlap_blocks=4, queued_prefill_tokens=64)
    assert prefill_blocks(riding, 64, BS) == 0.0
    # Unrelated queued work still counts, and shared blocks never exceed what is queued.
    busy = WorkerLoad("w", overlap_blocks=4, pending_overlap_blocks=4, queued_prefill_tokens=160)
    assert prefill_blocks(busy, 64, BS) == 6.0
    reported_less = WorkerLoad("w", overlap_blocks=4, pending_overlap_blocks=4)
    assert prefill_blocks(reported_less, 64, BS) == 0.0


def test_lowest_cost_wins() -> None:
    loads = [WorkerLoad("a"), WorkerLoad("b", overlap_blocks=3), WorkerLoad("c", overlap_blocks=1)]
    decision = choose(loads, 64, BS, random.Random(0))
    assert decision.worker_id == "b"
    by_id = {s.worker_id: s for s in decision.scores}
    assert [s.worker_id for s in decision.scores] == ["a", "b", "c"]
    assert by_id["b"].cost < by_id["c"].cost < by_id["a"].cost
    assert by_id["b"].probability == 1.0 and by_id["a"].probability == 0.0


def test_overlap_weight_trades_hits_against_load() -> None:
    # b has the whole prompt cached but a lot of active blocks.
    loads = [WorkerLoad("a"), WorkerLoad("b", overlap_blocks=4, active_blocks=10)]
    assert pick(loads, overlap_weight=1.0) == "a"  # 4 + 4 = 8 < 0 + 10
    assert pick(loads, overlap_weight=4.0) == "b"  # 16 + 4 = 20 > 10


def test_ties_go_to_fewer_requests_then_fewer_active_blocks() -> None:
    # Same cost (prefill + decode), different loads.
    a = WorkerLoad("a", queued_prefill_tokens=32, num_requests=3)
    b = WorkerLoad("b", active_blocks=2, num_requests=1)
    c = WorkerLoad("c", queued_prefill_tokens=16, active_blocks=1, num_requests=1)
    assert pick([a, b, c]) == "c"
    assert pick([a, b]) == "b"


def test_exact_ties_use_the_seeded_rng_deterministically() -> None:
    loads = [WorkerLoad(f"w{i}") for i in range(4)]
    first = [pick(loads, seed=s) for s in range(40)]
    assert first == [pick(loads, seed=s) for s in range(40)]
    assert len(set(first)) == 4  # every tied worker gets picked for some seed
    decision = choose(loads, 64, BS, random.Random(0))
    assert all(s.probability == 0.25 for s in decision.scores)


def test_candidate_order_does_not_matter() -> None:
    loads = [WorkerLoad(f"w{i}", overlap_blocks=i % 2) for i in range(6)]
    forward = [pick(loads, seed=s) for s in range(20)]
    backward = [pick(loads[::-1], seed=s) for s in range(20)]
    assert forward == backward


def test_forced_choice_does_not_consume_randomness() -> None:
    rng = random.Random(7)
    choose([WorkerLoad("a"), WorkerLoad("b", overlap_blocks=2)], 64, BS, rng)
    assert rng.random() == random.Random(7).random()


def test_temperature_zero_is_argmin_and_high_temperature_spreads() -> None:
    loads = [WorkerLoad("a", overlap_blocks=4), WorkerLoad("b"), WorkerLoad("c", overlap_blocks=2)]
    rng = random.Random(1)
    cold = Counter(choose(loads, 64, BS, rng, temperature=0.0).worker_id for _ in range(200))
    assert cold == {"a": 200}
    rng = random.Random(1)
    hot = Counter(choose(loads, 64, BS, rng, temperature=100.0).worker_id for _ in range(600))
    assert set(hot) == {"a", "b", "c"} and min(hot.values()) > 150
    rng = random.Random(1)
    warm = Counter(choose(loads, 64, BS, rng, temperature=0.2).worker_id for _ in range(600))
    assert warm["a"] > warm["c"] > warm["b"] > 0
    # Seeded: the same draws again.
    rng = random.Random(1)
    again = Counter(choose(loads, 64, BS, rng, temperature=100.0).worker_id for _ in range(600))
    assert again == hot


def test_softmax_is_scale_free() -> None:
    assert softmax_probabilities([1.0, 2.0], 0.5) == pytest.approx(
        softmax_probabilities([100.0, 200.0], 0.5)
    )
    assert softmax_probabilities([3.0, 3.0, 3.0], 1.0) == [pytest.approx(1 / 3)] * 3
    p = softmax_probabilities([0.0, 10.0], 1.0)
    assert p[0] > p[1] and sum(p) == pytest.approx(1.0)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match="no candidate"):
        choose([], 64, BS, random.Random(0))
    with pytest.raises(ValueError, match="temperature"):
        choose([WorkerLoad("a")], 64, BS, random.Random(0), temperature=-1.0)
    with pytest.raises(ValueError, match="block_size"):
        choose([WorkerLoad("a")], 64, 0, random.Random(0))


def test_a_lower_tier_hit_is_cheaper_than_recompute_and_dearer_than_g1() -> None:
    g1 = WorkerLoad("a", overlap_blocks=8)
    host = WorkerLoad("b", lower_overlap_blocks=8, lower_overlap_cost=8 * 0.1)
    cold = WorkerLoad("c")
    costs = {load.worker_id: prefill_blocks(load, 10 * 16, 16) for load in (g1, host, cold)}
    assert costs["a"] < costs["b"] < costs["c"]
    assert costs["b"] == pytest.approx(2 + 0.8)


def test_uniform_index_draws_as_sample_index_over_equal_probabilities() -> None:
    for n in (1, 2, 3, 7, 10, 999):
        a, b = random.Random(n), random.Random(n)
        for _ in range(200):
            assert uniform_index(n, a) == sample_index([1.0 / n] * n, b)
        assert a.getstate() == b.getstate()
