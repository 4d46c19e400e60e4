"""The twin: deterministic for a seed, and its routing is `serve`'s router fed the same
arrivals and KV events."""

from __future__ import annotations

import random

from tokenfab.bench.workload import RequestSpec
from tokenfab.clock import ManualClock
from tokenfab.kv.hashing import block_hashes
from tokenfab.protocol import LoadReport, WorkerInfo
from tokenfab.router import Router, RouterConfig
from tokenfab.twin.report import summarize
from tokenfab.twin.sim import SimConfig, Simulator
from tokenfab.twin.step_time import LinearStepTime

STEP = LinearStepTime(base_s=0.01, per_prefill_token_s=0.001, per_decode_seq_s=0.002)


def workload(seed: int, n: int = 120) -> list[RequestSpec]:
    """Requests sharing a few system prompts (so prefix routing matters), Poisson arrivals."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1, 5000) for _ in range(96)] for _ in range(4)]
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(8.0)
        prompt = rng.choice(systems) + [rng.randrange(1, 5000) for _ in range(rng.randrange(8, 80))]
        out.append(RequestSpec(i, prompt, rng.randrange(4, 40), t))
    return out


def run(seed: int, workers: int = 4) -> Simulator:
    sim = Simulator(SimConfig(workers=workers, num_kv_blocks=256, block_size=16), STEP)
    sim.run(workload(seed))
    return sim


def test_every_request_finishes_with_its_tokens_and_no_block_leaks() -> None:
    specs = workload(1)
    sim = Simulator(SimConfig(workers=3, num_kv_blocks=128, block_size=16), STEP)
    records = {r.request_id: r for r in sim.run(specs)}
    for spec in specs:
        rec = records[f"req-{spec.index}"]
        assert rec.finished is not None and len(rec.token_times) == spec.max_tokens
        assert rec.ttft is not None and rec.ttft > 0
    for w in sim.workers.values():
        assert w.core.kv.num_used_blocks == 0 and not w.core.has_unfinished()
    assert summarize(list(records.values())).finished == len(specs)


def test_same_seed_same_run_other_seed_other_run() -> None:
    a, b, c = run(7), run(7), run(8)
    key = lambda s: [(r.worker_id, r.token_times) for r in s.records.values()]  # noqa: E731
    assert key(a) == key(b)
    assert [d.worker_id for d in a.decisions] == [d.worker_id for d in b.decisions]
    assert key(a) != key(c)


def test_prefix_sharing_requests_hit_the_cache() -> None:
    sim = run(3)
    hits = sum(r.cached_tokens for r in sim.records.values())
    assert hits > 0
    assert sum(d.overlap_blocks for d in sim.decisions) > 0


def test_routing_equals_serves_router_given_the_same_arrivals_and_kv_events() -> None:
    """Replay the twin's arrivals, KV event batches and load reports, in the twin's order,
    into a fresh Router as the frontend drives it: every decision is the same."""
    specs = workload(5)
    trace: list[tuple[str, object]] = []

    class Recording(Simulator):
        def _arrive(self, spec: RequestSpec) -> None:
            trace.append(("arrive", (self.clock.now(), spec)))
            super()._arrive(spec)

    sim = Recording(SimConfig(workers=4, num_kv_blocks=256, block_size=16), STEP)
    router = sim.router
    for name in ("on_kv_events", "on_load", "on_first_token", "on_request_finished"):
        original = getattr(router, name)

        def recorded(arg: object, _name: str = name, _original: object = original) -> object:
            trace.append((_name, (sim.clock.now(), arg)))
            return _original(arg)  # type: ignore[operator]

        setattr(router, name, recorded)
    sim.run(specs)

    clock = ManualClock()
    serve_router = Router(RouterConfig(), clock)
    for wid in sim.workers:
        serve_router.add_worker(wid, WorkerInfo(model="m", max_model_len=32768, block_size=16))
    decisions = []
    for kind, (t, arg) in trace:  # type: ignore[misc]
        clock.set(t)
        if kind == "arrive":
            spec = arg
            hashes = block_hashes(spec.prompt, 16)
            rid = f"req-{spec.index}"
            decisions.append(serve_router.route(rid, hashes, len(spec.prompt)).worker_id)
        elif kind == "on_load":
            assert isinstance(arg, LoadReport)
            serve_router.on_load(arg)
        else:
            getattr(serve_router, kind)(arg)
    assert decisions == [d.worker_id for d in sim.decisions]
    assert len(set(decisions)) > 1


def test_closed_form_decode_matches_step_by_step() -> None:
    """Same load, per-step vs closed-form decode runs: every request gets all its tokens, no
    blocks leak, and the percentiles agree (within 25%: during a run the router sees the
    worker's load and KV events as of the run's start, so some routing differs)."""
    step = LinearStepTime(
        base_s=0.01, per_prefill_token_s=0.001, per_decode_seq_s=0.002, per_context_token_s=1e-5
    )
    specs = workload(11, n=150)
    results = []
    for fast in (False, True):
        sim = Simulator(SimConfig(workers=3, num_kv_blocks=256, fast_decode=fast), step)
        records = sim.run(specs)
        for spec in specs:
            assert len(sim.records[f"req-{spec.index}"].token_times) == spec.max_tokens
        assert all(w.core.kv.num_used_blocks == 0 for w in sim.workers.values())
        results.append((summarize(records), sim.steps))
    (slow, slow_steps), (fast, fast_steps) = results
    for key in ("ttft_p50", "ttft_p90", "itl_p50", "itl_p90", "latency_p50"):
        a, b = getattr(slow, key), getattr(fast, key)
        assert abs(a - b) <= 0.25 * a, (key, a, b)
    assert slow_steps > 0 and fast_steps > 0
