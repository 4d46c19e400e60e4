"""Aggregated vs disaggregated serving: the same 4 engine processes and the same workload.

Shapes (a fresh `tokenfab serve` each, the default model, `--num-threads 1` so 4 engines on a
small machine do not oversubscribe its cores with OpenMP teams):

- aggregated:    `tokenfab serve --workers 4`
- disaggregated: `tokenfab serve --prefill 1 --decode 3` (conditional: prompts missing fewer
  than `--disagg-min-uncached` tokens, here every chat turn, prefill on their decode worker)

Workload (open loop, reproducible from `--seed`, sent by `tokenfab.bench.runner.run_load`):
steady decode-heavy chat (Poisson `--chat-rate` req/s, `--chat-input` prompt tokens,
`--chat-output` output tokens) plus every `--burst-every` s a burst of `--burst-size` long
prompts (`--long-input` tokens, `--long-output` output tokens), random ordinary tokens (no
prefix reuse), greedy, ignore_eos.

Prints per shape p50/p99 inter-token latency (every gap between streamed tokens of every
request), TTFT p50/p99 and goodput: completed requests per second whose TTFT is within
`--ttft-limit-ms` and whose mean inter-token time is within `--itl-limit-ms`
(`tokenfab.bench.metrics.Slo`). Goal: disaggregated ITL p99 <= 1/2 aggregated at equal or
better goodput.

    .venv/bin/python benchmarks/disagg.py [--duration 60] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peers  # noqa: E402

SHAPES = {
    "aggregated": ["--workers", "4"],
    "disaggregated": ["--prefill", "1", "--decode", "3"],
}


def workload(pool: list[int], args: argparse.Namespace) -> list:
    """Chat arrivals (Poisson) merged with bursts of long prompts, sorted by arrival."""
    from tokenfab.bench.workload import RequestSpec, random_prompt

    rng = random.Random(args.seed)
    timed: list[tuple[float, list[int], int]] = []
    t = rng.expovariate(args.chat_rate)
    while t < args.duration:
        timed.append((t, random_prompt(pool, args.chat_input, rng), args.chat_output))
        t += rng.expovariate(args.chat_rate)
    burst = args.burst_every / 2
    while burst < args.duration:
        for _ in range(args.burst_size):
            timed.append((burst, random_prompt(pool, args.long_input, rng), args.long_output))
        burst += args.burst_every
    timed.sort(key=lambda x: x[0])
    return [RequestSpec(i, p, n, arrival=a) for i, (a, p, n) in enumerate(timed)]


def figures(results: list, duration_s: float, args: argparse.Namespace) -> dict:
    from tokenfab.bench.metrics import Distribution, Slo, summarize

    slo = Slo(ttft_ms=args.ttft_limit_ms, itl_ms=args.itl_limit_ms)
    s = summarize(results, duration_s, slo)
    chat = [r for r in results if r.ok and r.prompt_len == args.chat_input]
    chat_itl = Distribution.of([x for r in chat for x in r.itls], 1000)
    return {
        "itl_p50_ms": s.itl_ms.p50,
        "itl_p99_ms": s.itl_ms.p99,
        "chat_itl_p99_ms": chat_itl.p99,
        "ttft_p50_ms": s.ttft_ms.p50,
        "ttft_p99_ms": s.ttft_ms.p99,
        "goodput": s.goodput,
        "slo_attainment": s.slo_attainment,
        "request_throughput": s.request_throughput,
        "output_tok_s": s.output_token_throughput,
        "requests": s.requests,
        "failed": s.failed,
        "duration_s": s.duration_s,
        "errors": s.errors,
    }


async def drive(url: str, model_id: str, specs: list, args: argparse.Namespace) -> dict:
    from tokenfab.bench.client import ClientConfig
    from tokenfab.bench.runner import RunLimits, run_load
    from tokenfab.bench.workload import RequestSpec

    cfg = ClientConfig(base_url=url, model=model_id)
    # Warm-up (not measured): each worker's first steps of each shape compile/allocate.
    # Reversed prompts, so the measured requests find nothing of them cached.
    warm = [RequestSpec(i, s.prompt[::-1], 4) for i, s in enumerate(specs[:8])]
    await run_load(warm, cfg, RunLimits(concurrency=8, num_requests=len(warm)))
    out = await run_load(specs, cfg, RunLimits(num_requests=len(specs)))
    return figures(out.results, out.duration_s, args)


def run_shape(name: str, model: Path, specs: list, args: argparse.Namespace, logs: Path) -> dict:
    import httpx

    port = _peers.free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("tokenfab")
    cmd = [str(exe), "serve", "--model", str(model), "--port", str(port), *SHAPES[name],
           "--num-threads", str(args.threads), "--dtype", "bfloat16",
           "--max-model-len", str(args.max_model_len),
           "--disagg-min-uncached", str(args.disagg_min_uncached)]  # fmt: skip
    if args.step_budget:
        cmd += ["--max-num-batched-tokens", str(args.step_budget)]
    if args.decode_budget >= 0:  # only decode-role workers use it: none in the aggregated shape
        cmd += ["--decode-max-prefill-tokens", str(args.decode_budget)]
    _peers.log(f"{name}: starting ({_peers.machine_load()})")
    with _peers.server_process(cmd, dict(os.environ), url, logs / f"disagg-{name}.log"):
        model_id = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        result = asyncio.run(drive(url, model_id, specs, args))
    result["load_after"] = _peers.machine_load()
    _peers.log(f"{name}: {json.dumps(result)}")
    return result


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    a = doc["settings"]
    t = Table(
        title=f"4 engine processes, {a['duration']:.0f} s: chat {a['chat_rate']}/s "
        f"({a['chat_input']}->{a['chat_output']}), bursts of {a['burst_size']} x "
        f"{a['long_input']}->{a['long_output']} every {a['burst_every']} s; goodput limits "
        f"TTFT {a['ttft_limit_ms']:.0f} ms, ITL {a['itl_limit_ms']:.0f} ms"
    )
    cols = ("shape", "ITL p50", "ITL p99", "TTFT p50", "TTFT p99", "goodput/s", "req/s", "failed")
    for col in cols:
        t.add_column(col, justify="right")
    for name, r in doc["shapes"].items():
        t.add_row(
            name, f"{r['itl_p50_ms']:,.0f}", f"{r['itl_p99_ms']:,.0f}",
            f"{r['ttft_p50_ms']:,.0f}", f"{r['ttft_p99_ms']:,.0f}", f"{r['goodput']:.2f}",
            f"{r['request_throughput']:.2f}", str(r["failed"]),
        )  # fmt: skip
    Console(width=110).print(t)
    if "ratio" in doc:
        r = doc["ratio"]
        print(f"disaggregated / aggregated: ITL p99 {r['itl_p99']:.2f} (goal <= 0.5), "
              f"goodput {r['goodput']:.2f} (goal >= 1.0)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per shape")
    ap.add_argument("--chat-rate", type=float, default=1.5, help="chat requests/s (Poisson)")
    ap.add_argument("--chat-input", type=int, default=96)
    ap.add_argument("--chat-output", type=int, default=48)
    ap.add_argument("--burst-every", type=float, default=12.0, help="seconds between bursts")
    ap.add_argument("--burst-size", type=int, default=3, help="long prompts per burst")
    ap.add_argument("--long-input", type=int, default=1024)
    ap.add_argument("--long-output", type=int, default=8)
    ap.add_argument("--ttft-limit-ms", type=float, default=3000.0)
    ap.add_argument("--itl-limit-ms", type=float, default=150.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    ap.add_argument("--disagg-min-uncached", type=int, default=256)
    ap.add_argument(
        "--step-budget",
        type=int,
        default=0,
        help="serve --max-num-batched-tokens for every shape (0: the default, 2048)",
    )
    ap.add_argument(
        "--decode-budget",
        type=int,
        default=-1,
        help="serve --decode-max-prefill-tokens (0: no limit; default: serve's default)",
    )
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    if args.chat_input == args.long_input:
        ap.error("--chat-input and --long-input must differ (they tell the two kinds apart)")
    from tokenfab.bench.workload import token_pool_from_tokenizer
    from tokenfab.engine.model.loader import resolve_model

    model = resolve_model(None)
    specs = workload(token_pool_from_tokenizer(model), args)
    logs = Path(__file__).resolve().parent / "out"
    doc: dict = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "shapes": {}}
    for name in args.shapes.split(","):
        if name not in SHAPES:
            ap.error(f"unknown shape {name!r} (choose from {', '.join(SHAPES)})")
        doc["shapes"][name] = run_shape(name, model, specs, args, logs)
    agg, dis = doc["shapes"].get("aggregated"), doc["shapes"].get("disaggregated")
    if agg and dis and agg["itl_p99_ms"] and agg["goodput"]:
        doc["ratio"] = {
            "itl_p99": dis["itl_p99_ms"] / agg["itl_p99_ms"],
            "goodput": dis["goodput"] / agg["goodput"],
        }
    if args.json:
        print(json.dumps({**doc["shapes"], **{k: v for k, v in doc.items() if k != "shapes"}},
                         indent=2))  # fmt: skip
    else:
        print_table(doc)


if __name__ == "__main__":
    main()
