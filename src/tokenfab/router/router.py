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

Scoring at fleet scale. A worker holding nothing of the prompt (no G1 match, pending or cached,
no lower-tier blocks) costs overlap_weight * (prompt + queued prefill) + active + own blocks:
among such workers the order depends on their load alone. So the router keeps every worker in a
list sorted by that load (updated when a load changes) and, at temperature 0, scores only the
workers holding part of the prompt plus the least loaded others up to the best cost (and those
within rounding of it, for the ties): the same decision and random draws as scoring every worker
(`scoring.choose`), at a cost that does not grow with the fleet. `full_scores` (or a temperature
> 0, whose softmax needs every cost) scores every worker.
"""

from __future__ import annotations

import bisect
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    sample_index,
    tied_best,
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
        self._reorder(view)

    def remove_worker(self, worker_id: str) -> None:
        """Forget the worker at once: its index entries, load and pending requests."""
        view = self._workers.pop(worker_id, None)
        self._removed.add(worker_id)
        self._index.remove_worker(worker_id)
        if view is None:
            return
        del self._names[bisect.bisect_left(self._names, worker_id)]
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
        cached = self._index.find_matches(hashes)
        matched = self._index.find_matches(hashes, self._overlay) if self._overlay else cached

        scores: tuple[WorkerScore, ...] = ()
        policy = self.config.policy
        if policy == "kv":
            lower = self._index.find_lower_matches(hashes, matched, TIER_COST)
            if self.config.full_scores or self.config.temperature > 0:
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
            else:
                allowed = None if candidates is None else set(names)
                worker = self._choose_kv(
                    allowed, matched, cached, lower, num_prompt_tokens, block_size
                )
        elif policy == "round_robin":
            worker = names[self._round_robin % len(names)]
            self._round_robin += 1
        elif policy == "random":
            worker = self._rng.choice(names)
        else:
            worker = self._least_loaded(names)

        overlap = matched.get(worker, 0)
        self._add_pending(request_id, worker, hashes, overlap, num_prompt_tokens, block_size)
        self._decisions[worker] = self._decisions.get(worker, 0) + 1
        self._predicted_hit_blocks += overlap
        self._routed_prompt_blocks += len(hashes)
        return RouteDecision(
            request_id=request_id,
            worker_id=worker,
            policy=policy,
            overlap_blocks=overlap,
            cached_blocks=cached.get(worker, 0),
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
        matched: dict[str, int],
        cached: dict[str, int],
        lower: dict[str, tuple[int, float]],
        num_prompt_tokens: int,
        block_size: int,
    ) -> str:
        """`scoring.choose` at temperature 0 over the candidates (`allowed`; None: every
        worker), scoring only those that can win.

        A worker's cost is first estimated from its `_LoadKey` (the same terms summed in
        another order, so equal up to rounding): for each worker holding part of the prompt,
        then for the others least loaded first until the estimate passes the best one by a
        margin. The margin (1e-6 relative) is far wider than `choose`'s tie tolerance (1e-9)
        plus the rounding, so the workers within it include every one tied with the best; they
        get `scoring`'s exact cost and tie rules, and the random draw among the tied (in worker
        id order) is `choose`'s."""
        weight = self.config.overlap_weight
        n = num_prompt_tokens
        own = -(-n // block_size)
        workers = self._workers
        held = matched.keys() | lower.keys() if lower else matched.keys()
        # (estimated cost, workers sharing it, matched, cached, lower-tier match)
        near: list[tuple[float, list[str], int, int, tuple[int, float] | None]] = []
        best = float("inf")
        for w in held:
            if allowed is not None and w not in allowed:
                continue
            m, c = matched.get(w, 0), cached.get(w, 0)
            lo = lower.get(w) if lower else None
            if m == c and lo is None:
                key = workers[w].order
                assert key is not None
                cost = weight * (max(0, n - m * block_size) / block_size) + key[0] + max(0, own - m)
            else:  # pending or lower-tier blocks: the exact cost (rare)
                load = self._load(w, m, c, lo or (0, 0.0))
                prefill = prefill_blocks(load, n, block_size)
                cost = weight * prefill + decode_blocks(load, n, block_size)
            near.append((cost, [w], m, c, lo))
            best = min(best, cost)
        # The others, least loaded first, a run of equal loads at a time (they cost the same;
        # idle workers: often hundreds).
        by_load = self._by_load
        base = weight * (n / block_size) + own
        i = 0
        while i < len(by_load):
            key = by_load[i]
            cost = base + key[0]
            if cost > best + 1e-6 * max(best, 1.0):
                break  # every later worker costs at least this (up to rounding)
            end = bisect.bisect_left(by_load, (key[0], key[1], key[2] + 1), i + 1)
            run = [
                k[3]
                for k in by_load[i:end]
                if k[3] not in held and (allowed is None or k[3] in allowed)
            ]
            i = end
            if run:
                near.append((cost, run, 0, 0, None))
                best = min(best, cost)
        limit = best + 1e-6 * max(best, 1.0)
        # Exact costs (scoring's formulas) of the workers near the best, once per run.
        costs: list[float] = []
        load_keys: list[tuple[int, int]] = []
        runs: list[list[str]] = []
        for cost, run, m, c, lo in near:
            if cost > limit:
                continue
            load = self._load(run[0], m, c, lo or (0, 0.0))
            prefill = prefill_blocks(load, n, block_size)
            costs.append(weight * prefill + decode_blocks(load, n, block_size))
            load_keys.append((load.num_requests, load.active_blocks))
            runs.append(run)
        tied = sorted(w for i in tied_best(costs, load_keys) for w in runs[i])
        if len(tied) == 1:
            return tied[0]
        return tied[sample_index([1.0 / len(tied)] * len(tied), self._rng)]

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
        block_size = view.info.block_size
        for h in hashes:
            request_id = owned.pop(h, None)
            if request_id is None:
                continue
            self._clear_overlay(h, keep)
            rec = self._pending.get(request_id)
            if rec is not None:
                done = min(block_size, rec.prefill_tokens)
                rec.prefill_tokens -= done
                view.pending_prefill_tokens -= done
                rec.unconfirmed -= 1
                self._forget_if_done(rec)
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
