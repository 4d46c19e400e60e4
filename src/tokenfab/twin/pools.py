"""Disaggregated pools and the planner on the twin's virtual clock.

`PoolSimulator` is the step model (`Simulator`: a real `EngineCore` per worker, the real
`Router`) with worker roles, as `serve --prefill P --decode D` runs them:

- routing is `router.disagg.route_disagg`, the frontend's own choice: a decode worker by load
  and its cached prefix, a prefill worker (`<id>#prefill`) by KV overlap unless the uncached
  part is short or that worker's queue is long (then the decode worker prefills itself);
- a remote prefill runs the prompt and first token on the prefill worker (max_tokens 1, as
  `worker.disagg.prefill`), which holds the prompt's full blocks; the first token reaches the
  client then (TTFT). The decode worker's missing blocks move at `link_bytes_per_s`: bytes =
  missing blocks x block_size x KV bytes per token; when they are in, the decode worker
  adopts them (`KVCache.reserve` + `adopt`, as `LLMEngine.import_blocks`) and continues the
  request (prompt + first token, one token fewer), as `worker.disagg.decode_remote`;
- decode-role workers compute at most `decode_max_prefill_tokens` prompt tokens a step
  (`EngineConfig.decode_max_prefill_tokens`).

With a planner, the real `planner.core.tick` runs every `interval_s` of virtual time on the
observation `planner.observe.reduce_reports` makes of the workers' load reports (and the
mean TTFT / ITL of the interval, as the planner reads them from the frontend's metrics); a
move drains the worker (no new requests are routed to it; the real worker refuses them and
the frontend retries elsewhere) and switches its role once nothing is in flight on it. Pool
sizes are recorded at every tick and every role switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenfab.bench.workload import RequestSpec
from tokenfab.kv.hashing import block_hashes
from tokenfab.planner.capacity import Capacity
from tokenfab.planner.core import Decision, PlannerConfig, PlannerState, initial_state, tick
from tokenfab.planner.observe import LatencySums, WorkerView, mean_latencies_ms, reduce_reports
from tokenfab.protocol import (
    GenerateOutput,
    GenerateRequest,
    KVEventBatch,
    LoadReport,
    SamplingParams,
    WorkerRole,
)
from tokenfab.router.disagg import DisaggConfig, route_disagg
from tokenfab.twin.sim import RequestRecord, SimConfig, Simulator, _Worker
from tokenfab.twin.sim_runner import SIM_TOKEN
from tokenfab.twin.step_time import LinearStepTime

DEFAULT_LINK_GBPS = 25.0
"""GB/s of the KV link without --system: a 200 Gb/s NIC per worker."""


@dataclass(frozen=True, slots=True)
class PoolConfig:
    prefill: int
    decode: int
    kv_bytes_per_token: float
    """KV bytes one token stores over all layers (the model's)."""
    link_bytes_per_s: float = DEFAULT_LINK_GBPS * 1e9
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    decode_max_prefill_tokens: int | None = 32

    def __post_init__(self) -> None:
        if self.prefill < 0 or self.decode < 1:
            raise ValueError(f"--disagg needs P >= 0 and D >= 1, got {self.prefill}:{self.decode}")
        if self.link_bytes_per_s <= 0 or self.kv_bytes_per_token <= 0:
            raise ValueError("link bandwidth and KV bytes per token must be > 0")


@dataclass(frozen=True, slots=True)
class PlannerSetup:
    config: PlannerConfig
    capacity: Capacity


@dataclass(frozen=True, slots=True)
class PoolSample:
    """Pool sizes at one planner tick, role switch, or the start."""

    t: float
    prefill: int
    decode: int
    draining: int


@dataclass(frozen=True, slots=True)
class Transfer:
    """One prompt's KV handoff (what the disagg test checks)."""

    request_id: str
    prefill_worker: str
    decode_worker: str
    blocks: int
    nbytes: float
    start: float
    end: float


@dataclass(slots=True)
class _Remote:
    request_id: str
    spec: RequestSpec
    prefill_worker: str
    decode_worker: str
    hashes: list[int]
    pulled: bool = False
    """The decode worker has the blocks (the prefill worker's hold is released)."""


class PoolSimulator(Simulator):
    def __init__(
        self,
        config: SimConfig,
        step_time: LinearStepTime,
        pools: PoolConfig,
        planner: PlannerSetup | None = None,
    ) -> None:
        workers = pools.prefill + pools.decode
        if config.workers != workers:
            raise ValueError(f"{workers} workers in the pools, {config.workers} in the config")
        if config.fast_decode:
            # imported blocks would land in the middle of a planned decode run's allocation
            raise ValueError("--fast-decode does not combine with --disagg (step by step only)")
        interval = planner.config.interval_s if planner else 10.0
        super().__init__(
            config, step_time, tick=self._plan if planner else None, tick_interval_s=interval
        )
        self.pools = pools
        self.roles: dict[str, WorkerRole] = {}
        for i, wid in enumerate(self.workers):
            self._set_role(wid, "prefill" if i < pools.prefill else "decode")
        self.draining: set[str] = set()
        self._moving: dict[str, WorkerRole] = {}
        """Draining worker -> the role it switches to once drained."""
        self.inbound: dict[str, int] = dict.fromkeys(self.workers, 0)
        """Transfers under way to each decode worker (a draining worker waits for them)."""
        self.remote: dict[str, _Remote] = {}
        self.transfers: list[Transfer] = []
        self.planner = planner
        self.state: PlannerState | None = (
            initial_state(planner.config, planner.capacity) if planner else None
        )
        self.planner_decisions: list[tuple[float, Decision]] = []
        self.switches: list[tuple[float, str, WorkerRole]] = []
        """(virtual time, worker, new role) of every role switch, once drained."""
        self.pool_sizes: list[PoolSample] = [self.sample_pools(0.0)]
        self._prev_reports: dict[str, LoadReport] = {}
        self._latency = LatencySums()
        self._reported = LatencySums()
        self._seen: dict[str, int] = {}
        """Tokens of each unfinished request already counted into `_latency`."""

    # ------------------------------------------------------------------ roles

    def _set_role(self, wid: str, role: WorkerRole) -> None:
        self.roles[wid] = role
        cap = self.pools.decode_max_prefill_tokens if role == "decode" else None
        self.workers[wid].core.set_prefill_budget(cap)

    def sample_pools(self, t: float) -> PoolSample:
        roles = list(self.roles.values())
        return PoolSample(t, roles.count("prefill"), roles.count("decode"), len(self.draining))

    def _live(self) -> tuple[list[str], list[str]]:
        """(decoders, prefillers) that take new requests, sorted (the frontend's `_roles`)."""
        live = [w for w in sorted(self.workers) if w not in self.draining]
        return [w for w in live if self.roles[w] != "prefill"], [
            w for w in live if self.roles[w] == "prefill"
        ]

    # ------------------------------------------------------------------ requests

    def _arrive(self, spec: RequestSpec) -> None:
        rid = f"req-{spec.index}"
        hashes = block_hashes(spec.prompt, self.config.block_size)
        n = len(spec.prompt)
        decoders, prefillers = self._live()
        router = self.router
        if not decoders:  # everything draining: the frontend would still route somewhere
            decoders = sorted(self.workers)
        pre = None
        if prefillers:
            decision, pre = route_disagg(
                router.route,
                router.worker_load,
                router.on_request_finished,
                self.pools.disagg,
                rid,
                hashes,
                n,
                decoders,
                prefillers,
            )
        else:
            decision = router.route(rid, hashes, n, decoders)
        self.decisions.append(decision)
        self.records[rid] = RequestRecord(rid, decision.worker_id, self.clock.now(), n)
        if self.planner is not None:
            self._seen[rid] = 0
        if pre is None:
            self._submit(self.workers[decision.worker_id], rid, spec.prompt, spec.max_tokens)
            return
        self.remote[rid] = _Remote(rid, spec, pre.worker_id, decision.worker_id, hashes)
        self.inbound[decision.worker_id] += 1
        self._submit(self.workers[pre.worker_id], rid, spec.prompt, 1)

    def _submit(self, worker: _Worker, rid: str, prompt: list[int], max_tokens: int) -> None:
        worker.core.add_request(
            GenerateRequest(
                request_id=rid,
                prompt_token_ids=prompt,
                sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            )
        )
        if worker.run is not None:
            self._cut_run(worker)
        elif not worker.busy:
            self._start_step(worker)

    def _step_end(self, worker: _Worker, outputs: list[GenerateOutput]) -> None:
        wid = worker.worker_id
        rest = []
        for out in outputs:
            rem = self.remote.get(out.request_id)
            if rem is not None and rem.prefill_worker == wid and out.finish_reason is not None:
                self._prefilled(worker, rem, out)
            else:
                rest.append(out)
        finished = [o.request_id for o in rest if o.finish_reason is not None]
        super()._step_end(worker, rest)
        for rid in finished:
            if self.remote.pop(rid, None) is not None:
                self.router.on_request_finished(f"{rid}#prefill")
        self._check_drained()

    def _prefilled(self, worker: _Worker, rem: _Remote, out: GenerateOutput) -> None:
        """The prefill worker computed the prompt and first token: the client has the token;
        the prompt's blocks are held for the decode worker, which pulls those it lacks."""
        now = self.clock.now()
        rid = out.request_id
        rec = self.records[rid]
        rec.token_times.append(now)
        rec.cached_tokens = out.num_cached_tokens
        self.router.on_first_token(rid)
        self.router.on_first_token(f"{rid}#prefill")
        if rem.spec.max_tokens <= 1:
            rec.finished = now
            self.router.on_request_finished(rid)
            self.router.on_request_finished(f"{rid}#prefill")
            self.inbound[rem.decode_worker] -= 1
            del self.remote[rid]
            return
        held = worker.core.kv.hold(rem.hashes)
        dec = self.workers[rem.decode_worker]
        have = min(dec.core.kv.cached_prefix_length(rem.hashes), len(held))
        blocks = len(held) - have
        nbytes = blocks * self.config.block_size * self.pools.kv_bytes_per_token
        end = now + nbytes / self.pools.link_bytes_per_s
        self.transfers.append(
            Transfer(rid, worker.worker_id, dec.worker_id, blocks, nbytes, now, end)
        )
        self.at(end, lambda: self._transferred(worker, held, have, rem))

    def _transferred(self, src: _Worker, held: list[int], have: int, rem: _Remote) -> None:
        """The blocks are in: the decode worker adopts them and decodes the rest."""
        src.core.kv.unhold(held)
        rem.pulled = True
        dec = self.workers[rem.decode_worker]
        want = rem.hashes[have : len(held)]
        if want:
            kv = dec.core.kv
            ids = kv.reserve(len(want))
            bs = self.config.block_size
            tokens = rem.spec.prompt[have * bs : (have + len(ids)) * bs]
            kv.adopt(ids, want[: len(ids)], rem.hashes[have - 1] if have else None, tokens)
            kv.flush_events()
            self._publish(dec)
        self.inbound[dec.worker_id] -= 1
        self._submit(dec, rem.request_id, rem.spec.prompt + [SIM_TOKEN], rem.spec.max_tokens - 1)

    def _publish(self, worker: _Worker) -> None:
        """A worker's pending KV events reach the router (a worker publishes them at once)."""
        if worker.events:
            batch = KVEventBatch(worker_id=worker.worker_id, events=list(worker.events))
            worker.events.clear()
            self.kv_batches.append(batch)
            self.router.on_kv_events(batch)

    # ------------------------------------------------------------------ planner

    def _check_drained(self) -> None:
        for wid in sorted(self.draining):
            w = self.workers[wid]
            if w.busy or w.core.has_unfinished() or self.inbound[wid]:
                continue
            if any(r.prefill_worker == wid and not r.pulled for r in self.remote.values()):
                continue  # a prefill it ran is still being pulled
            self.draining.discard(wid)
            self._set_role(wid, self._moving.pop(wid))
            self.switches.append((self.clock.now(), wid, self.roles[wid]))
            self.pool_sizes.append(self.sample_pools(self.clock.now()))

    def _latencies(self) -> tuple[float | None, float | None]:
        """Mean TTFT and ITL (ms) of the interval, as the planner reads them from the
        frontend's histograms: every token delivered since the last tick counts once."""
        s = self._latency
        ttft_sum, ttft_n, itl_sum, itl_n = s.ttft_sum, s.ttft_count, s.itl_sum, s.itl_count
        for rid, seen in list(self._seen.items()):
            rec = self.records[rid]
            times = rec.token_times
            for i in range(seen, len(times)):
                if i == 0:
                    ttft_sum += times[0] - rec.arrival
                    ttft_n += 1
                else:
                    itl_sum += times[i] - times[i - 1]
                    itl_n += 1
            if rec.finished is not None:
                del self._seen[rid]
            else:
                self._seen[rid] = len(times)
        self._latency = LatencySums(ttft_sum, ttft_n, itl_sum, itl_n)
        out = mean_latencies_ms(self._reported, self._latency)
        self._reported = self._latency
        return out

    def _plan(self, _: Simulator) -> None:
        assert self.planner is not None and self.state is not None
        cfg = self.planner.config
        now = self.clock.now()
        views = tuple(
            WorkerView(wid, self.roles[wid], draining=wid in self.draining)
            for wid in sorted(self.workers)
        )
        cur = {}
        for wid, w in self.workers.items():
            report = w.core.stats()
            report.worker_id, report.timestamp = wid, now
            cur[wid] = report
        ttft, itl = self._latencies()
        obs = reduce_reports(
            self._prev_reports, cur, cfg.interval_s, views, ttft_ms=ttft, itl_ms=itl
        )
        self._prev_reports = cur
        self.state, decisions = tick(obs, self.state, now, cfg)
        for d in decisions:
            self.planner_decisions.append((now, d))
            if d.kind == "move" and d.to_role is not None and d.worker_id not in self.draining:
                self.draining.add(d.worker_id)
                self._moving[d.worker_id] = d.to_role
        self._check_drained()
        self.pool_sizes.append(self.sample_pools(now))


def step_capacity(
    step_time: LinearStepTime, config: SimConfig, context: int, itl_ms: float
) -> Capacity:
    """Per-worker capacity the planner sizes pools by, from the twin's own step-time model
    (what `planner --prefill-tps/--decode-tps` would be measured as): prefill, a full step
    budget of prompt tokens per step; decode, the largest batch (up to max_num_seqs) whose
    step at `context` tokens per sequence stays within the ITL target (at least 1)."""
    budget = config.max_num_batched_tokens
    pre = budget / (step_time.base_s + budget * step_time.per_prefill_token_s)

    def decode_step(b: int) -> float:
        st = step_time
        return st.base_s + b * (st.per_decode_seq_s + context * st.per_context_token_s)

    best = 1
    for b in range(1, config.max_num_seqs + 1):
        if decode_step(b) * 1e3 <= itl_ms:
            best = b
    return Capacity(pre, best / decode_step(best), source="twin step-time model")
