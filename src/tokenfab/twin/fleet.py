"""The fleet model: count-based workers advanced event by event, for fleets too large to run a
real `EngineCore` per worker.

Each worker keeps counts instead of objects: per request its prompt / computed / generated
tokens and the blocks it holds; its KV cache as a block budget plus an LRU of cached prompt
block hashes (reference-counted while requests use them, evictable at refcount 0). The rules
are the engine's (engine/core/scheduler.py, kv_cache.py):

- a step schedules running decodes first (one token each), then unfinished prefills, oldest
  first, within `max_num_batched_tokens`; then admits waiting requests in order (none after a
  preemption in the step, at most `max_num_seqs` running), each reusing its longest cached
  prompt prefix (leaving one token to compute) and chunking its prefill to the budget;
- a request that cannot grow preempts the newest running request (recompute: it goes back to
  the front of the queue with nothing computed);
- full prompt blocks enter the prefix cache when computed (BlockStored), evicted LRU when a
  new block is needed (BlockRemoved); these events reach the real `Router` after each step,
  with a load report, as a worker's do.

Between batch changes nothing needs simulating: while a worker's batch is only decoding (nothing
waiting) the next change is the first request to finish (or the KV budget running out), so the
k steps up to it are applied at once, their times a closed-form series (`DecodeRun`). An
arrival for that worker cuts the run at the step in progress, as in `Simulator`.

Token ids are not kept: a request's blocks are its prompt's block hashes, then, for blocks
holding generated tokens, hashes unique to the request (the engine's are chained hashes of
synthetic sampled tokens: they match nothing else either, but a preempted request's recompute
finds them cached, as in the engine).

Results are streamed: TTFT, ITL and latency go into log-spaced histograms (`LogHistogram`), so
an hour of a 1,000-worker fleet keeps no per-token or per-request lists.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from tokenfab.bench.workload import RequestSpec
from tokenfab.clock import ManualClock
from tokenfab.kv.hashing import block_hashes
from tokenfab.protocol import (
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    LoadReport,
    WorkerInfo,
)
from tokenfab.router import RouteDecision, Router
from tokenfab.twin.fast_decode import DecodeRun
from tokenfab.twin.report import TwinSummary
from tokenfab.twin.sim import SimConfig
from tokenfab.twin.step_time import LinearStepTime


class LogHistogram:
    """Counts in log-spaced bins (`resolution` relative width): percentiles within that error,
    in memory bounded by the value range, not the sample count."""

    def __init__(self, resolution: float = 0.005, floor: float = 1e-6) -> None:
        self._log = math.log1p(resolution)
        self._floor = floor
        self._counts: dict[int, int] = {}
        self.count = 0
        self.total = 0.0

    def add(self, value: float, weight: int = 1) -> None:
        b = int(math.log(max(value, self._floor) / self._floor) / self._log)
        self._counts[b] = self._counts.get(b, 0) + weight
        self.count += weight
        self.total += value * weight

    def percentile(self, q: float) -> float:
        if not self.count:
            return 0.0
        rank = q / 100 * (self.count - 1)
        seen = 0
        for b in sorted(self._counts):
            seen += self._counts[b]
            if seen > rank:
                return self._floor * math.exp((b + 0.5) * self._log)
        return 0.0


@dataclass(frozen=True, slots=True)
class FleetRequest:
    """A request as the fleet needs it: its prompt's block hashes, not its tokens."""

    index: int
    arrival: float
    prompt_tokens: int
    hashes: Sequence[int]
    max_tokens: int

    @classmethod
    def from_spec(cls, spec: RequestSpec, block_size: int) -> FleetRequest:
        return cls(
            spec.index,
            spec.arrival or 0.0,
            len(spec.prompt),
            block_hashes(spec.prompt, block_size),
            spec.max_tokens,
        )


@dataclass(slots=True, eq=False)  # identity: the worker's lists find requests by `is`
class _Req:
    rid: str
    spec: FleetRequest
    computed: int = 0
    generated: int = 0
    private: int = 0
    """Blocks held that are not in the prefix cache."""
    refs: list[int] = field(default_factory=list)
    """Cached block hashes this request holds a reference on, in block order."""
    hashed: int = 0
    """Blocks (from the first) already offered to the prefix cache, as the engine's
    `num_hashed`: a block computed by another request meanwhile stays private."""
    first: float | None = None
    last: float = 0.0

    @property
    def tokens(self) -> int:
        return self.spec.prompt_tokens + self.generated

    @property
    def remaining(self) -> int:
        return self.spec.max_tokens - self.generated

    def block_hash(self, i: int) -> int:
        """The i-th block's hash: the prompt's, then (blocks holding generated tokens) one
        unique to this request, as the engine's chained hashes of its sampled tokens are."""
        hashes = self.spec.hashes
        if i < len(hashes):
            return hashes[i]
        return hash((self.spec.index, i, 0x7F17)) & 0x7FFF_FFFF_FFFF_FFFF


class FleetWorker:
    """One engine as counts (see the module docstring)."""

    def __init__(self, worker_id: str, config: SimConfig, step_time: LinearStepTime) -> None:
        self.worker_id = worker_id
        self.capacity = config.num_kv_blocks
        self.bs = config.block_size
        self.max_seqs = config.max_num_seqs
        self.budget = config.max_num_batched_tokens
        self.st = step_time
        self.running: list[_Req] = []
        self.waiting: deque[_Req] = deque()
        self.cache: dict[int, int] = {}
        """Cached prompt block hash -> requests holding it."""
        self.evictable: OrderedDict[int, None] = OrderedDict()
        """Cached hashes no request holds, least recently used first."""
        self.private = 0
        self.events: list[KVEvent] = []
        self.event_id = 0
        self.preemptions = 0
        self.busy = False
        self.generation = 0
        self.run: DecodeRun | None = None
        self.run_start = 0.0
        self.step_start = 0.0
        self.step_reqs: list[tuple[_Req, int]] = []
        """The step in progress: (request, tokens it computes)."""

    # ------------------------------------------------------------------ KV budget

    def free(self) -> int:
        return self.capacity - self.private - len(self.cache) + len(self.evictable)

    def used(self) -> int:
        return self.private + len(self.cache) - len(self.evictable)

    def _take(self, n: int) -> bool:
        """Reserve n private blocks, evicting cached ones LRU first; False if they do not fit."""
        if n > self.free():
            return False
        spare = self.capacity - self.private - len(self.cache)
        removed = []
        while spare < n:
            h, _ = self.evictable.popitem(last=False)
            del self.cache[h]
            removed.append(h)
            spare += 1
        if removed:
            self.event_id += 1
            self.events.append(BlockRemoved(event_id=self.event_id, block_hashes=removed))
        self.private += n
        return True

    def _release(self, req: _Req) -> None:
        self.private -= req.private
        req.private = 0
        # Deepest block first, so the LRU order keeps shared roots longest (as the engine).
        for h in reversed(req.refs):
            n = self.cache[h] - 1
            self.cache[h] = n
            if n == 0:
                self.evictable[h] = None
        req.refs = []
        req.hashed = 0

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    def _grow(self, req: _Req, tokens: int) -> bool:
        held = req.private + len(req.refs)
        need = self._blocks(tokens) - held
        if need <= 0:
            return True
        if not self._take(need):
            return False
        req.private += need
        return True

    def _commit(self, req: _Req) -> None:
        """Full blocks now computed enter the prefix cache (one BlockStored), as
        `KVCacheManager.commit` does."""
        full = req.computed // self.bs
        if full <= req.hashed:
            return
        stored = []
        first = req.hashed
        prompt = req.spec.hashes
        for i in range(first, full):
            h = prompt[i] if i < len(prompt) else req.block_hash(i)
            if h in self.cache:  # another request computed it meanwhile: stays private
                if stored:
                    break  # keep the event a contiguous chain; the rest is stored next time
                first = i + 1
                continue
            self.cache[h] = 1
            req.refs.append(h)
            req.private -= 1
            self.private -= 1
            stored.append(h)
        req.hashed = first + len(stored) if stored else full
        if stored:
            self.event_id += 1
            parent = req.block_hash(first - 1) if first > 0 else None
            self.events.append(
                BlockStored(
                    event_id=self.event_id,
                    block_hashes=stored,
                    parent_hash=parent,
                    token_ids=[],
                    block_size=self.bs,
                )
            )

    # ------------------------------------------------------------------ scheduling

    def _preempt(self, victim: _Req) -> None:
        self.running.remove(victim)
        self._release(victim)
        victim.computed = 0
        self.preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self) -> list[tuple[_Req, int]]:
        """The next step's work, as the engine's scheduler would choose it."""
        budget = self.budget
        out: list[tuple[_Req, int]] = []
        scheduled: set[int] = set()
        preempted = False
        decodes = [r for r in self.running if r.tokens - r.computed == 1]
        prefills = [r for r in self.running if r.tokens - r.computed > 1]
        for req in decodes + prefills:
            if budget <= 0:
                break
            if req not in self.running:
                continue
            n = min(req.tokens - req.computed, budget)
            while not self._grow(req, req.computed + n):
                victim = next(
                    (r for r in reversed(self.running) if id(r) not in scheduled and r is not req),
                    req,
                )
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                out.append((req, n))
                scheduled.add(id(req))
                budget -= n
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_seqs:
            req = self.waiting[0]
            cap = (req.tokens - 1) // self.bs
            prefix = []
            while len(prefix) < cap:
                h = req.block_hash(len(prefix))
                if h not in self.cache:
                    break
                prefix.append(h)
            matched = len(prefix)
            computed = matched * self.bs
            n = min(req.tokens - computed, budget)
            fresh = self._blocks(computed + n) - matched
            if fresh > self.free() - sum(1 for h in prefix if h in self.evictable):
                break
            for h in prefix:
                c = self.cache[h]
                if c == 0:
                    del self.evictable[h]
                self.cache[h] = c + 1
            req.refs = prefix
            req.hashed = matched
            self._take(fresh)
            req.private = fresh
            self.waiting.popleft()
            req.computed = computed
            self.running.append(req)
            out.append((req, n))
            budget -= n
        return out

    def step_seconds(self, work: list[tuple[_Req, int]]) -> float:
        st = self.st
        prefill = decode = context = 0
        for req, n in work:
            if n == 1:
                decode += 1
            else:
                prefill += n
            context += req.computed
        return (
            st.base_s
            + prefill * st.per_prefill_token_s
            + decode * st.per_decode_seq_s
            + context * st.per_context_token_s
        )

    def plan_run(self) -> DecodeRun | None:
        """k all-decode steps up to the first finish, if the batch is only decoding and the
        KV budget covers them (else None: simulate the next step)."""
        if self.waiting or not self.running or len(self.running) > self.budget:
            return None
        k = 1 << 62
        context = 0
        for req in self.running:
            if req.tokens - req.computed != 1:
                return None
            k = min(k, req.remaining)
            context += req.computed
        if k < 2:
            return None
        extra = sum(
            max(0, self._blocks(r.computed + k) - r.private - len(r.refs)) for r in self.running
        )
        if extra > self.free():
            return None
        return DecodeRun(k, len(self.running), context, self.st)

    def load(self) -> LoadReport:
        queued = sum(max(0, r.spec.prompt_tokens - r.computed) for r in self.running)
        queued += sum(r.spec.prompt_tokens for r in self.waiting)
        return LoadReport(
            worker_id=self.worker_id,
            running=len(self.running),
            waiting=len(self.waiting),
            kv_blocks_used=self.used(),
            kv_blocks_total=self.capacity,
            queued_prefill_tokens=queued,
            last_event_id=self.event_id,
            num_preemptions=self.preemptions,
        )


@dataclass(slots=True)
class FleetStats:
    """Streamed results of a fleet run."""

    ttft: LogHistogram = field(default_factory=LogHistogram)
    itl: LogHistogram = field(default_factory=LogHistogram)
    latency: LogHistogram = field(default_factory=LogHistogram)
    requests: int = 0
    finished: int = 0
    output_tokens: int = 0
    first_arrival: float | None = None
    last_finish: float = 0.0
    steps: int = 0


_ARRIVAL, _STEP_END, _RUN_END = 0, 1, 2


class FleetSimulator:
    """Routes requests with the real `Router` to `FleetWorker`s on a virtual clock."""

    def __init__(
        self,
        config: SimConfig,
        step_time: LinearStepTime,
        *,
        keep_decisions: int = 0,
    ) -> None:
        self.config = config
        self.clock = ManualClock()
        self.router = Router(config.router, self.clock)
        self.workers: dict[str, FleetWorker] = {}
        for i in range(config.workers):
            wid = f"worker-{i:04d}"
            self.workers[wid] = FleetWorker(wid, config, step_time)
            self.router.add_worker(
                wid,
                WorkerInfo(
                    model="sim",
                    max_model_len=config.max_model_len,
                    block_size=config.block_size,
                    kv_blocks_total=config.num_kv_blocks,
                    max_num_seqs=config.max_num_seqs,
                ),
            )
        self.stats = FleetStats()
        self.decisions: list[RouteDecision] = []
        self.keep_decisions = keep_decisions
        """Keep the first N routing decisions (the fidelity test compares them)."""
        self._queue: list[tuple[float, int, int, object]] = []
        self._order = itertools.count()

    def _push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self._queue, (t, next(self._order), kind, payload))

    def run(
        self,
        requests: Iterable[FleetRequest],
        until: float | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> FleetStats:
        arrivals: Iterator[FleetRequest] = iter(requests)
        first = next(arrivals, None)
        if first is not None:
            self._push(first.arrival, _ARRIVAL, first)
        queue = self._queue
        clock = self.clock
        while queue:
            t, _, kind, payload = heapq.heappop(queue)
            if until is not None and t > until:
                break
            clock.set(max(t, clock.now()))
            if kind == _ARRIVAL:
                assert isinstance(payload, FleetRequest)
                following = next(arrivals, None)
                if following is not None:
                    self._push(max(following.arrival, t), _ARRIVAL, following)
                self._arrive(payload)
            elif kind == _STEP_END:
                assert isinstance(payload, FleetWorker)
                self._step_end(payload)
            else:
                assert isinstance(payload, tuple)
                self._run_end(*payload)
            if progress is not None:
                progress(t)
        return self.stats

    def _arrive(self, spec: FleetRequest) -> None:
        rid = f"req-{spec.index}"
        now = self.clock.now()
        stats = self.stats
        stats.requests += 1
        if stats.first_arrival is None:
            stats.first_arrival = now
        decision = self.router.route(rid, spec.hashes, spec.prompt_tokens)
        if len(self.decisions) < self.keep_decisions:
            self.decisions.append(decision)
        worker = self.workers[decision.worker_id]
        worker.waiting.append(_Req(rid, spec, last=now))
        if worker.run is not None:
            self._cut_run(worker)
        elif not worker.busy:
            self._start_step(worker)

    def _start_step(self, worker: FleetWorker) -> None:
        now = self.clock.now()
        run = worker.plan_run()
        if run is not None:
            worker.run, worker.run_start, worker.busy = run, now, True
            # A real worker reports after every step; the router releases a routed request's
            # pending load two reports after routing. One report as the run starts stands in
            # for the run's step reports (the batch only grows its decode blocks meanwhile).
            report = worker.load()
            report.timestamp = now
            self.router.on_load(report)
            self._push(now + run.end(run.steps), _RUN_END, (worker, worker.generation))
            return
        work = worker.schedule()  # its events reach the router at the step's end, as the engine's
        if not work:
            worker.busy = False
            return
        worker.step_reqs = work
        worker.step_start = now
        worker.busy = True
        self.stats.steps += 1
        self._push(now + worker.step_seconds(work), _STEP_END, worker)

    def _cut_run(self, worker: FleetWorker) -> None:
        run = worker.run
        assert run is not None
        steps = run.steps_by(self.clock.now() - worker.run_start)
        if steps < run.steps:
            worker.run = DecodeRun(steps, run.n, run.context, run.step_time)
            worker.generation += 1
            self._push(worker.run_start + run.end(steps), _RUN_END, (worker, worker.generation))

    def _run_end(self, worker: FleetWorker, generation: int) -> None:
        run = worker.run
        if generation != worker.generation or run is None:
            return  # cut short: a later event ends it
        worker.run = None
        k = run.steps
        start = worker.run_start
        now = self.clock.now()
        stats = self.stats
        stats.steps += k
        first_end = start + run.end(1)
        itl = stats.itl
        # Step durations: all equal without an attention term, else a linear series.
        if run.step_time.per_context_token_s == 0:
            same = run.end(1)
            if k > 1:
                itl.add(same, (k - 1) * run.n)
        else:
            for i in range(2, k + 1):
                itl.add(run.end(i) - run.end(i - 1), run.n)
        finished = []
        for req in worker.running:
            itl.add(first_end - req.last)
            worker._grow(req, req.computed + k)
            req.computed += k
            req.generated += k
            worker._commit(req)
            req.last = now
            if req.remaining <= 0:
                finished.append(req)
        stats.output_tokens += k * run.n
        self._finish(worker, finished)
        self._after_step(worker)

    def _step_end(self, worker: FleetWorker) -> None:
        now = self.clock.now()
        stats = self.stats
        finished = []
        router = self.router
        for req, n in worker.step_reqs:
            if req not in worker.running:
                continue
            req.computed += n
            worker._commit(req)
            if req.computed < req.tokens:
                continue  # a prefill chunk: no token yet
            req.generated += 1
            stats.output_tokens += 1
            if req.first is None:
                req.first = now
                stats.ttft.add(now - req.spec.arrival)
                router.on_first_token(req.rid)
            else:
                stats.itl.add(now - req.last)
            req.last = now
            if req.remaining <= 0:
                finished.append(req)
        worker.step_reqs = []
        self._finish(worker, finished)
        self._after_step(worker)

    def _finish(self, worker: FleetWorker, finished: list[_Req]) -> None:
        if not finished:
            return
        now = self.clock.now()
        stats = self.stats
        for req in finished:
            worker.running.remove(req)
            worker._release(req)
            stats.finished += 1
            stats.latency.add(now - req.spec.arrival)
            stats.last_finish = max(stats.last_finish, now)
            self.router.on_request_finished(req.rid)

    def _emit(self, worker: FleetWorker) -> None:
        if worker.events:
            batch = KVEventBatch(worker_id=worker.worker_id, events=worker.events)
            worker.events = []
            self.router.on_kv_events(batch)

    def _after_step(self, worker: FleetWorker) -> None:
        self._emit(worker)
        report = worker.load()
        report.timestamp = self.clock.now()
        self.router.on_load(report)
        worker.busy = False
        if worker.running or worker.waiting:
            self._start_step(worker)


def summarize_fleet(stats: FleetStats) -> TwinSummary:
    """The step model's summary keys, from the fleet's streamed histograms."""
    start = stats.first_arrival or 0.0
    span = max(stats.last_finish - start, 1e-9)
    return TwinSummary(
        requests=stats.requests,
        finished=stats.finished,
        ttft_p50=stats.ttft.percentile(50),
        ttft_p90=stats.ttft.percentile(90),
        itl_p50=stats.itl.percentile(50),
        itl_p90=stats.itl.percentile(90),
        latency_p50=stats.latency.percentile(50),
        latency_p90=stats.latency.percentile(90),
        output_tokens_per_s=stats.output_tokens / span,
        virtual_seconds=max(stats.last_finish - start, 0.0),
    )
