"""The KV-aware router: a small state machine the frontend (or the digital twin) drives.

Inputs: workers joining and leaving, their KV event batches and snapshots, their load reports,
and request milestones (first token, finished). Output: for each request, the worker to send it
to. No I/O, no wall clock (a `Clock` is injected), no asyncio; all randomness comes from one
`random.Random(config.seed)`, so two routers fed the same inputs make the same decisions.

Pending routes. Between routing a request and seeing its effect (KV events for the blocks it
computed, load reports counting it) the router would be blind to its own decisions, and a burst
of one new prefix would scatter over every worker. So a routed request is *pending* on its
worker: its new blocks' hashes count as present there (for later routes' overlap), its
uncached prompt tokens as queued prefill, its new blocks as active. They go away:
- hashes: when that worker's KV events store them, or at `pending_ttl_s` (aborted requests);
- prefill tokens: a block's worth as each hash is stored (computed), all at the first token,
  or once the worker's reports must include the request;
- active blocks: when the request finishes, or once the worker's reports must include it.
"The worker's reports must include it" = a second load report from that worker arrived after the
route: the first may have been sent before the request got there, the second cannot have been
(reports are periodic), so counting it further would count it twice.

Scoring at fleet scale. Workers matching a prompt equally deep (d leading blocks, none of them
pending there, no lower-tier blocks) differ in cost only by their load: cost = g(d) + the
worker's load term (overlap_weight * queued prefill blocks + active blocks), g falling with d.
So the router keeps every worker in a list sorted by that load (updated when a load changes),
takes the index's match as rows (depth, mask of workers) rather than per worker, and, at
temperature 0, estimates only: the members of small depth classes, the least loaded members of
big ones (found walking the sorted list), and workers with pending blocks of the prompt. Those
near the best get `scoring`'s exact cost and tie rules: the same decision and random draws as
scoring every worker (`scoring.choose`), at a cost that grows with the number of distinct match
depths, not of workers. `full_scores`, a temperature > 0 (its softmax needs every cost) and lower
tiers (`find_lower_matches` is per worker) score every worker.
"""

from __future__ import annotations

import bisect
import functools
import operator
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Literal

from tokenfab.clock import Clock
from tokenfab.protocol import BlockStored, KVEventBatch, KVSnapshot, LoadReport, WorkerInfo
from tokenfab.router.index import FIRST_EVENT_ID, KVIndex
from tokenfab.router.scoring import (
    TIER_COST,
    WorkerLoad,
    WorkerScore,
    choose,
    decode_blocks,
    prefill_blocks,
    tied_best,
    uniform_index,
)

Policy = Literal["kv", "round_robin", "random", "least_loaded"]
POLICIES: tuple[Policy, ...] = ("kv", "round_robin", "random", "least_loaded")


class NoWorkerError(RuntimeError):
    """No registered worker can take the request."""


@dataclass(frozen=True, slots=True)
class RouterConfig:
    policy: Policy = "kv"
    overlap_weight: float = 1.0
    """Weight of prefill blocks against decode blocks in the kv cost (higher: chase hits)."""
    temperature: float = 0.0
    """0: lowest cost wins; > 0: softmax sampling over normalized costs."""
    seed: int = 0
    pending_ttl_s: float = 30.0
    """Backstop: a routed request stops counting as pending on its worker after this long."""
    block_size: int | None = None
    """Tokens per KV block; None: taken from the workers' WorkerInfo (which must agree)."""
    first_event_id: int = FIRST_EVENT_ID
    """Id of a worker's first KV event (a new worker starting later needs a snapshot)."""
    full_scores: bool = False
    """kv policy: score every candidate on every route and return the scores in
    `RouteDecision.scores` (for logging and tests; costs O(workers) per route). Off: only the
    workers that can win are scored (same decisions) and `scores` is empty."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not self.overlap_weight >= 0:
            raise ValueError(f"overlap_weight must be >= 0, got {self.overlap_weight}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not self.pending_ttl_s > 0:
            raise ValueError(f"pending_ttl_s must be positive, got {self.pending_ttl_s}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


@dataclass(frozen=True, slots=True)
class RouteDecision:
    request_id: str
    worker_id: str
    policy: Policy
    overlap_blocks: int
    """Leading prompt blocks cached on the worker or pending there."""
    cached_blocks: int
    """Of those, confirmed by the worker's KV events."""
    predicted_hit_tokens: int
    """Prompt tokens the worker should find cached (the engine always computes the last one)."""
    scores: tuple[WorkerScore, ...] = ()
    """Every candidate's cost and probability, sorted by worker id (kv policy with
    `RouterConfig.full_scores`, or a temperature > 0; else empty)."""


@dataclass(frozen=True, slots=True)
class RouterStats:
    """Plain counters and gauges for /metrics (totals only grow)."""

    decisions: dict[str, int]
    """Requests routed per worker (total)."""
    predicted_hit_blocks: int
    """Sum over decisions of the chosen worker's overlap (total)."""
    routed_prompt_blocks: int
    """Sum over decisions of the prompts' full blocks (total): the hit rate's denominator."""
    index_blocks: int
    """Distinct block hashes in the index (gauge)."""
    index_blocks_per_worker: dict[str, int]
    events_applied: int
    duplicate_events: int
    resyncs: int
    """Times a worker was found to need a snapshot (total)."""
    snapshots_loaded: int
    pending_requests: int
    """Routed requests still tracked as pending (gauge)."""
    pending_expired: int
    """Pending requests dropped by the TTL backstop (total)."""


@dataclass(slots=True)
class _Pending:
    request_id: str
    worker_id: str
    routed_at: float
    report_seq: int
    """The worker's report count when routed (see the module docstring)."""
    hashes: list[int]
    """Block hashes this request made pending on its worker."""
    unconfirmed: int
    prefill_tokens: int
    """Counted in the worker's pending prefill until released (then 0)."""
    active_blocks: int
    """Counted in the worker's pending active blocks until released (then 0)."""
    load_released: bool = False


@dataclass(slots=True)
class _WorkerView:
    worker_id: str
    info: WorkerInfo
    bit: int
    report: LoadReport = field(default_factory=LoadReport)
    reports: int = 0
    announced_event_id: int | None = None
    """`last_event_id` of the previous load report: the index must have reached it by now."""
    pending_prefill_tokens: int = 0
    pending_active_blocks: int = 0
    pending_requests: int = 0
    pending_hashes: dict[int, str] = field(default_factory=dict)
    """Pending block hash -> the request that made it pending."""
    unreported: OrderedDict[str, None] = field(default_factory=OrderedDict)
    """Requests whose load still counts as pending, in route order."""
    order: _LoadKey | None = None
    """This worker's entry in the router's load-sorted list (None: not in it)."""


_SMALL_CLASS = 16
"""Workers matching a prompt equally deep, at most this many: estimated one by one."""


def _depth(rows: list[tuple[int, int]], bit: int) -> int:
    """The match depth of the worker with this bit, from `KVIndex.match_rows`."""
    for d, mask in rows:
        if mask & bit:
            return d
    return 0


_LoadKey = tuple[float, int, int, str]
"""(overlap_weight * queued prefill blocks + active blocks, requests, active blocks, worker id):
a worker's place among those that hold nothing of a prompt (see the module docstring)."""


class Router:
    def __init__(self, config: RouterConfig, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        self._rng = random.Random(config.seed)
        self._index = KVIndex(first_event_id=config.first_event_id)
        self._workers: dict[str, _WorkerView] = {}
        self._removed: set[str] = set()
        """Workers that left: their late events and reports are ignored until they rejoin."""
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        """In route order, so the TTL backstop only looks at the front."""
        self._overlay: dict[int, int] = {}
        """Pending block hash -> mask of the workers it is pending on (the index's bits)."""
        self._by_load: list[_LoadKey] = []
        """Every worker's `_LoadKey`, sorted: the least loaded first."""
        self._names: list[str] = []
        """Worker ids, sorted."""
        self._all_bits = 0
        """Every worker's index bit."""
        self._round_robin = 0
        self._decisions: dict[str, int] = {}
        self._predicted_hit_blocks = 0
        self._routed_prompt_blocks = 0
        self._pending_expired = 0

    # ------------------------------------------------------------------ workers

    @property
    def index(self) -> KVIndex:
        return self._index

    @property
    def block_size(self) -> int | None:
        """Tokens per block the request hashes must use (None until known)."""
        if self.config.block_size is not None:
            return self.config.block_size
        for view in self._workers.values():
            return view.info.block_size
        return None

    def workers(self) -> list[str]:
        return list(self._names)

    def add_worker(self, worker_id: str, info: WorkerInfo) -> None:
        """Register (or update) a worker. Raises ValueError if its block size differs from the
        router's: its block hashes could never match a request's."""
        expected = self.block_size
        if expected is not None and info.block_size != expected:
            raise ValueError(
                f"worker {worker_id} has block_size {info.block_size}, the router uses {expected}"
            )
        self._removed.discard(worker_id)
        view = self._workers.get(worker_id)
        if view is not None:
            view.info = info
            self._reorder(view)
            return
        view = _WorkerView(worker_id, info=info, bit=self._index.worker_bit(worker_id))
        self._workers[worker_id] = view
        bisect.insort(self._names, worker_id)
        self._all_bits |= view.bit
        self._reorder(view)

    def remove_worker(self, worker_id: str) -> None:
        """Forget the worker at once: its index entries, load and pending requests."""
        view = self._workers.pop(worker_id, None)
        self._removed.add(worker_id)
        self._index.remove_worker(worker_id)
        if view is None:
            return
        del self._names[bisect.bisect_left(self._names, worker_id)]
        self._all_bits &= ~view.bit
        if view.order is not None:
            del self._by_load[bisect.bisect_left(self._by_load, view.order)]
            view.order = None
        for rec in [r for r in self._pending.values() if r.worker_id == worker_id]:
            del self._pending[rec.request_id]
        keep = ~view.bit
        for h in view.pending_hashes:
            self._clear_overlay(h, keep)

    # ------------------------------------------------------------------ worker state

    def on_kv_events(self, batch: KVEventBatch) -> bool:
        """Apply a worker's KV events. False: the worker needs a resync (send it a
        SnapshotRequest and pass the answer to `on_snapshot`)."""
        if batch.worker_id in self._removed:
            return True
        ok = self._index.apply(batch)
        view = self._workers.get(batch.worker_id)
        if view is not None and view.pending_hashes:
            for event in batch.events:
                if type(event) is BlockStored:
                    self._confirm(view, event.block_hashes)
        return ok

    def on_snapshot(self, snap: KVSnapshot) -> bool:
        """Load a worker's snapshot. True: the worker is in sync again."""
        if snap.worker_id in self._removed:
            return True
        ok = self._index.load_snapshot(snap)
        view = self._workers.get(snap.worker_id)
        if view is not None and view.pending_hashes:
            self._confirm(view, snap.block_hashes)
        return ok

    def on_load(self, report: LoadReport) -> None:
        """Take a worker's load report. If the previous report announced KV events the index
        still has not seen, they were lost: the worker is marked as needing a resync."""
        self.expire_pending()
        view = self._workers.get(report.worker_id)
        if view is None:
            return
        announced = view.announced_event_id
        if announced is not None and self._index.last_event_id(report.worker_id) < announced:
            self._index.mark_resync(report.worker_id)
        view.announced_event_id = report.last_event_id
        view.report = report
        view.reports += 1
        while view.unreported:
            rec = self._pending[next(iter(view.unreported))]
            if rec.report_seq > view.reports - 2:
                break
            self._release_load(rec)
            self._forget_if_done(rec)
        self._reorder(view)

    def workers_needing_resync(self) -> list[str]:
        return [w for w in self._index.workers_needing_resync() if w in self._workers]

    # ------------------------------------------------------------------ requests

    def on_first_token(self, request_id: str) -> None:
        """The request's prefill is done: its prompt no longer counts as queued prefill."""
        rec = self._pending.get(request_id)
        if rec is not None:
            self._release_prefill(rec)

    def on_request_finished(self, request_id: str) -> None:
        """The request ended (any reason): its load stops counting. Its block hashes stay
        pending until the worker's events confirm them or the TTL passes."""
        rec = self._pending.get(request_id)
        if rec is not None:
            self._release_load(rec)
            self._forget_if_done(rec)

    def route(
        self,
        request_id: str,
        hashes: Sequence[int],
        num_prompt_tokens: int,
        candidates: Sequence[str] | None = None,
    ) -> RouteDecision:
        """Choose a worker for a request whose prompt has these block hashes (computed with
        `block_size` and the request's extra keys). Routing a request id again (a retry)
        replaces its previous pending state. Raises NoWorkerError if no candidate is known."""
        self.expire_pending()
        old = self._pending.pop(request_id, None)
        if old is not None:
            self._drop(old)
        names = self._candidates(candidates)
        block_size = self.block_size
        assert block_size is not None  # there is a worker, so its info gave one
        if len(hashes) * block_size > num_prompt_tokens:
            raise ValueError(
                f"{len(hashes)} block hashes cover more than the prompt's {num_prompt_tokens} "
                f"tokens: were they computed with block_size {block_size}?"
            )
        scores: tuple[WorkerScore, ...] = ()
        policy = self.config.policy
        index = self._index
        if policy == "kv" and not (
            self.config.full_scores or self.config.temperature > 0 or index.has_lower_tiers
        ):
            allowed = None if candidates is None else set(names)
            worker, overlap, cached_blocks = self._choose_kv(
                allowed, hashes, num_prompt_tokens, block_size
            )
        else:
            cached = index.find_matches(hashes)
            matched = index.find_matches(hashes, self._overlay) if self._overlay else cached
            if policy == "kv":
                lower = index.find_lower_matches(hashes, matched, TIER_COST)
                loads = [
                    self._load(w, matched.get(w, 0), cached.get(w, 0), lower.get(w, (0, 0.0)))
                    for w in names
                ]
                decision = choose(
                    loads,
                    num_prompt_tokens,
                    block_size,
                    self._rng,
                    self.config.overlap_weight,
                    self.config.temperature,
                )
                worker, scores = decision.worker_id, decision.scores
            elif policy == "round_robin":
                worker = names[self._round_robin % len(names)]
                self._round_robin += 1
            elif policy == "random":
                worker = self._rng.choice(names)
            else:
                worker = self._least_loaded(names)
            overlap, cached_blocks = matched.get(worker, 0), cached.get(worker, 0)

        self._add_pending(request_id, worker, hashes, overlap, num_prompt_tokens, block_size)
        self._decisions[worker] = self._decisions.get(worker, 0) + 1
        self._predicted_hit_blocks += overlap
        self._routed_prompt_blocks += len(hashes)
        return RouteDecision(
            request_id=request_id,
            worker_id=worker,
            policy=policy,
            overlap_blocks=overlap,
            cached_blocks=cached_blocks,
            predicted_hit_tokens=max(0, min(overlap * block_size, num_prompt_tokens - 1)),
            scores=scores,
        )

    def expire_pending(self) -> None:
        """Drop pending requests older than the TTL (route calls this; so may a timer)."""
        deadline = self._clock.now() - self.config.pending_ttl_s
        while self._pending:
            rec = next(iter(self._pending.values()))
            if rec.routed_at > deadline:
                break
            del self._pending[rec.request_id]
            self._drop(rec)
            self._pending_expired += 1

    def stats(self) -> RouterStats:
        index = self._index
        return RouterStats(
            decisions=dict(sorted(self._decisions.items())),
            predicted_hit_blocks=self._predicted_hit_blocks,
            routed_prompt_blocks=self._routed_prompt_blocks,
            index_blocks=index.num_blocks,
            index_blocks_per_worker=index.block_counts(),
            events_applied=index.events_applied,
            duplicate_events=index.duplicate_events,
            resyncs=index.gaps,
            snapshots_loaded=index.snapshots_loaded,
            pending_requests=len(self._pending),
            pending_expired=self._pending_expired,
        )

    # ------------------------------------------------------------------ policies

    def _candidates(self, candidates: Sequence[str] | None) -> list[str]:
        if candidates is None:
            names = self._names
        else:
            names = sorted({w for w in candidates if w in self._workers})
        if not names:
            if candidates is None:
                raise NoWorkerError("no worker is registered with the router")
            raise NoWorkerError(
                f"none of the candidate workers {sorted(candidates)} is registered with the router"
            )
        return names

    def worker_load(self, worker_id: str) -> WorkerLoad:
        """What the router counts as the worker's load now (last report plus pending routes),
        for metrics and debugging. Raises KeyError for an unknown worker."""
        return self._load(worker_id, 0, 0)

    def _load(
        self, worker_id: str, matched: int, cached: int, lower: tuple[int, float] = (0, 0.0)
    ) -> WorkerLoad:
        view = self._workers[worker_id]
        report = view.report
        return WorkerLoad(
            worker_id=worker_id,
            overlap_blocks=matched,
            pending_overlap_blocks=matched - cached,
            queued_prefill_tokens=report.queued_prefill_tokens + view.pending_prefill_tokens,
            active_blocks=report.kv_blocks_used + view.pending_active_blocks,
            num_requests=report.running + report.waiting + view.pending_requests,
            lower_overlap_blocks=lower[0],
            lower_overlap_cost=lower[1],
        )

    def _choose_kv(
        self,
        allowed: set[str] | None,
        hashes: Sequence[int],
        num_prompt_tokens: int,
        block_size: int,
    ) -> tuple[str, int, int]:
        """`scoring.choose` at temperature 0 without lower tiers, over the candidates
        (`allowed`; None: every worker), scoring only the workers that can win. Returns the
        worker, its overlap (cached or pending) and its cached blocks.

        The index's match comes as rows (depth, mask of the workers matching that deep). A
        worker matching d blocks, none of them pending, costs about `g(d) + _LoadKey[0]` (the
        same terms as `scoring`'s summed in another order, so equal up to rounding). Per depth
        class: a small one's members are estimated one by one; big ones' least loaded members
        are found walking the load-sorted list (runs of equal loads at once: idle workers,
        often hundreds) until no big class could come within a margin of the best estimate.
        Workers with pending blocks of the prompt (few) are scored exactly, apart. The margin
        (1e-6 relative) is far wider than `choose`'s tie tolerance (1e-9) plus the rounding, so
        the workers within it include every one tied with the best. Those get `scoring`'s
        exact cost and tie rules, and the random draw among the tied (in worker id order) is
        `choose`'s."""
        index = self._index
        weight = self.config.overlap_weight
        n = num_prompt_tokens
        own = -(-n // block_size)
        rows = index.match_rows(hashes)
        # Workers with a block of the prompt pending: their match counts it (a second walk).
        overlay = self._overlay
        pending_mask = 0
        if overlay and not overlay.keys().isdisjoint(hashes):
            pending_mask = functools.reduce(operator.or_, map(overlay.get, hashes, repeat(0)))
        rows_pending = index.match_rows(hashes, overlay) if pending_mask else rows

        def g(d: int) -> float:
            """The prompt's terms of the cost at match depth d (d <= its full blocks)."""
            return weight * ((n - d * block_size) / block_size) + (own - d)

        # (estimated cost, workers sharing it, matched, cached)
        near: list[tuple[float, list[str], int, int]] = []
        best = float("inf")
        workers = self._workers
        special: set[str] = set()
        """Workers with a pending block of the prompt: scored exactly, apart."""
        for w in index.workers_of(pending_mask):
            if w not in workers or (allowed is not None and w not in allowed):
                continue
            special.add(w)
            bit = workers[w].bit
            m, c = _depth(rows_pending, bit), _depth(rows, bit)
            load = self._load(w, m, c)
            cost = weight * prefill_blocks(load, n, block_size) + decode_blocks(load, n, block_size)
            near.append((cost, [w], m, c))
            best = min(best, cost)
        # The others by match depth: one class per row, and depth 0 (matching nothing). A
        # small class's workers are estimated one by one; the big ones' are found by walking
        # the load order, where a big class's least loaded member comes soon.
        live = self._all_bits
        union = 0
        classes: list[tuple[int, int]] = []
        for d, mask in rows:
            union |= mask
            classes.append((d, mask & live))
        classes.append((0, live & ~union))
        big: list[tuple[int, int]] = []
        skip = set(special)
        small: list[tuple[float, int, dict[str, float]]] = []
        for d, mask in classes:
            if mask.bit_count() > _SMALL_CLASS:
                big.append((d, mask))
                continue
            members = index.workers_of(mask)
            skip |= members
            members -= special
            if allowed is not None:
                members &= allowed
            if members:
                # Their estimates, kept apart until the best is known (most are far off).
                estimates = {w: workers[w].order[0] for w in members}  # type: ignore[index]
                gd = g(d)
                small.append((gd, d, estimates))
                best = min(best, gd + min(estimates.values()))
        by_load = self._by_load
        floor = min((g(d) for d, _ in big), default=0.0)
        """The lowest g of a big class's worker."""
        i = 0
        total = len(by_load) if big else 0
        while i < total:
            key = by_load[i]
            if floor + key[0] > best + 1e-6 * max(best, 1.0):
                break  # no later worker can come within the margin
            end = i + 1
            if end < total and by_load[end][:3] == key[:3]:
                # A run of equal loads (idle workers: often hundreds), at once.
                end = bisect.bisect_left(by_load, (key[0], key[1], key[2] + 1), end)
            names = [k[3] for k in by_load[i:end] if k[3] not in skip]
            i = end
            if allowed is not None:
                names = [w for w in names if w in allowed]
            if not names:
                continue
            if len(big) == 1:
                runs = {big[0][0]: names}
            else:
                runs = {}
                for w in names:
                    bit = workers[w].bit
                    d = next(d for d, mask in big if mask & bit)
                    if d in runs:
                        runs[d].append(w)
                    else:
                        runs[d] = [w]
            for d, run in runs.items():
                cost = g(d) + key[0]
                near.append((cost, run, d, d))
                best = min(best, cost)
        limit = best + 1e-6 * max(best, 1.0)
        for gd, d, estimates in small:
            for w, load_key in estimates.items():
                if gd + load_key <= limit:
                    near.append((gd + load_key, [w], d, d))
        # Exact costs (scoring's formulas) of the workers near the best, once per run.
        costs: list[float] = []
        load_keys: list[tuple[int, int]] = []
        picks: list[tuple[list[str], int, int]] = []
        for cost, run, m, c in near:
            if cost > limit:
                continue
            load = self._load(run[0], m, c)
            prefill = prefill_blocks(load, n, block_size)
            costs.append(weight * prefill + decode_blocks(load, n, block_size))
            load_keys.append((load.num_requests, load.active_blocks))
            picks.append((run, m, c))
        tied = tied_best(costs, load_keys)
        if len(tied) == 1 and len(picks[tied[0]][0]) == 1:
            run, m, c = picks[tied[0]]
            return run[0], m, c
        names = sorted((w, m, c) for i in tied for w in picks[i][0] for m, c in [picks[i][1:]])
        return names[uniform_index(len(names), self._rng)]

    def _reorder(self, view: _WorkerView) -> None:
        """Move the worker to its place in `_by_load` after its load changed."""
        report = view.report
        active = report.kv_blocks_used + view.pending_active_blocks
        queued = report.queued_prefill_tokens + view.pending_prefill_tokens
        key = (
            self.config.overlap_weight * (queued / view.info.block_size) + active,
            report.running + report.waiting + view.pending_requests,
            active,
            view.worker_id,
        )
        old = view.order
        if key == old:
            return
        by_load = self._by_load
        if old is not None:
            del by_load[bisect.bisect_left(by_load, old)]
        bisect.insort(by_load, key)
        view.order = key

    def _least_loaded(self, names: list[str]) -> str:
        def key(worker_id: str) -> tuple[int, int]:
            load = self._load(worker_id, 0, 0)
            return load.num_requests, load.active_blocks

        best = min(key(w) for w in names)
        tied = [w for w in names if key(w) == best]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)

    # ------------------------------------------------------------------ pending state

    def _add_pending(
        self,
        request_id: str,
        worker_id: str,
        hashes: Sequence[int],
        overlap: int,
        num_prompt_tokens: int,
        block_size: int,
    ) -> None:
        view = self._workers[worker_id]
        owned = view.pending_hashes
        bit = view.bit
        overlay = self._overlay
        new_hashes = [h for h in hashes[overlap:] if h not in owned]
        for h in new_hashes:
            owned[h] = request_id
            overlay[h] = overlay.get(h, 0) | bit
        prompt_blocks = -(-num_prompt_tokens // block_size)
        rec = _Pending(
            request_id=request_id,
            worker_id=worker_id,
            routed_at=self._clock.now(),
            report_seq=view.reports,
            hashes=new_hashes,
            unconfirmed=len(new_hashes),
            prefill_tokens=max(0, num_prompt_tokens - overlap * block_size),
            active_blocks=max(0, prompt_blocks - overlap),
        )
        self._pending[request_id] = rec
        view.pending_prefill_tokens += rec.prefill_tokens
        view.pending_active_blocks += rec.active_blocks
        view.pending_requests += 1
        view.unreported[request_id] = None
        self._reorder(view)

    def _confirm(self, view: _WorkerView, hashes: Sequence[int]) -> None:
        """The worker now caches these blocks: they stop being pending there, and, being
        computed, stop counting as queued prefill."""
        owned = view.pending_hashes
        keep = ~view.bit
        overlay = self._overlay
        confirmed: dict[str, int] = {}
        """Request -> its blocks confirmed here (an event's blocks: mostly one request's)."""
        for h in hashes:
            request_id = owned.pop(h, None)
            if request_id is None:
                continue
            mask = overlay.get(h, 0) & keep
            if mask:
                overlay[h] = mask
            else:
                overlay.pop(h, None)
            confirmed[request_id] = confirmed.get(request_id, 0) + 1
        block_size = view.info.block_size
        for request_id, blocks in confirmed.items():
            rec = self._pending.get(request_id)
            if rec is not None:
                # A block's worth of prompt per block computed (as one block at a time would).
                done = min(blocks * block_size, rec.prefill_tokens)
                rec.prefill_tokens -= done
                view.pending_prefill_tokens -= done
                rec.unconfirmed -= blocks
                self._forget_if_done(rec)
        if confirmed:
            self._reorder(view)

    def _clear_overlay(self, block_hash: int, keep: int) -> None:
        mask = self._overlay.get(block_hash, 0) & keep
        if mask:
            self._overlay[block_hash] = mask
        else:
            self._overlay.pop(block_hash, None)

    def _release_prefill(self, rec: _Pending) -> None:
        view = self._workers[rec.worker_id]
        view.pending_prefill_tokens -= rec.prefill_tokens
        rec.prefill_tokens = 0
        self._reorder(view)

    def _release_load(self, rec: _Pending) -> None:
        if rec.load_released:
            return
        self._release_prefill(rec)
        view = self._workers[rec.worker_id]
        view.pending_active_blocks -= rec.active_blocks
        rec.active_blocks = 0
        view.pending_requests -= 1
        view.unreported.pop(rec.request_id, None)
        rec.load_released = True
        self._reorder(view)

    def _forget_if_done(self, rec: _Pending) -> None:
        if rec.load_released and rec.unconfirmed <= 0:
            self._pending.pop(rec.request_id, None)

    def _drop(self, rec: _Pending) -> None:
        """Undo everything a (no longer tracked) pending request still counts."""
        self._release_load(rec)
        view = self._workers[rec.worker_id]
        owned = view.pending_hashes
        keep = ~view.bit
        for h in rec.hashes:
            if owned.get(h) == rec.request_id:
                del owned[h]
                self._clear_overlay(h, keep)
        rec.unconfirmed = 0
