"""Which workers may take work, decided from what they report: a worker is drained when it
hangs (requests but no engine step for a while), straggles (steps far slower than its peers'
or its own history at a like load, by median and MAD), is quarantined (its engine saw NaN/Inf
logits, or its canary answer differs from its peers'), or drains itself (SIGTERM). With hot
spares, a fixed number of healthy workers serve and the rest wait, swapped in on a failure.

Pure: no I/O and no clock reads but the injected `Clock`, so the twin and the tests drive it
with a `ManualClock`. `frontend/workers.py` feeds it and acts on its verdicts.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tokenfab.clock import Clock
from tokenfab.protocol import LoadReport

DrainReason = Literal["hang", "straggler", "quarantined", "canary", "draining"]

MAD_TO_SIGMA = 1.4826
"""Scales a median absolute deviation to a normal distribution's standard deviation."""


@dataclass(frozen=True)
class HealthConfig:
    hang_timeout_s: float = 1.5
    """Busy and no step for this long is a hang (detection within this plus one check)..."""
    hang_step_factor: float = 4.0
    """...or for this many of the worker's mean steps or of the step it is running (as the
    worker expects it from its tokens), when that is longer: a long prefill step on a slow
    machine is not a hang."""
    straggler_ratio: float = 2.0
    """A straggler's step time is at least this multiple of the reference median..."""
    straggler_mads: float = 5.0
    """...and this many robust standard deviations (MAD x 1.4826) above it."""
    straggler_min_peers: int = 3
    """Busy workers at a like load needed for a comparison with peers."""
    straggler_history: int = 64
    straggler_min_history: int = 8
    """Own samples at a like load needed for a comparison with the worker's history."""
    straggler_reports: int = 3
    """Consecutive slow load reports before a worker is drained (one slow step is noise)."""
    straggler_cooldown_s: float = 30.0
    """A drained straggler serves again after this long, and must prove slow afresh."""


@dataclass(frozen=True)
class Drain:
    worker_id: str
    reason: DrainReason
    detail: str
    migrate: bool
    """Its requests in flight must move now (hang, corruption); otherwise they may finish."""
    at: float
    """Clock time of the verdict."""


@dataclass
class _Worker:
    added_at: float
    streams: int = 0
    """Open generate streams this frontend has on the worker."""
    report: LoadReport | None = None
    report_at: float | None = None
    """Clock time the last load report arrived."""
    busy_since: float | None = None
    """Since when it has had streams open or requests in its engine (None: idle)."""
    engine_busy_since: float | None = None
    """Since when its reports have shown requests in its engine (None: none)."""
    progress_at: float | None = None
    """Clock time of the last step the worker reported (receipt time minus its step age)."""
    history: deque[LoadReport] = field(default_factory=deque)
    """Own reports of normal speed, oldest first."""
    slow_reports: int = 0
    slow_detail: str = ""
    canary: tuple[int, ...] | None = None
    drain: Drain | None = None
    steps_at_drain: int = 0


def median_mad(values: Sequence[float]) -> tuple[float, float]:
    """The median and the median absolute deviation from it."""
    med = statistics.median(values)
    return med, statistics.median(abs(v - med) for v in values)


def is_outlier(value: float, reference: Sequence[float], ratio: float, mads: float) -> bool:
    """`value` far above `reference`: at least `ratio` x its median and `mads` robust
    standard deviations above it (both, so a tight reference does not flag a small rise and a
    noisy one does not hide a large one)."""
    med, mad = median_mad(reference)
    return value >= ratio * med and value > med + mads * MAD_TO_SIGMA * mad


def like_load(a: int, b: int) -> bool:
    """Step times are comparable only at a similar batch size (within 2x)."""
    lo, hi = sorted((max(a, 1), max(b, 1)))
    return hi <= 2 * lo


def like_reports(a: LoadReport, b: LoadReport) -> bool:
    """Like batch sizes and, where both say, like tokens per step (a prefill worker's
    1,000-token steps are not comparable with a decode worker's 8-token ones)."""
    if not like_load(a.running, b.running):
        return False
    ta, tb = a.step_tokens_ema, b.step_tokens_ema
    return ta <= 0 or tb <= 0 or like_load(round(ta), round(tb))


def token_seconds(r: LoadReport) -> float:
    """Seconds per step token (per step where the report does not count tokens)."""
    return r.step_time_ema / r.step_tokens_ema if r.step_tokens_ema >= 1 else r.step_time_ema


def choose_active(healthy: Iterable[str], active: set[str], target: int | None) -> set[str]:
    """The workers that serve: all healthy ones without spares (`target` None); else `target`
    of them, keeping those serving now (no needless swaps) and promoting spares in id order
    to fill a gap."""
    ordered = sorted(healthy)
    if target is None:
        return set(ordered)
    keep = [w for w in ordered if w in active][:target]
    spares = [w for w in ordered if w not in active]
    return set(keep + spares[: max(0, target - len(keep))])


class HealthMonitor:
    def __init__(self, config: HealthConfig, clock: Clock, active_target: int | None = None):
        """`active_target`: with hot spares, how many healthy workers serve (None: all)."""
        self.config = config
        self.clock = clock
        self.active_target = active_target
        self._workers: dict[str, _Worker] = {}
        self._active: set[str] = set()
        self._reference: tuple[int, ...] | None = None
        """The canary answer the workers agree on."""
        self._pending: list[Drain] = []

    # ------------------------------------------------------------------ inputs

    def add_worker(self, worker_id: str) -> None:
        self._workers.setdefault(worker_id, _Worker(added_at=self.clock.now()))
        self._refresh_active()

    def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)
        self._active.discard(worker_id)
        self._refresh_active()  # a spare takes its place

    def on_stream_opened(self, worker_id: str) -> None:
        w = self._workers.get(worker_id)
        if w is not None:
            w.streams += 1
            self._update_busy(w)

    def on_stream_closed(self, worker_id: str) -> None:
        w = self._workers.get(worker_id)
        if w is not None:
            w.streams = max(0, w.streams - 1)
            self._update_busy(w)

    def on_report(self, report: LoadReport) -> None:
        w = self._workers.get(report.worker_id)
        if w is None:
            return
        now = self.clock.now()
        w.report, w.report_at = report, now
        if report.running + report.waiting == 0:
            w.engine_busy_since = None
        elif w.engine_busy_since is None:
            w.engine_busy_since = now
        if report.num_steps > 0:
            last_step = now - report.step_age_s
            w.progress_at = last_step if w.progress_at is None else max(w.progress_at, last_step)
        self._update_busy(w)
        if report.state == "quarantined":
            self._drain(report.worker_id, "quarantined", report.state_reason, migrate=True)
        elif report.state == "draining":
            self._drain(report.worker_id, "draining", report.state_reason, migrate=False)
        elif w.drain is not None and w.drain.reason == "hang" and self._recovered(w, report):
            w.drain = None
        elif w.drain is not None and w.drain.reason == "draining" and report.state == "serving":
            w.drain = None  # its drain ended without it leaving (a role change that failed)
        if report.running > 0 and report.step_time_ema > 0 and report.state == "serving":
            self._check_straggler(report.worker_id, w, report)

    def on_canary(self, worker_id: str, answer: Sequence[int]) -> None:
        """A worker's greedy answer to the canary prompt. The reference is the answer most
        workers give (at least two agreeing, and more than any other answer); a worker whose
        answer differs from it is quarantined."""
        w = self._workers.get(worker_id)
        if w is None:
            return
        w.canary = tuple(answer)
        votes: dict[tuple[int, ...], int] = {}
        for other in self._workers.values():
            if other.canary is not None and other.drain is None:
                votes[other.canary] = votes.get(other.canary, 0) + 1
        ranked = sorted(votes.values(), reverse=True)
        best = max(votes, key=lambda a: votes[a], default=None)
        if best is not None and ranked[0] >= 2 and (len(ranked) == 1 or ranked[1] < ranked[0]):
            self._reference = best
        ref = self._reference
        if ref is None:
            return
        for wid, other in self._workers.items():
            if other.canary is not None and other.canary != ref:
                self._drain(
                    wid, "canary", f"canary answer {list(other.canary)} != {list(ref)}", True
                )

    # ------------------------------------------------------------------ decisions

    def check(self) -> tuple[list[Drain], list[str]]:
        """New drains since the last call (hangs are found here) and workers that serve
        again (a hung one that stepped or went idle, a straggler after its cooldown)."""
        now = self.clock.now()
        cfg = self.config
        for wid, w in self._workers.items():
            if w.drain is None and w.busy_since is not None:
                r = w.report
                if w.engine_busy_since is not None:
                    # Requests in its engine: it must step.
                    start = max(w.busy_since, w.engine_busy_since)
                    since = max(start, w.progress_at or start)
                    what = "engine step"
                else:
                    # Streams open, engine idle by its last report (e.g. a decode worker
                    # waiting for a remote prefill): alive while its reports keep coming.
                    since = max(w.busy_since, w.report_at or w.busy_since)
                    what = "load report"
                expected = 0.0 if r is None else max(r.step_time_ema, r.step_expected_s)
                limit = max(cfg.hang_timeout_s, cfg.hang_step_factor * expected)
                if now - since > limit:
                    self._drain(wid, "hang", f"busy and no {what} for {now - since:.1f}s", True)
        before = set(self._active)
        restored = []
        for wid, w in self._workers.items():
            d = w.drain
            if d is not None and d.reason == "straggler" and now - d.at >= cfg.straggler_cooldown_s:
                w.drain = None
                w.history.clear()
                w.slow_reports = 0
                restored.append(wid)
        self._refresh_active()
        # Spares promoted count as restored (they serve now); hang recoveries too.
        restored += sorted(self._active - before - set(restored))
        drains, self._pending = self._pending, []
        return drains, restored

    def routable(self, candidates: Iterable[str]) -> list[str]:
        """The candidates that may take new work."""
        return [c for c in candidates if c in self._active]

    def drained(self, worker_id: str) -> Drain | None:
        w = self._workers.get(worker_id)
        return None if w is None else w.drain

    def spares(self) -> list[str]:
        """Healthy workers waiting as spares."""
        return sorted(
            w for w, s in self._workers.items() if s.drain is None and w not in self._active
        )

    # ------------------------------------------------------------------ internals

    def _refresh_active(self) -> None:
        self._active = choose_active(
            (wid for wid, w in self._workers.items() if w.drain is None),
            self._active,
            self.active_target,
        )

    def _update_busy(self, w: _Worker) -> None:
        r = w.report
        busy = w.streams > 0 or (r is not None and r.running + r.waiting > 0)
        if not busy:
            w.busy_since = None
        elif w.busy_since is None:
            w.busy_since = self.clock.now()

    def _recovered(self, w: _Worker, report: LoadReport) -> bool:
        """A hung worker serves again once it steps again, or has nothing left to run."""
        return report.num_steps > w.steps_at_drain or report.running + report.waiting == 0

    def _drain(self, worker_id: str, reason: DrainReason, detail: str, migrate: bool) -> None:
        w = self._workers[worker_id]
        if w.drain is not None and (w.drain.reason == reason or not migrate):
            return
        w.drain = Drain(worker_id, reason, detail, migrate, self.clock.now())
        w.steps_at_drain = w.report.num_steps if w.report is not None else 0
        self._active.discard(worker_id)
        self._pending.append(w.drain)

    def _check_straggler(self, worker_id: str, w: _Worker, report: LoadReport) -> None:
        cfg = self.config
        x = report.step_time_ema
        peers = [
            o.report.step_time_ema
            for wid, o in self._workers.items()
            if wid != worker_id
            and o.drain is None
            and o.report is not None
            and o.report.running > 0
            and o.report.step_time_ema > 0
            and like_reports(o.report, report)
        ]
        # Its own past steps, per token: a prefill worker's steps vary with prompt length.
        own = [token_seconds(r) for r in w.history if like_reports(r, report)]
        mine = token_seconds(report)
        why = ""
        if len(peers) + 1 >= cfg.straggler_min_peers:
            # Peers at a like load decide (a machine-wide slowdown slows them too).
            if is_outlier(x, [*peers, x], cfg.straggler_ratio, cfg.straggler_mads):
                med = statistics.median(peers)
                why = f"step {x * 1e3:.1f} ms vs peers' median {med * 1e3:.1f} ms"
        elif len(own) >= cfg.straggler_min_history and is_outlier(
            mine, own, cfg.straggler_ratio, cfg.straggler_mads
        ):
            med = statistics.median(own)
            why = f"{mine * 1e3:.2f} ms per step token vs its own median {med * 1e3:.2f} ms"
        if why:
            w.slow_reports += 1
            if w.slow_reports >= cfg.straggler_reports and w.drain is None:
                self._drain(worker_id, "straggler", why, migrate=False)
            return  # slow samples do not become the history they are judged by
        w.slow_reports = 0
        w.history.append(report)
        while len(w.history) > cfg.straggler_history:
            w.history.popleft()
