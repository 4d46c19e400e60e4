"""The discrete-event simulator: `serve`'s decision code on a virtual clock.

Each worker is a real `EngineCore` (scheduler, KV cache, step loop) with a `SimRunner`; the
frontend's routing is the real `Router` (index, scoring, pending blocks). Events, in virtual
time order (ties in the order they were scheduled, so a run is deterministic):

- arrival: the request's block hashes are routed, and the request added to that engine; an
  idle engine starts a step at once;
- step end: the step's tokens are delivered (first token, finished), its KV events applied to
  the router and its load reported (as a worker does after each step), and the next step
  starts if the engine has work.

A step's state changes happen when it starts (the engine computes them in one go); arrivals
during a step join the queue for the next one, as requests reaching `AsyncEngine` do.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from tokenfab.bench.workload import RequestSpec
from tokenfab.clock import ManualClock
from tokenfab.engine.core.scheduler import SchedulerConfig
from tokenfab.engine.core.step import EngineCore
from tokenfab.kv.hashing import block_hashes
from tokenfab.protocol import (
    GenerateOutput,
    GenerateRequest,
    KVEvent,
    KVEventBatch,
    SamplingParams,
    WorkerInfo,
)
from tokenfab.router import RouteDecision, Router, RouterConfig
from tokenfab.twin.fast_decode import DecodeRun, apply_run, plan_run
from tokenfab.twin.sim_runner import SimRunner
from tokenfab.twin.step_time import LinearStepTime


@dataclass(frozen=True, slots=True)
class SimConfig:
    workers: int = 4
    num_kv_blocks: int = 4096
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 32768
    router: RouterConfig = field(default_factory=RouterConfig)
    fast_decode: bool = False
    """Advance all-decode batches in closed form (fast_decode.py) instead of step by step."""


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    worker_id: str
    arrival: float
    prompt_tokens: int
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None
    cached_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]


class _Worker:
    def __init__(
        self, worker_id: str, config: SimConfig, step_time: LinearStepTime, clock: ManualClock
    ) -> None:
        self.worker_id = worker_id
        self.events: list[KVEvent] = []
        self.runner = SimRunner(config.num_kv_blocks, config.block_size, step_time)
        self.core = EngineCore(
            self.runner,
            vocab_size=1 << 31,
            eos_token_ids=[],
            max_model_len=config.max_model_len,
            scheduler_config=SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_waiting=1 << 62,
            ),
            event_sink=self.events.extend,
            clock=clock,
        )
        self.busy = False
        self.run: DecodeRun | None = None
        self.run_start = 0.0
        self.generation = 0
        """Bumped when a decode run is cut short: its old end event is then stale."""


_ARRIVAL, _STEP_END, _TICK, _RUN_END, _CALL = 0, 1, 2, 3, 4


class Simulator:
    """Replays requests through the router and engines; `run()` returns the request records."""

    def __init__(
        self,
        config: SimConfig,
        step_time: LinearStepTime,
        *,
        tick: Callable[[Simulator], None] | None = None,
        tick_interval_s: float = 10.0,
    ) -> None:
        self.config = config
        self.clock = ManualClock()
        self.router = Router(config.router, self.clock)
        self.workers: dict[str, _Worker] = {}
        for i in range(config.workers):
            wid = f"worker-{i:04d}"
            self.workers[wid] = _Worker(wid, config, step_time, self.clock)
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
        self.records: dict[str, RequestRecord] = {}
        self.decisions: list[RouteDecision] = []
        self.kv_batches: list[KVEventBatch] = []
        """Every KV event batch applied to the router, in order (the routing test replays it)."""
        self.tick = tick
        """Called every `tick_interval_s` of virtual time (the planner's seam)."""
        self.tick_interval_s = tick_interval_s
        self._queue: list[tuple[float, int, int, object]] = []
        self._order = itertools.count()
        self.steps = 0

    def _push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self._queue, (t, next(self._order), kind, payload))

    def at(self, t: float, call: Callable[[], None]) -> None:
        """Call `call` at virtual time `t` (in order with the other events): the seam for
        what a subclass adds, e.g. a KV transfer ending."""
        self._push(t, _CALL, call)

    def run(
        self,
        requests: Iterable[RequestSpec],
        until: float | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> list[RequestRecord]:
        # Arrivals are pulled one at a time (in arrival order), so an hour of a large fleet's
        # requests never sits in memory at once.
        arrivals = iter(requests)
        first = next(arrivals, None)
        if first is not None:
            self._push(first.arrival or 0.0, _ARRIVAL, first)
        if self.tick is not None:
            self._push(self.tick_interval_s, _TICK, None)
        while self._queue:
            t, _, kind, payload = heapq.heappop(self._queue)
            if until is not None and t > until:
                break
            if kind == _TICK and not self._has_work():
                break
            self.clock.set(max(t, self.clock.now()))
            if kind == _ARRIVAL:
                assert isinstance(payload, RequestSpec)
                following = next(arrivals, None)
                if following is not None:
                    self._push(max(following.arrival or 0.0, t), _ARRIVAL, following)
                self._arrive(payload)
            elif kind == _STEP_END:
                assert isinstance(payload, tuple)
                self._step_end(*payload)
            elif kind == _RUN_END:
                assert isinstance(payload, tuple)
                self._run_end(*payload)
            elif kind == _CALL:
                assert callable(payload)
                payload()
            else:
                assert self.tick is not None
                self.tick(self)
                self._push(t + self.tick_interval_s, _TICK, None)
            if progress is not None:
                progress(t)
        return list(self.records.values())

    def _has_work(self) -> bool:
        return any(k != _TICK for _, _, k, _ in self._queue) or any(
            w.busy for w in self.workers.values()
        )

    def _arrive(self, spec: RequestSpec) -> None:
        rid = f"req-{spec.index}"
        bs = self.config.block_size
        hashes = block_hashes(spec.prompt, bs)
        decision = self.router.route(rid, hashes, len(spec.prompt))
        self.decisions.append(decision)
        worker = self.workers[decision.worker_id]
        self.records[rid] = RequestRecord(rid, worker.worker_id, self.clock.now(), len(spec.prompt))
        worker.core.add_request(
            GenerateRequest(
                request_id=rid,
                prompt_token_ids=spec.prompt,
                sampling=SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True),
            )
        )
        if worker.run is not None:
            self._cut_run(worker)
        elif not worker.busy:
            self._start_step(worker)

    def _start_step(self, worker: _Worker) -> None:
        if self.config.fast_decode:
            run = plan_run(worker.core, worker.runner.step_time)
            if run is not None:
                now = self.clock.now()
                worker.run, worker.run_start, worker.busy = run, now, True
                self.steps += run.steps
                self._push(now + run.end(run.steps), _RUN_END, (worker, worker.generation))
                return
        before = worker.core.stats_steps
        outputs = worker.core.step()
        if worker.core.stats_steps == before:  # nothing could be scheduled
            worker.busy = False
            return
        self.steps += 1
        worker.busy = True
        self._push(self.clock.now() + worker.runner.last_seconds, _STEP_END, (worker, outputs))

    def _cut_run(self, worker: _Worker) -> None:
        """A request arrived for an engine in a decode run: the run ends with the step in
        progress, so the request is admitted at the next step, as in the real engine."""
        run = worker.run
        assert run is not None
        steps = run.steps_by(self.clock.now() - worker.run_start)
        if steps < run.steps:
            self.steps -= run.steps - steps
            worker.run = replace(run, steps=steps)
            worker.generation += 1
            end = worker.run_start + run.end(steps)
            self._push(end, _RUN_END, (worker, worker.generation))

    def _run_end(self, worker: _Worker, generation: int) -> None:
        run = worker.run
        if generation != worker.generation or run is None:
            return  # cut short: a later event ends it
        start = worker.run_start
        times = [start + run.end(i) for i in range(1, run.steps + 1)]
        for seq in worker.core.scheduler.running:
            self.records[seq.request_id].token_times.extend(times)
        apply_run(worker.core, run.steps)
        worker.run = None
        self._step_end(worker, [])

    def _step_end(self, worker: _Worker, outputs: list[GenerateOutput]) -> None:
        now = self.clock.now()
        router = self.router
        if worker.events:
            batch = KVEventBatch(worker_id=worker.worker_id, events=list(worker.events))
            worker.events.clear()
            self.kv_batches.append(batch)
            router.on_kv_events(batch)
        for out in outputs:
            rec = self.records[out.request_id]
            if out.token_ids:
                if not rec.token_times:
                    rec.cached_tokens = out.num_cached_tokens
                    router.on_first_token(out.request_id)
                rec.token_times.extend([now] * len(out.token_ids))
            if out.finish_reason is not None:
                rec.finished = now
                router.on_request_finished(out.request_id)
        report = worker.core.stats()
        report.worker_id = worker.worker_id
        report.timestamp = now
        router.on_load(report)
        worker.busy = False
        if worker.core.has_unfinished():
            self._start_step(worker)
