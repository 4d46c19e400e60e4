"""The planner's decisions: a state machine `tick(observation, state, now) -> (state,
decisions)`.

Each tick forecasts the next interval's prefill and decode token demand, turns it into the
worker counts each pool needs from per-worker capacity, and moves workers between the pools
(or asks for workers to be added or removed) within the budget. Pure: no clock reads, no
I/O, no torch; the planner process gathers observations and applies decisions, the twin
drives the same function from its virtual clock.

Guards: at least `min_per_role` workers of each role; a pool grows when forecast load
exceeds `target_util` of its capacity but shrinks only when the load would fit one worker
fewer below `shrink_util` (the band between them is the hysteresis); a changed target must
be wanted `confirm_ticks` ticks in a row and no change happens within `cooldown_s` of the
last; never more than `budget` workers; a need beyond the budget is reported (`unreachable`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from tokenfab.planner.capacity import Capacity, learn
from tokenfab.planner.forecast import DEFAULT_FORECASTER, Forecaster
from tokenfab.planner.observe import Observation, WorkerView
from tokenfab.protocol import WorkerRole

ROLES: tuple[WorkerRole, WorkerRole] = ("prefill", "decode")


@dataclass(frozen=True)
class PlannerConfig:
    ttft_ms: float
    itl_ms: float
    budget: int
    """Most workers in all (prefill + decode)."""
    interval_s: float = 10.0
    cooldown_s: float = 30.0
    target_util: float = 0.8
    """Pools are sized to run at this share of their capacity."""
    shrink_util: float = 0.55
    """A pool shrinks only when its load fits one worker fewer at this share or less."""
    confirm_ticks: int = 2
    min_per_role: int = 1
    move_timeout_s: float = 120.0
    """A move not seen done in discovery after this long is reported and forgotten."""
    fixed_fleet: bool = False
    """Only move the workers there are between roles (no add/remove): what the planner does
    when it cannot start or stop workers. Spare workers then go where they lower the busier
    pool's utilization by at least `balance_gain`, once that pool is past `shrink_util`."""
    balance_gain: float = 0.2
    learn_capacity: bool = True
    """Fold the per-worker rates a saturated pool delivered into the capacity (the given
    figures are a start; this machine's, under this traffic, are what the pools get)."""
    saturated_backlog_s: float = 2.0
    """A prefill pool whose queued prompt tokens would take this long at its capacity is
    saturated: what it computed is what it can."""
    forecaster: Forecaster = DEFAULT_FORECASTER

    def __post_init__(self) -> None:
        if self.budget < 2 * self.min_per_role:
            raise ValueError(
                f"budget {self.budget} cannot hold {self.min_per_role} worker(s) of each role"
            )
        if not 0 < self.shrink_util < self.target_util <= 1:
            raise ValueError(
                f"need 0 < shrink_util ({self.shrink_util}) < target_util ({self.target_util}) <= 1"
            )
        if self.ttft_ms <= 0 or self.itl_ms <= 0:
            raise ValueError("TTFT and ITL targets must be > 0 ms")


@dataclass(frozen=True)
class Inputs:
    """What a decision was made from (logged with it)."""

    now: float
    prefill_demand: float
    """Observed prompt tokens/s to compute (cache hits excluded) plus the queued backlog."""
    decode_demand: float
    prefill_forecast: float
    decode_forecast: float
    prefill_capacity: float
    """Per worker, tokens/s."""
    decode_capacity: float
    capacity_source: str
    current: tuple[int, int]
    """(prefill, decode) workers now."""
    needed: tuple[int, int]
    """What the forecast needs (before budget and hysteresis)."""
    target: tuple[int, int]
    ttft_ms: float | None
    itl_ms: float | None


@dataclass(frozen=True)
class Decision:
    kind: Literal["move", "add", "remove", "unreachable", "hold"]
    reason: str
    inputs: Inputs
    worker_id: str = ""
    from_role: WorkerRole | None = None
    to_role: WorkerRole | None = None


@dataclass(frozen=True)
class PlannerState:
    capacity: Capacity
    prefill_fc: Forecaster = DEFAULT_FORECASTER
    decode_fc: Forecaster = DEFAULT_FORECASTER
    last_change_at: float | None = None
    wanted: tuple[int, int] | None = None
    wanted_ticks: int = 0
    moving: tuple[tuple[str, WorkerRole, float], ...] = ()
    """Moves asked and not yet seen done: (worker, new role, when asked)."""
    over_ticks: int = 0
    """Ticks in a row whose need exceeded the budget."""
    unreachable: bool = False
    """Whether that was reported (once per episode of `confirm_ticks` ticks or more)."""
    counts: dict[str, int] = field(default_factory=dict)
    """Decisions made so far, by kind (for metrics and the benchmark)."""


def initial_state(config: PlannerConfig, capacity: Capacity) -> PlannerState:
    return PlannerState(
        capacity=capacity, prefill_fc=config.forecaster, decode_fc=config.forecaster
    )


def demand(obs: Observation) -> tuple[float, float]:
    """Token rates the pools must serve: what was served plus the backlog, drained over one
    interval (a saturated pool serves its capacity; its queue shows the rest)."""
    pre = obs.prefill_tokens_rate + obs.prefill_queue_tokens / obs.interval_s
    dec = obs.decode_tokens_rate + obs.decode_waiting * obs.output_tokens_mean / obs.interval_s
    return pre, dec


def pool_size(load: float, cap: float, current: int, cfg: PlannerConfig) -> tuple[int, int]:
    """(needed, wanted) workers for a pool: needed at target utilization; wanted applies the
    hysteresis band (grow past target_util, shrink only below shrink_util with one fewer)."""
    needed = max(cfg.min_per_role, math.ceil(load / (cap * cfg.target_util) - 1e-9))
    if needed > current:
        return needed, needed
    shrink_to = max(cfg.min_per_role, math.ceil(load / (cap * cfg.shrink_util) - 1e-9))
    return needed, min(current, shrink_to)


def fit_budget(need: tuple[int, int], cfg: PlannerConfig) -> tuple[int, int]:
    """Share the budget in proportion to what each pool needs, each keeping its minimum."""
    p, d = need
    if p + d <= cfg.budget:
        return p, d
    lo, hi = cfg.min_per_role, cfg.budget - cfg.min_per_role
    share = round(cfg.budget * p / (p + d))
    p2 = min(hi, max(lo, share))
    return p2, cfg.budget - p2


def _util(load: tuple[float, float], cap: Capacity, n: tuple[int, int]) -> float:
    """The busier pool's utilization with n workers (a pool of 0 is infinitely busy)."""
    us = []
    for f, c, k in zip(load, (cap.prefill_tokens_per_s, cap.decode_tokens_per_s), n, strict=True):
        us.append(math.inf if k <= 0 else f / (c * k))
    return max(us)


def fleet_target(
    cur: tuple[int, int],
    want: tuple[int, int],
    load: tuple[float, float],
    cap: Capacity,
    cfg: PlannerConfig,
) -> tuple[int, int]:
    """A fixed fleet of sum(cur) workers: meet each pool's want (sharing the fleet when it
    cannot), then give the spare workers to the busier pool; from a split that already meets
    the wants, move one worker only if that lowers the busier pool's utilization by at least
    `balance_gain` (so noise near balance moves nothing)."""
    n = cur[0] + cur[1]
    fleet = replace(cfg, budget=n) if n >= 2 * cfg.min_per_role else cfg
    base = fit_budget(want, fleet)
    if cur[0] >= base[0] and cur[1] >= base[1]:
        best, best_u = cur, _util(load, cap, cur)
        if best_u <= cfg.shrink_util:
            # both pools lightly loaded: a move would buy nothing and costs a drain (and
            # the first intervals' forecasts, before requests finish, are the noisiest)
            return cur
        for step in ((1, -1), (-1, 1)):
            t = (cur[0] + step[0], cur[1] + step[1])
            if min(t) < cfg.min_per_role or t[0] < base[0] or t[1] < base[1]:
                continue
            u = _util(load, cap, t)
            if u < best_u * (1 - cfg.balance_gain):
                best, best_u = t, u
        return best
    p, d = base
    while p + d < n:  # spares to the busier pool
        if _util(load, cap, (p + 1, d)) <= _util(load, cap, (p, d + 1)):
            p += 1
        else:
            d += 1
    return p, d


def _latency_bump(
    obs: Observation, current: tuple[int, int], want: tuple[int, int], cfg: PlannerConfig
) -> tuple[int, int]:
    """A measured latency over its target asks for one more worker in the pool that sets it
    (TTFT: prefill, ITL: decode), whatever the capacity figures say."""
    p, d = want
    if obs.ttft_ms is not None and obs.ttft_ms > cfg.ttft_ms:
        p = max(p, current[0] + 1)
    if obs.itl_ms is not None and obs.itl_ms > cfg.itl_ms:
        d = max(d, current[1] + 1)
    return p, d


def _settle_moves(obs: Observation, state: PlannerState, now: float, cfg: PlannerConfig):
    """Drop moves that discovery shows done; report and drop those that took too long."""
    roles = {w.worker_id: w for w in obs.workers}
    still, late = [], []
    for wid, role, since in state.moving:
        w = roles.get(wid)
        if w is not None and w.role == role and not w.draining:
            continue
        if w is None or now - since > cfg.move_timeout_s:
            late.append(wid)
            continue
        still.append((wid, role, since))
    return tuple(still), late


def _pick(workers: tuple[WorkerView, ...], role: WorkerRole, busy: set[str]) -> WorkerView | None:
    """The least loaded worker of a role (ties: lowest id, so decisions are reproducible)."""
    pool = [w for w in workers if w.role == role and not w.draining and w.worker_id not in busy]
    return min(pool, key=lambda w: (w.running + w.waiting, w.worker_id), default=None)


def _changes(
    obs: Observation, target: tuple[int, int], busy: set[str], inputs: Inputs
) -> list[Decision]:
    """One step toward the target: a move between pools when one has too many and the other
    too few, else an add (a pool short, room in the budget) or a remove (a pool long)."""
    cur = (obs.count("prefill"), obs.count("decode"))
    short = [r for r, c, t in zip(ROLES, cur, target, strict=True) if c < t]
    long = [r for r, c, t in zip(ROLES, cur, target, strict=True) if c > t]
    if short and long:
        w = _pick(obs.workers, long[0], busy)
        if w is None:
            return []
        why = f"{long[0]} pool {cur} -> {target}: {w.worker_id} moves to {short[0]}"
        return [Decision("move", why, inputs, w.worker_id, long[0], short[0])]
    if short:
        return [Decision("add", f"{short[0]} pool short: {cur} -> {target}", inputs,
                         to_role=short[0])]  # fmt: skip
    if long:
        w = _pick(obs.workers, long[0], busy)
        if w is None:
            return []
        why = f"{long[0]} pool idle enough to shrink: {cur} -> {target}"
        return [Decision("remove", why, inputs, w.worker_id, from_role=long[0])]
    return []


def _count(state: PlannerState, decisions: list[Decision]) -> dict[str, int]:
    counts = dict(state.counts)
    for d in decisions:
        counts[d.kind] = counts.get(d.kind, 0) + 1
    return counts


def measured_capacity(obs: Observation, cap: Capacity, cfg: PlannerConfig) -> Capacity:
    """The capacity after this interval: a saturated pool's per-worker rate folded in (a
    prefill pool with a backlog of `saturated_backlog_s`, a decode pool with requests
    waiting for a slot). Not while a worker drains: its pool's rate is not a full pool's."""
    n_p, n_d = obs.count("prefill"), obs.count("decode")
    if not cfg.learn_capacity or any(w.draining for w in obs.workers):
        return cap
    pre = dec = None
    backlog = cap.prefill_tokens_per_s * n_p * cfg.saturated_backlog_s
    if n_p and obs.prefill_tokens_rate > 0 and obs.prefill_queue_tokens >= backlog:
        pre = obs.prefill_tokens_rate / n_p
    if n_d and obs.decode_tokens_rate > 0 and obs.decode_waiting > 0:
        dec = obs.decode_tokens_rate / n_d
    if pre is None and dec is None:
        return cap
    return learn(cap, prefill_tokens_per_s=pre, decode_tokens_per_s=dec)


def tick(
    obs: Observation, state: PlannerState, now: float, cfg: PlannerConfig
) -> tuple[PlannerState, list[Decision]]:
    """One planning step. `now` is the caller's clock (seconds); nothing here reads one."""
    # a pool mid-move delivers less than its count says: nothing is learned from it
    cap = state.capacity if state.moving else measured_capacity(obs, state.capacity, cfg)
    state = replace(state, capacity=cap)
    pre_load, dec_load = demand(obs)
    pre_fc = state.prefill_fc.update(pre_load)
    dec_fc = state.decode_fc.update(dec_load)
    # Plan for the larger of the forecast and what is happening now: a forecast that lags a
    # rising load must not shrink a pool that is busy this very interval.
    f_pre, f_dec = max(pre_fc.forecast(), pre_load), max(dec_fc.forecast(), dec_load)
    cur = (obs.count("prefill"), obs.count("decode"))
    need_p, want_p = pool_size(f_pre, cap.prefill_tokens_per_s, cur[0], cfg)
    need_d, want_d = pool_size(f_dec, cap.decode_tokens_per_s, cur[1], cfg)
    want = _latency_bump(obs, cur, (want_p, want_d), cfg)
    need = (max(need_p, want[0]), max(need_d, want[1]))
    load = (f_pre, f_dec)
    limit = cfg.budget
    if cfg.fixed_fleet:
        limit = min(cfg.budget, sum(cur))
        # too few prefill/decode workers to plan (e.g. an aggregated deployment): nothing
        # to move; the shortfall is reported as unreachable
        small = sum(cur) < 2 * cfg.min_per_role
        target = cur if small else fleet_target(cur, want, load, cap, cfg)
    else:
        target = fit_budget(want, cfg)

    def inputs(t: tuple[int, int]) -> Inputs:
        return Inputs(
            now=now, prefill_demand=pre_load, decode_demand=dec_load, prefill_forecast=f_pre,
            decode_forecast=f_dec, prefill_capacity=cap.prefill_tokens_per_s,
            decode_capacity=cap.decode_tokens_per_s, capacity_source=cap.source, current=cur,
            needed=need, target=t, ttft_ms=obs.ttft_ms, itl_ms=obs.itl_ms,
        )  # fmt: skip

    inp = inputs(target)
    decisions: list[Decision] = []
    over_ticks = state.over_ticks + 1 if need[0] + need[1] > limit else 0
    report = over_ticks >= cfg.confirm_ticks and not state.unreachable
    if report:
        decisions.append(
            Decision(
                "unreachable",
                f"load needs {need[0]} prefill + {need[1]} decode workers; "
                f"{'fleet' if cfg.fixed_fleet else 'budget'} is {limit}: "
                f"running {target[0]} + {target[1]} (latency targets will be missed)",
                inp,
            )
        )
    moving, late = _settle_moves(obs, state, now, cfg)
    for wid in late:
        decisions.append(Decision("hold", f"move of {wid} not seen done; forgotten", inp, wid))
    state = replace(
        state, prefill_fc=pre_fc, decode_fc=dec_fc, moving=moving, over_ticks=over_ticks,
        unreachable=over_ticks > 0 and (state.unreachable or report),
    )  # fmt: skip

    if target == cur:
        state = replace(state, wanted=None, wanted_ticks=0)
        return replace(state, counts=_count(state, decisions)), decisions
    ticks = state.wanted_ticks + 1 if state.wanted is not None else 1
    state = replace(state, wanted=target, wanted_ticks=ticks)
    why = None
    if moving:
        why = f"waiting for {len(moving)} move(s) to finish"
    elif any(w.draining for w in obs.workers):
        why = "a worker is draining"
    elif ticks < cfg.confirm_ticks:
        why = f"target {target} wanted {ticks}/{cfg.confirm_ticks} ticks"
    elif state.last_change_at is not None and now - state.last_change_at < cfg.cooldown_s:
        why = f"cooldown: {now - state.last_change_at:.0f}/{cfg.cooldown_s:.0f} s since last change"
    if why is not None:
        decisions.append(Decision("hold", why, inp))
        return replace(state, counts=_count(state, decisions)), decisions
    changes = _changes(obs, target, {m[0] for m in moving}, inp)
    decisions += changes
    if changes:
        state = replace(
            state,
            last_change_at=now,
            wanted=None,
            wanted_ticks=0,
            moving=moving + tuple((d.worker_id, d.to_role, now) for d in changes
                                  if d.kind == "move" and d.to_role is not None),
        )  # fmt: skip
    return replace(state, counts=_count(state, decisions)), decisions
