"""The health monitor is pure: driven here by a ManualClock and hand-made load reports."""

from __future__ import annotations

import pytest

from tokenfab.clock import ManualClock
from tokenfab.protocol import LoadReport
from tokenfab.router.health import (
    HealthConfig,
    HealthMonitor,
    choose_active,
    is_outlier,
    like_load,
    median_mad,
)


def report(wid: str, steps: int, age: float = 0.0, running: int = 1, ema: float = 0.01, **kw):
    return LoadReport(
        worker_id=wid, num_steps=steps, step_age_s=age, running=running, step_time_ema=ema, **kw
    )


def monitor(*workers: str, target: int | None = None, **cfg) -> tuple[HealthMonitor, ManualClock]:
    clock = ManualClock(100.0)
    m = HealthMonitor(HealthConfig(**cfg), clock, target)
    for w in workers:
        m.add_worker(w)
    return m, clock


def test_robust_statistics() -> None:
    assert median_mad([1.0, 2.0, 3.0, 100.0]) == (2.5, 1.0)
    assert is_outlier(10.0, [1.0, 1.1, 0.9, 1.0], ratio=2, mads=5)
    assert not is_outlier(1.5, [1.0, 1.1, 0.9, 1.0], ratio=2, mads=5)  # under 2x the median
    # 2x the median but inside the spread of a noisy reference:
    assert not is_outlier(2.0, [0.2, 1.0, 1.8, 1.0, 0.1], ratio=2, mads=5)
    assert like_load(4, 8) and not like_load(4, 9) and like_load(0, 1)


def test_a_busy_worker_without_steps_is_drained_after_the_timeout_and_rejoins() -> None:
    m, clock = monitor("w0", "w1", hang_timeout_s=1.5)
    m.on_report(report("w0", steps=10))
    m.on_stream_opened("w0")
    m.on_report(report("w1", steps=10, running=0))
    clock.advance(1.4)
    assert m.check() == ([], [])  # 1.4 s without a step: not yet
    clock.advance(0.2)  # the worker stopped: no reports at all
    drains, _ = m.check()
    assert [(d.worker_id, d.reason, d.migrate) for d in drains] == [("w0", "hang", True)]
    assert m.routable(["w0", "w1"]) == ["w1"]
    assert m.check() == ([], [])  # reported once
    # It resumes: its report shows steps again, so it serves again.
    m.on_stream_closed("w0")
    m.on_report(report("w0", steps=11))
    assert m.check() == ([], ["w0"])
    assert m.routable(["w0", "w1"]) == ["w0", "w1"]


def test_a_hung_engine_whose_loop_still_reports_stays_drained() -> None:
    m, clock = monitor("w0", hang_timeout_s=1.0)
    m.on_report(report("w0", steps=5, age=0.0))
    clock.advance(1.1)
    m.on_report(report("w0", steps=5, age=1.1))  # the heartbeat goes on, the steps do not
    assert [d.reason for d in m.check()[0]] == ["hang"]
    clock.advance(1.0)
    m.on_report(report("w0", steps=5, age=2.1))
    assert m.check() == ([], []) and m.routable(["w0"]) == []


def test_idle_workers_and_long_steps_are_not_hangs() -> None:
    m, clock = monitor("idle", "slow", hang_timeout_s=1.0)
    m.on_report(report("idle", steps=3, age=50.0, running=0))  # idle for ages: fine
    m.on_report(report("slow", steps=3, ema=2.0))  # 2 s steps: allowed 8 s
    clock.advance(5.0)
    assert m.check() == ([], [])
    # A request sent to the long-idle worker starts its clock only now.
    m.on_stream_opened("idle")
    clock.advance(0.5)
    assert m.check() == ([], [])
    clock.advance(3.6)
    assert {d.worker_id for d in m.check()[0]} == {"idle", "slow"}


def test_quarantine_and_draining_reports() -> None:
    m, _ = monitor("w0", "w1", "w2")
    m.on_report(report("w0", 1, state="quarantined", state_reason="NaN"))
    m.on_report(report("w1", 1, state="draining", state_reason="SIGTERM"))
    drains = {d.worker_id: d for d in m.check()[0]}
    assert drains["w0"].reason == "quarantined" and drains["w0"].migrate
    assert drains["w1"].reason == "draining" and not drains["w1"].migrate
    assert m.routable(["w0", "w1", "w2"]) == ["w2"]


def test_a_worker_whose_drain_ends_serves_again_but_a_quarantined_one_does_not() -> None:
    # a role change that timed out: the worker drained, then reports serving again
    m, _ = monitor("w0", "w1")
    m.on_report(report("w0", 1, state="draining", state_reason="changing role to prefill"))
    m.on_report(report("w1", 1, state="quarantined", state_reason="NaN"))
    assert {d.worker_id for d in m.check()[0]} == {"w0", "w1"}
    assert m.routable(["w0", "w1"]) == []
    m.on_report(report("w0", 2))
    m.on_report(report("w1", 2))
    drains, restored = m.check()
    assert drains == [] and restored == ["w0"]
    assert m.routable(["w0", "w1"]) == ["w0"]


def test_canary_mismatch_quarantines_against_the_majority() -> None:
    m, _ = monitor("a", "b", "c")
    m.on_canary("a", [1, 2, 3])
    assert m.check() == ([], [])  # one answer is no reference
    m.on_canary("b", [1, 2, 3])
    m.on_canary("c", [9, 9, 9])
    drains = m.check()[0]
    assert [(d.worker_id, d.reason) for d in drains] == [("c", "canary")]
    # Two workers agreeing made the reference; a later lone wrong answer is still wrong.
    m.on_canary("a", [7, 7, 7])
    assert [d.worker_id for d in m.check()[0]] == ["a"]
    assert m.routable(["a", "b", "c"]) == ["b"]


def test_two_workers_disagreeing_from_the_start_decide_nothing() -> None:
    m, _ = monitor("a", "b")
    m.on_canary("a", [1])
    m.on_canary("b", [2])
    assert m.check() == ([], [])


def test_straggler_against_peers_is_drained_then_rejoins_after_cooldown() -> None:
    m, clock = monitor("a", "b", "c", "d", straggler_reports=3, straggler_cooldown_s=30)
    for _ in range(3):
        for w, ema in (("a", 0.010), ("b", 0.011), ("c", 0.012), ("d", 0.050)):
            m.on_report(report(w, 100, running=8, ema=ema))
    drains = m.check()[0]
    assert [(d.worker_id, d.reason, d.migrate) for d in drains] == [("d", "straggler", False)]
    assert "peers" in drains[0].detail
    for w in "abcd":  # everyone idle now (else 31 s without steps would be hangs)
        m.on_report(report(w, 100, running=0))
    clock.advance(31)
    assert m.check() == ([], ["d"])


def test_straggler_needs_consecutive_reports_and_a_like_load() -> None:
    m, _ = monitor("a", "b", "c", "d", straggler_reports=3)
    for ema_d in (0.05, 0.01, 0.05, 0.05):  # interrupted by a normal report
        for w, ema in (("a", 0.010), ("b", 0.011), ("c", 0.012), ("d", ema_d)):
            m.on_report(report(w, 100, running=8, ema=ema))
    assert m.check() == ([], [])
    # A worker with 8x the batch is slower per step for a reason: not compared.
    m2, _ = monitor("a", "b", "c", "d")
    for _ in range(5):
        for w, ema, n in (("a", 0.01, 4), ("b", 0.01, 4), ("c", 0.01, 4), ("d", 0.05, 32)):
            m2.on_report(report(w, 100, running=n, ema=ema))
    assert m2.check() == ([], [])


def test_straggler_against_its_own_history() -> None:
    m, _ = monitor("solo", straggler_min_history=8, straggler_reports=2)
    for i in range(10):
        m.on_report(report("solo", 100 + i, running=4, ema=0.010 + 0.0005 * (i % 3)))
    assert m.check() == ([], [])
    m.on_report(report("solo", 200, running=4, ema=0.04))
    m.on_report(report("solo", 201, running=5, ema=0.04))
    drains = m.check()[0]
    assert [d.reason for d in drains] == ["straggler"] and "own" in drains[0].detail


def test_hot_spares_fill_in_for_a_drained_worker() -> None:
    assert choose_active(["a", "b", "c"], set(), 2) == {"a", "b"}
    assert choose_active(["b", "c"], {"a", "b"}, 2) == {"b", "c"}
    assert choose_active(["a", "b", "c"], {"b", "c"}, 2) == {"b", "c"}  # no needless swap
    assert choose_active(["a", "b"], set(), None) == {"a", "b"}
    m, clock = monitor("w0", "w1", "w2", target=2, hang_timeout_s=1.0)
    assert m.routable(["w0", "w1", "w2"]) == ["w0", "w1"]
    assert m.spares() == ["w2"]
    m.on_report(report("w0", 1))
    clock.advance(1.5)
    drains, restored = m.check()
    assert [d.worker_id for d in drains] == ["w0"] and restored == ["w2"]
    assert m.routable(["w0", "w1", "w2"]) == ["w1", "w2"]
    # The hung worker comes back and waits as the spare.
    m.on_report(report("w0", 2, running=0))
    m.check()
    assert m.spares() == ["w0"]


def test_removed_workers_are_forgotten() -> None:
    m, _ = monitor("w0")
    m.remove_worker("w0")
    m.on_report(report("w0", 1, state="quarantined"))
    m.on_stream_opened("w0")
    assert m.check() == ([], []) and m.drained("w0") is None


@pytest.mark.parametrize("reason", ["quarantined", "draining"])
def test_drained_workers_get_no_canary_vote(reason: str) -> None:
    m, _ = monitor("a", "b", "c")
    m.on_report(report("a", 1, state=reason))
    m.check()
    m.on_canary("a", [5])
    m.on_canary("b", [1])
    m.on_canary("c", [1])
    assert m.drained("b") is None and m.drained("c") is None


def test_a_step_the_worker_expects_to_be_long_is_not_a_hang() -> None:
    # A 4,000-token prefill on a slow CPU: 3 s expected, a 10 ms step average.
    m, clock = monitor("w0", hang_timeout_s=1.5)
    m.on_report(report("w0", steps=5, ema=0.01, step_expected_s=3.0))
    clock.advance(10.0)
    assert m.check() == ([], [])  # allowed 4 x 3 s
    clock.advance(2.5)
    assert [d.reason for d in m.check()[0]] == ["hang"]


def test_a_worker_waiting_on_others_is_alive_while_it_reports() -> None:
    # A decode worker's stream is open while a prefill worker computes the prompt: its engine
    # is idle, it does not step, but its load reports keep coming.
    m, clock = monitor("decode", hang_timeout_s=1.5)
    m.on_report(report("decode", steps=50, age=30.0, running=0))
    m.on_stream_opened("decode")
    for _ in range(20):
        clock.advance(0.5)
        m.on_report(report("decode", steps=50, age=30.0, running=0))
        assert m.check() == ([], [])
    # The blocks arrive and its engine takes the request: the step clock starts now, not at
    # the stream's opening (10 s ago) or at its last step (40 s ago).
    m.on_report(report("decode", steps=50, age=40.0, running=1))
    clock.advance(1.0)
    assert m.check() == ([], [])
    clock.advance(1.0)
    drains = m.check()[0]
    assert [d.reason for d in drains] == ["hang"] and "engine step" in drains[0].detail


def test_a_waiting_worker_that_stops_reporting_is_hung() -> None:
    m, clock = monitor("decode", hang_timeout_s=1.5)
    m.on_report(report("decode", steps=50, age=1.0, running=0))
    m.on_stream_opened("decode")
    clock.advance(1.0)
    m.on_report(report("decode", steps=50, age=2.0, running=0))
    clock.advance(1.4)
    assert m.check() == ([], [])
    clock.advance(0.2)  # 1.6 s since its last report (SIGSTOP)
    drains = m.check()[0]
    assert [d.reason for d in drains] == ["hang"] and "load report" in drains[0].detail


def test_long_prefill_steps_are_not_compared_with_short_decode_steps() -> None:
    m, _ = monitor("prefill", "d1", "d2", "d3", straggler_reports=1)
    for _ in range(10):
        m.on_report(report("prefill", 100, running=2, ema=0.30, step_tokens_ema=900.0))
        for w in ("d1", "d2", "d3"):
            m.on_report(report(w, 100, running=2, ema=0.03, step_tokens_ema=2.0))
    assert m.check() == ([], [])
    # at like tokens per step, the same gap is a straggler
    m.on_report(report("d3", 100, running=2, ema=0.30, step_tokens_ema=2.0))
    assert [d.worker_id for d in m.check()[0]] == ["d3"]


def test_own_history_is_judged_per_step_token() -> None:
    # A lone prefill worker: its steps take longer with longer prompts, at the same cost per
    # token; only a higher cost per token is straggling.
    m, _ = monitor("prefill", straggler_min_history=8, straggler_reports=2)
    for i in range(10):
        tokens = 600.0 + 60 * (i % 4)
        m.on_report(
            report("prefill", 100 + i, running=3, ema=tokens * 3e-4, step_tokens_ema=tokens)
        )
    for i in range(3):
        m.on_report(report("prefill", 200 + i, running=3, ema=0.33, step_tokens_ema=1100.0))
    assert m.check() == ([], [])  # twice the step time for ~twice the tokens
    for i in range(2):
        m.on_report(report("prefill", 300 + i, running=3, ema=0.6, step_tokens_ema=700.0))
    drains = m.check()[0]
    assert [d.reason for d in drains] == ["straggler"] and "per step token" in drains[0].detail
