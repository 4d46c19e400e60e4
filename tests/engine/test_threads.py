"""ThreadTuner: switches to a thread count that measures faster, backs off from slower ones."""

from __future__ import annotations

from tokenfab.engine.threads import ThreadTuner


def drive(
    tuner: ThreadTuner, cost_per_token: dict[int, float], steps: int, work: int = 64
) -> list[int]:
    used = []
    for _ in range(steps):
        n = tuner.threads_for_next_step(work)
        used.append(n)
        tuner.record(cost_per_token[n] * work, work)
    return used


def test_switches_to_the_faster_count_and_stays() -> None:
    tuner = ThreadTuner(max_threads=2)
    used = drive(tuner, {1: 0.001, 2: 0.01}, 200)  # contended: one thread is 10x faster
    assert tuner.current == 1
    assert used[:3] == [2, 2, 2] and used.count(2) < 12


def test_keeps_the_faster_default_and_probes_rarely() -> None:
    tuner = ThreadTuner(max_threads=2)
    used = drive(tuner, {1: 0.002, 2: 0.001}, 500)  # quiet: two threads are faster
    assert tuner.current == 2
    assert 1 <= used.count(1) <= 8  # exponential back-off


def test_does_not_compare_unlike_steps() -> None:
    tuner = ThreadTuner(max_threads=2)
    for _ in range(10):
        tuner.threads_for_next_step(2048)
        tuner.record(2048 * 0.0005, 2048)  # cheap per token (prefill)
    # The first decode-sized step must not be a probe judged against prefill costs.
    assert tuner.threads_for_next_step(64) == 2


def test_contention_that_starts_later_is_noticed_at_once() -> None:
    """Two threads won on a quiet machine and the tuner backed off its probes; then a busy
    process takes a core and two threads become 10x slower: one thread is probed again
    within a few steps, not after the back-off."""
    tuner = ThreadTuner(max_threads=2)
    drive(tuner, {1: 0.002, 2: 0.001}, 600)  # quiet: settles on 2, probes rarely
    assert tuner.current == 2
    used = drive(tuner, {1: 0.002, 2: 0.02}, 20)  # contended from now on
    assert tuner.current == 1
    assert used.index(1) <= 8
