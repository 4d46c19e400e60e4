"""The planner's decisions, driven by an injected clock and recorded observations."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from tokenfab.clock import ManualClock
from tokenfab.planner import (
    Capacity,
    Decision,
    Observation,
    PlannerConfig,
    WorkerView,
    initial_state,
    tick,
)
from tokenfab.planner.core import fit_budget, pool_size

CAP = Capacity(prefill_tokens_per_s=1000.0, decode_tokens_per_s=100.0)
# Chat-heavy: short prompts, long answers (decode-bound); long-prompt: the reverse.
CHAT = (1.0, 200, 150)  # requests/s, prompt tokens, output tokens
LONG = (1.0, 1500, 20)


def observation(
    phase: tuple[float, int, int], roles: dict[str, str], noise: float = 0.0, rng=None, **kw
) -> Observation:
    rate, isl, osl = phase
    if noise:  # the mix moves too, not only the rate
        rate, isl, osl = (x * (1 + rng.uniform(-noise, noise)) for x in (rate, isl, osl))
    workers = tuple(WorkerView(w, r) for w, r in sorted(roles.items()))  # type: ignore[arg-type]
    return Observation(
        interval_s=10.0,
        request_rate=rate,
        prompt_tokens_mean=isl,
        output_tokens_mean=osl,
        prefix_hit_rate=0.0,
        prefill_queue_tokens=0,
        decode_waiting=0,
        workers=workers,
        **kw,
    )


class Fleet:
    """Workers whose role changes as soon as a move is decided (the next observation shows
    it), driven tick by tick with a ManualClock."""

    def __init__(self, cfg: PlannerConfig, roles: dict[str, str], cap: Capacity = CAP):
        self.cfg = cfg
        self.roles = dict(roles)
        self.clock = ManualClock()
        self.state = initial_state(cfg, cap)
        self.log: list[Decision] = []

    def run(self, phase, ticks: int, noise: float = 0.0, seed: int = 0, **kw) -> None:
        rng = random.Random(seed)
        for _ in range(ticks):
            self.clock.advance(self.cfg.interval_s)
            obs = observation(phase, self.roles, noise, rng, **kw)
            self.state, decisions = tick(obs, self.state, self.clock.now(), self.cfg)
            for d in decisions:
                if d.kind == "move":
                    assert self.roles[d.worker_id] == d.from_role
                    self.roles[d.worker_id] = d.to_role  # type: ignore[assignment]
                elif d.kind == "add":
                    self.roles[f"new{len(self.roles)}"] = d.to_role  # type: ignore[assignment]
                elif d.kind == "remove":
                    del self.roles[d.worker_id]
            self.log += decisions

    def counts(self) -> tuple[int, int]:
        vals = list(self.roles.values())
        return vals.count("prefill"), vals.count("decode")

    def kinds(self, kind: str) -> list[Decision]:
        return [d for d in self.log if d.kind == kind]


FOUR = {"w0": "prefill", "w1": "decode", "w2": "decode", "w3": "decode"}


def test_shift_to_long_prompts_moves_decode_to_prefill_and_back():
    cfg = PlannerConfig(ttft_ms=500, itl_ms=50, budget=4, fixed_fleet=True)
    fleet = Fleet(cfg, FOUR)
    fleet.run(CHAT, 10)
    assert fleet.counts() == (1, 3)  # chat is decode-bound: nothing moves
    assert fleet.kinds("move") == []
    fleet.run(LONG, 12)
    to_prefill = fleet.kinds("move")
    assert to_prefill and {(m.from_role, m.to_role) for m in to_prefill} == {("decode", "prefill")}
    assert fleet.counts() == (3, 1)  # 1500 prefill tok/s: the busier pool gets the spares
    # the decision carries what it was made from
    assert to_prefill[0].inputs.prefill_forecast > cfg.target_util * CAP.prefill_tokens_per_s
    assert to_prefill[0].inputs.current == (1, 3)
    fleet.run(CHAT, 12)
    back = fleet.kinds("move")[len(to_prefill) :]
    assert back and {(m.from_role, m.to_role) for m in back} == {("prefill", "decode")}
    assert fleet.counts() == (1, 3)


def test_no_flapping_under_noisy_steady_load():
    cfg = PlannerConfig(ttft_ms=500, itl_ms=50, budget=4, fixed_fleet=True)
    # A mix on the edge: ~750 prefill tok/s (one worker's target is 800) and ~120 decode
    # tok/s, where a second prefill worker is just worth a decode worker (1,3) <-> (2,2).
    near = (1.0, 750, 120)
    for seed in range(5):
        fleet = Fleet(cfg, FOUR)
        fleet.run(near, 200, noise=0.15, seed=seed)
        moves = [(m.from_role, m.to_role) for m in fleet.kinds("move")]
        assert len(moves) <= 1, moves  # at most one settling move, never back and forth
        assert fleet.kinds("hold")  # noise made it want changes it did not confirm


def test_a_lightly_loaded_fleet_is_left_as_it_is():
    # 150 prefill tok/s and 15 decode tok/s: both pools far below their targets, though
    # one more prefill worker would halve the busier pool's utilization
    cfg = PlannerConfig(ttft_ms=500, itl_ms=50, budget=4, fixed_fleet=True, confirm_ticks=1,
                        cooldown_s=0)  # fmt: skip
    fleet = Fleet(cfg, FOUR, Capacity(prefill_tokens_per_s=450.0, decode_tokens_per_s=80.0))
    fleet.run((0.5, 300, 30), 20)
    assert fleet.kinds("move") == [] and fleet.counts() == (1, 3)
    # past shrink_util the spare does move to the busier pool
    fleet.run((1.0, 300, 30), 6)
    assert [(m.from_role, m.to_role) for m in fleet.kinds("move")] == [("decode", "prefill")]


def test_a_saturated_pool_teaches_the_planner_its_capacity():
    # given 1000 prompt tok/s per worker, the one prefill worker computes 400 with a backlog
    # of 6,000 tokens: it is saturated, and its rate is what a prefill worker can do here
    # (two workers: nothing can move, and a pool mid-move teaches nothing)
    cfg = PlannerConfig(ttft_ms=500, itl_ms=50, budget=2, fixed_fleet=True)
    state = initial_state(cfg, CAP)
    workers = (WorkerView("p", "prefill"), WorkerView("d", "decode"))
    busy = Observation(interval_s=10.0, request_rate=0.4, prompt_tokens_mean=1000,
                       output_tokens_mean=10, prefix_hit_rate=0.0, prefill_queue_tokens=6000,
                       decode_waiting=0, workers=workers)  # fmt: skip
    for i in range(12):
        state, _ = tick(busy, state, 10.0 * (i + 1), cfg)
    assert state.capacity.prefill_tokens_per_s == pytest.approx(400, rel=0.05)
    assert state.capacity.decode_tokens_per_s == CAP.decode_tokens_per_s  # not saturated
    assert state.capacity.source == "measured"
    # a short queue is not saturation: nothing learned
    calm = initial_state(cfg, CAP)
    calm, _ = tick(replace(busy, prefill_queue_tokens=500), calm, 10.0, cfg)
    assert calm.capacity == CAP
    off = replace(cfg, learn_capacity=False)
    fixed, _ = tick(busy, initial_state(off, CAP), 10.0, off)
    assert fixed.capacity == CAP


def test_cooldown_spaces_changes():
    cfg = PlannerConfig(ttft_ms=500, itl_ms=50, budget=8, cooldown_s=60, confirm_ticks=1)
    fleet = Fleet(cfg, {"w0": "prefill", "w1": "decode"})
    fleet.run((4.0, 1000, 20), 12)  # needs 5 prefill workers
    times = [d.inputs.now for d in fleet.log if d.kind in ("add", "move", "remove")]
    assert len(times) >= 2
    assert all(b - a >= 60 for a, b in zip(times, times[1:], strict=False))


def test_budget_and_minimums_hold_and_unreachable_is_reported():
    cfg = PlannerConfig(ttft_ms=500, itl_ms=50, budget=4, confirm_ticks=1, cooldown_s=0)
    fleet = Fleet(cfg, {"w0": "prefill", "w1": "decode"})
    huge = (10.0, 2000, 100)  # 20k prefill tok/s (25 workers), 1k decode tok/s (13 workers)
    fleet.run(huge, 20)
    p, d = fleet.counts()
    assert p + d == 4 and p >= 1 and d >= 1
    unreachable = fleet.kinds("unreachable")
    assert len(unreachable) == 1  # reported once per episode, not every tick
    assert "budget is 4" in unreachable[0].reason
    assert unreachable[0].inputs.needed[0] + unreachable[0].inputs.needed[1] > 4
    # the need ends, then returns: reported again
    fleet.run(CHAT, 10)
    fleet.run(huge, 2)
    assert len(fleet.kinds("unreachable")) == 2


def test_scales_down_when_idle_but_keeps_one_of_each():
    cfg = PlannerConfig(ttft_ms=500, itl_ms=50, budget=6, confirm_ticks=1, cooldown_s=0)
    roles = {f"w{i}": ("prefill" if i < 3 else "decode") for i in range(6)}
    fleet = Fleet(cfg, roles)
    fleet.run((0.0, 0, 0), 20)
    assert fleet.counts() == (1, 1)
    assert len(fleet.kinds("remove")) == 4


def test_fixed_fleet_never_adds_or_removes():
    cfg = PlannerConfig(ttft_ms=500, itl_ms=50, budget=8, fixed_fleet=True, confirm_ticks=1)
    fleet = Fleet(cfg, FOUR)
    fleet.run((0.0, 0, 0), 10)
    fleet.run((10.0, 2000, 100), 10)
    assert not fleet.kinds("add") and not fleet.kinds("remove")
    assert sum(fleet.counts()) == 4
    assert "fleet is 4" in fleet.kinds("unreachable")[0].reason


def test_latency_over_target_grows_its_pool():
    cfg = PlannerConfig(ttft_ms=500, itl_ms=50, budget=4, confirm_ticks=1, fixed_fleet=True)
    fleet = Fleet(cfg, FOUR)
    # The capacity figures say one prefill worker is plenty, but measured TTFT says no.
    fleet.run(CHAT, 1, ttft_ms=900.0, itl_ms=20.0)
    (move,) = fleet.kinds("move")
    assert move.to_role == "prefill" and move.inputs.ttft_ms == 900.0


def test_move_in_flight_blocks_further_changes_until_seen_done():
    cfg = PlannerConfig(ttft_ms=500, itl_ms=50, budget=4, confirm_ticks=1, cooldown_s=0,
                        fixed_fleet=True)  # fmt: skip
    state = initial_state(cfg, CAP)
    obs = observation(LONG, FOUR)
    state, ds = tick(obs, state, 10.0, cfg)
    (move,) = [d for d in ds if d.kind == "move"]
    # discovery still shows the old role (and then draining): the planner waits for it
    state, ds = tick(obs, state, 20.0, cfg)
    assert [d.kind for d in ds] == ["hold"] and "move" in ds[0].reason
    draining = replace(obs, workers=tuple(
        replace(w, draining=True) if w.worker_id == move.worker_id else w for w in obs.workers
    ))  # fmt: skip
    state, ds = tick(draining, state, 30.0, cfg)
    assert [d.kind for d in ds] == ["hold"]
    # never seen done: after the timeout it is reported and forgotten
    state, ds = tick(obs, state, 10.0 + cfg.move_timeout_s + 1, cfg)
    assert any(d.kind == "hold" and "not seen done" in d.reason for d in ds)
    # ... and the move, still needed, is asked again (the old one is gone)
    assert [(m[0], m[2]) for m in state.moving] == [(move.worker_id, 131.0)]


def test_pool_size_band_and_budget_sharing():
    cfg = PlannerConfig(ttft_ms=500, itl_ms=50, budget=5)
    # 3 workers at 1000 tok/s: growing needs > 2400; shrinking needs <= 2 * 550
    assert pool_size(2500, 1000, 3, cfg) == (4, 4)
    assert pool_size(2000, 1000, 3, cfg) == (3, 3)
    assert pool_size(1500, 1000, 3, cfg) == (2, 3)  # inside the band: stays
    assert pool_size(1000, 1000, 3, cfg) == (2, 2)
    assert fit_budget((8, 2), cfg) == (4, 1)
    assert fit_budget((9, 0), cfg) == (4, 1)  # minimum of each kept
    assert fit_budget((2, 2), cfg) == (2, 2)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="budget 1"):
        PlannerConfig(ttft_ms=500, itl_ms=50, budget=1)
    with pytest.raises(ValueError, match="shrink_util"):
        PlannerConfig(ttft_ms=500, itl_ms=50, budget=4, shrink_util=0.9)


def test_a_fleet_without_prefill_and_decode_workers_is_reported_not_planned():
    cfg = PlannerConfig(ttft_ms=500, itl_ms=50, budget=4, fixed_fleet=True)
    fleet = Fleet(cfg, {"w0": "aggregated", "w1": "decode"})
    fleet.run(CHAT, 10)
    assert [d.kind for d in fleet.log] == ["unreachable"]
    assert "fleet is 1" in fleet.log[0].reason
