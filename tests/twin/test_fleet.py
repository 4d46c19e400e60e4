"""The fleet model (twin/fleet.py) against the per-step Simulator: same requests finished, the
same routing for the first requests, and TTFT / ITL / latency percentiles within 3%."""

from __future__ import annotations

import random

import pytest

from tokenfab.bench.workload import RequestSpec
from tokenfab.router import RouterConfig
from tokenfab.twin.fleet import FleetRequest, FleetSimulator, LogHistogram, summarize_fleet
from tokenfab.twin.report import TwinSummary, summarize
from tokenfab.twin.sim import SimConfig, Simulator
from tokenfab.twin.step_time import LinearStepTime

STEP = LinearStepTime(base_s=0.012, per_prefill_token_s=0.00006, per_decode_seq_s=0.0002)


def workload(seed: int, rate: float, seconds: float) -> list[RequestSpec]:
    rng = random.Random(seed)
    systems = [[rng.randrange(1, 30000) for _ in range(512)] for _ in range(8)]
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t > seconds:
            return out
        prompt = rng.choice(systems)[: rng.randrange(64, 512)]
        prompt = prompt + [rng.randrange(1, 30000) for _ in range(rng.randrange(32, 512))]
        out.append(RequestSpec(len(out), prompt, rng.randrange(32, 256), t))


def run_both(
    config: SimConfig, specs: list[RequestSpec]
) -> tuple[Simulator, TwinSummary, FleetSimulator, TwinSummary]:
    step = Simulator(config, STEP)
    exact = summarize(step.run(specs))
    fleet = FleetSimulator(config, STEP, keep_decisions=len(specs))
    approx = summarize_fleet(
        fleet.run([FleetRequest.from_spec(s, config.block_size) for s in specs])
    )
    assert approx.requests == exact.requests == len(specs)
    assert approx.finished == exact.finished == len(specs)
    for w in fleet.workers.values():
        assert not w.running and not w.waiting and w.used() == 0
    return step, exact, fleet, approx


def assert_close(exact: TwinSummary, approx: TwinSummary, tolerance: float) -> None:
    for key in ("ttft_p50", "ttft_p90", "itl_p50", "itl_p90", "latency_p50", "latency_p90"):
        a, b = getattr(exact, key), getattr(approx, key)
        assert abs(b - a) <= tolerance * a, (key, a, b)


def test_fleet_model_matches_the_per_step_simulator_with_the_kv_router() -> None:
    specs = workload(0, rate=20.0, seconds=10.0)
    step, exact, fleet, approx = run_both(SimConfig(workers=4, num_kv_blocks=8192), specs)
    # The first routes are identical; later ones drift apart because a worker in a decode run
    # reports its load once per run, not per step (its decode blocks grow unseen meanwhile).
    same = 0
    for a, b in zip(step.decisions, fleet.decisions, strict=True):
        if a.worker_id != b.worker_id:
            break
        same += 1
    assert same >= 10
    assert_close(exact, approx, 0.03)


@pytest.mark.parametrize("kv_blocks", [160, 320])
def test_fleet_worker_matches_the_engine_under_kv_pressure(kv_blocks: int) -> None:
    # Round robin: routing is the same by construction, so this compares the worker models
    # alone, with admission waiting for blocks, eviction and preemption (recompute).
    specs = workload(0, rate=20.0, seconds=10.0)
    config = SimConfig(workers=4, num_kv_blocks=kv_blocks, router=RouterConfig("round_robin"))
    step, exact, fleet, approx = run_both(config, specs)
    real_preemptions = sum(w.core.scheduler.num_preemptions for w in step.workers.values())
    assert real_preemptions > 0
    assert sum(w.preemptions for w in fleet.workers.values()) == real_preemptions
    assert_close(exact, approx, 0.02)
    assert approx.virtual_seconds == pytest.approx(exact.virtual_seconds, rel=1e-6)


def test_log_histogram_percentiles_within_resolution() -> None:
    rng = random.Random(1)
    xs = sorted(rng.lognormvariate(-3, 1) for _ in range(5000))
    h = LogHistogram()
    for x in xs:
        h.add(x)
    for q in (50, 90, 99):
        exact = xs[round(q / 100 * (len(xs) - 1))]
        assert abs(h.percentile(q) - exact) <= 0.01 * exact


def test_cli_model_kinds_agree_and_a_bad_kind_is_a_one_line_error() -> None:
    import json

    from typer.testing import CliRunner

    from tokenfab.twin.cli import app

    base = ["--workers", "6", "--requests", "60", "--rate", "6", "--json"]
    step = CliRunner().invoke(app, [*base, "--model-kind", "step"])
    fleet = CliRunner().invoke(app, [*base, "--model-kind", "fleet"])
    assert step.exit_code == 0 and fleet.exit_code == 0, (step.output, fleet.output)
    a, b = json.loads(step.stdout), json.loads(fleet.stdout)
    assert a["finished"] == b["finished"] == 60
    for key in ("ttft_p50", "itl_p50", "latency_p90"):
        assert b[key] == pytest.approx(a[key], rel=0.03)
    bad = CliRunner().invoke(app, [*base, "--model-kind", "bogus"])
    assert bad.exit_code == 2 and "--model-kind" in bad.output
