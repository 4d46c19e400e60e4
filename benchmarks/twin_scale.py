"""How fast the twin runs: virtual seconds per wall second and peak RSS.

(a) per_step_100: 100 workers, each a real EngineCore (scheduler + KV cache) with a SimRunner,
    behind the real router, at --rate-100 requests/s of Mooncake-like prefix-sharing load.
(b) fleet_1000: 1,000 single-GPU workers at 1 request/s/GPU through the fleet model
    (twin/fleet.py: count-based workers, decode in closed form between batch changes) and the
    real router (kv policy), for --fleet-seconds of virtual time (the issue asks for an hour).

Each scenario runs in its own process so its peak RSS is its own.

    .venv/bin/python benchmarks/twin_scale.py [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import resource
import subprocess
import sys
import time
from collections.abc import Iterator


def scenario(
    workers: int, rate: float, seconds: float, fast: bool, gpus_per_worker: int = 1, seed: int = 0
) -> dict[str, float]:
    from tokenfab.bench.workload import RequestSpec
    from tokenfab.twin.sim import SimConfig, Simulator
    from tokenfab.twin.step_time import LinearStepTime

    rng = random.Random(seed)
    systems = [[rng.randrange(1, 30000) for _ in range(512)] for _ in range(64)]

    def specs() -> Iterator[RequestSpec]:
        t = 0.0
        for i in itertools.count():
            t += rng.expovariate(rate)
            if t > seconds:
                return
            prompt = rng.choice(systems)[: rng.randrange(64, 512)]
            prompt = prompt + [rng.randrange(1, 30000) for _ in range(rng.randrange(32, 512))]
            yield RequestSpec(i, prompt, rng.randrange(32, 256), t)

    # Step times of an 8B model on one H100-class GPU (ballpark: ~25 ms/decode step at batch 64).
    step = LinearStepTime(base_s=0.012, per_prefill_token_s=0.00006, per_decode_seq_s=0.0002)
    if fast:
        return fleet_scenario(workers, rate, seconds, step, rng, gpus_per_worker)
    sim = Simulator(SimConfig(workers=workers, num_kv_blocks=8192, fast_decode=fast), step)
    t0 = time.perf_counter()
    records = sim.run(specs())
    wall = time.perf_counter() - t0
    virtual = max((r.finished or 0.0) for r in records)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "speedup": virtual / wall,
        "rss_mb": rss_mb,
        "virtual_s": virtual,
        "wall_s": wall,
        "requests": len(records),
        "steps": sim.steps,
    }


def fleet_scenario(
    workers: int,
    rate: float,
    seconds: float,
    step: object,
    rng: random.Random,
    gpus_per_worker: int = 1,
) -> dict[str, float]:
    """The same load as hashes (a Mooncake trace's shape: 64 shared system prompts of 32
    blocks, then per-request blocks), through the fleet model (twin/fleet.py) and the Router.

    gpus_per_worker g > 1: each worker stands for g GPUs as g times the throughput (per-token
    and per-sequence step costs / g, KV blocks, batch tokens and sequences x g; the fixed step
    cost kept): a throughput-equivalent stand-in, not a tensor-parallel model."""
    from tokenfab.twin.fleet import FleetRequest, FleetSimulator
    from tokenfab.twin.sim import SimConfig
    from tokenfab.twin.step_time import LinearStepTime

    assert isinstance(step, LinearStepTime)
    systems = [[rng.getrandbits(63) for _ in range(32)] for _ in range(64)]

    def requests() -> Iterator[FleetRequest]:
        t = 0.0
        for i in itertools.count():
            t += rng.expovariate(rate)
            if t > seconds:
                return
            shared = rng.randrange(64, 512)
            own = rng.randrange(32, 512)
            n = shared + own
            hashes = rng.choice(systems)[: shared // 16]
            hashes = hashes + [rng.getrandbits(63) for _ in range(n // 16 - len(hashes))]
            yield FleetRequest(i, t, n, hashes, rng.randrange(32, 256))

    g = gpus_per_worker
    if g > 1:
        step = LinearStepTime(
            base_s=step.base_s,
            per_prefill_token_s=step.per_prefill_token_s / g,
            per_decode_seq_s=step.per_decode_seq_s / g,
        )
    config = SimConfig(
        workers=workers,
        num_kv_blocks=8192 * g,
        max_num_seqs=256 * g,
        max_num_batched_tokens=2048 * g,
    )
    sim = FleetSimulator(config, step)
    # Time spent in Router.route (index walks, kv choice, pending bookkeeping) is measured
    # apart, to show what the fleet model itself costs.
    route = sim.router.route
    routing = [0.0]

    def timed_route(*args: object) -> object:
        t = time.perf_counter()
        try:
            return route(*args)  # type: ignore[arg-type]
        finally:
            routing[0] += time.perf_counter() - t

    sim.router.route = timed_route  # type: ignore[method-assign]
    t0 = time.perf_counter()
    stats = sim.run(requests())
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "speedup": stats.last_finish / wall,
        "rss_mb": rss_mb,
        "virtual_s": stats.last_finish,
        "wall_s": wall,
        "requests": stats.requests,
        "steps": stats.steps,
        "route_wall_s": routing[0],
        "speedup_without_routing": stats.last_finish / max(wall - routing[0], 1e-9),
        "index_blocks": sim.router.index.num_blocks,
        "ttft_p50": stats.ttft.percentile(50),
        "itl_p50": stats.itl.percentile(50),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate-100", type=float, default=20.0, help="requests/s for 100 workers")
    ap.add_argument("--seconds-100", type=float, default=60.0, help="virtual seconds of arrivals")
    ap.add_argument("--fleet-seconds", type=float, default=10.0, help="virtual seconds, 1,000 GPUs")
    ap.add_argument(
        "--fleet-workers",
        type=int,
        default=1000,
        help="GPUs of the fleet scenario (1 req/s each)",
    )
    ap.add_argument(
        "--fleet-gpus-per-worker",
        type=int,
        default=1,
        help="fleet workers stand for this many GPUs each (throughput x g; 8: 125 x 8 GPUs)",
    )
    ap.add_argument("--only-fleet", action="store_true", help="skip per_step_100")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--child",
        nargs=5,
        metavar=("WORKERS", "RATE", "SECONDS", "MODE", "G"),
        help=argparse.SUPPRESS,
    )
    args = ap.parse_args()
    if args.child:
        w, r, s, fast, g = args.child
        print(json.dumps(scenario(int(w), float(r), float(s), fast == "fast", int(g))))
        return
    results = {}
    for name, (w, r, s, fast) in {
        "per_step_100": (100, args.rate_100, args.seconds_100, "step"),
        "fleet_1000": (
            args.fleet_workers // args.fleet_gpus_per_worker,
            float(args.fleet_workers),
            args.fleet_seconds,
            "fast",
        ),
    }.items():
        if args.only_fleet and name != "fleet_1000":
            continue
        g = args.fleet_gpus_per_worker if name == "fleet_1000" else 1
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(w), str(r), str(s), fast, str(g)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[name] = json.loads(out.stdout)
    if args.json:
        print(json.dumps(results))
        return
    for name, r in results.items():
        print(
            f"{name}: {r['requests']} requests, {r['virtual_s']:.1f} virtual s in "
            f"{r['wall_s']:.1f} wall s = {r['speedup']:.2f}x real time, peak RSS "
            f"{r['rss_mb']:.0f} MB, {r['steps']} engine steps"
        )


if __name__ == "__main__":
    main()
