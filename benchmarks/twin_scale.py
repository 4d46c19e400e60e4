"""How fast the twin runs: virtual seconds per wall second and peak RSS.

(a) per_step_100: 100 workers, each a real EngineCore (scheduler + KV cache) with a SimRunner,
    behind the real router, at --rate-100 requests/s of Mooncake-like prefix-sharing load.
(b) fleet_1000: 1,000 single-GPU workers at 1 request/s/GPU, with all-decode batches advanced
    in closed form (twin/fast_decode.py; an arrival cuts a run at the step in progress) and
    the real router, for --fleet-seconds of virtual time (the issue asks for an hour).

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
    workers: int, rate: float, seconds: float, fast: bool, seed: int = 0
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate-100", type=float, default=20.0, help="requests/s for 100 workers")
    ap.add_argument("--seconds-100", type=float, default=60.0, help="virtual seconds of arrivals")
    ap.add_argument("--fleet-seconds", type=float, default=10.0, help="virtual seconds, 1,000 GPUs")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--child", nargs=4, metavar=("WORKERS", "RATE", "SECONDS", "MODE"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.child:
        w, r, s, fast = args.child
        print(json.dumps(scenario(int(w), float(r), float(s), fast == "fast")))
        return
    results = {}
    for name, (w, r, s, fast) in {
        "per_step_100": (100, args.rate_100, args.seconds_100, "step"),
        "fleet_1000": (1000, 1000.0, args.fleet_seconds, "fast"),
    }.items():
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(w), str(r), str(s), fast],
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
