"""The KV-aware router against round-robin and random: the same trace replayed through
`tokenfab serve --workers 4 --router POLICY` (4 engine processes of the default model behind
one frontend), a fresh server per policy.

The trace is Mooncake-format (`timestamp, input_length, output_length, hash_ids`; default: the
bundled conversation excerpt). It is scaled to the model: each hash id becomes the same block of
`--block-tokens` tokens in every request that names it (so prefix sharing is kept exactly),
prompts are capped to fit the context, outputs scaled down, and arrival times compressed by
`--time-scale` so the machine is loaded. Per policy it prints TTFT p50/p99, output tokens/s,
the prefix-cache hit rate the engines measured, and the largest share of requests one worker
got.

    .venv/bin/python benchmarks/router.py [--trace PATH] [--requests N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peers  # noqa: E402

POLICIES = ("kv", "round_robin", "random")


def scrape(url: str) -> dict[str, dict[str, float]]:
    """Per-worker samples of the metrics this benchmark reads."""
    wanted = {
        "tokenfab_prefix_cache_queries_total",
        "tokenfab_prefix_cache_hits_total",
        "tokenfab_router_decisions_total",
    }
    out: dict[str, dict[str, float]] = {name: {} for name in wanted}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name in wanted and "worker" in s.labels:
                out[s.name][s.labels["worker"]] = s.value
    return out


async def replay(url: str, model: Path, args: argparse.Namespace) -> dict:
    from tokenfab.bench.api import BenchConfig, run_bench
    from tokenfab.bench.workload import TraceSynthesis

    synth = TraceSynthesis(
        block_tokens=args.block_tokens,
        output_scale=args.output_scale,
        time_scale=args.time_scale,
        max_input_len=args.max_input_len,
        max_output_len=args.max_output_len,
    )
    cfg = BenchConfig(
        url=url,
        tokenizer=str(model),
        trace=args.trace,
        synth=synth,
        concurrency=args.max_in_flight,
        num_requests=args.requests,
        seed=args.seed,
    )
    res = await run_bench(cfg)
    s = res.summary
    return {
        "requests": s.requests,
        "failed": s.failed,
        "ttft_p50_ms": s.ttft_ms.p50,
        "ttft_p99_ms": s.ttft_ms.p99,
        "tok_s": s.output_token_throughput,
        "duration_s": s.duration_s,
    }


def sampled_trace(args: argparse.Namespace, out_dir: Path) -> str:
    """The trace to replay: `--trace` as is, or with `--conversation-every K` only every K-th
    conversation (a conversation's turns share their hash ids after the first, system-prompt
    block), so a short replay keeps the trace's prefix reuse instead of the first minutes'."""
    if args.conversation_every <= 1:
        return args.trace
    from tokenfab.bench.traces import load_trace, resolve_trace

    rows = load_trace(resolve_trace(args.trace))
    keep = [r for r in rows if len(r.hash_ids) > 1 and r.hash_ids[1] % args.conversation_every == 0]
    path = out_dir / f"router-trace-every{args.conversation_every}.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in keep:
            row = {"timestamp": r.timestamp_s * 1000, "input_length": r.input_len,
                   "output_length": r.output_len, "hash_ids": list(r.hash_ids)}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return str(path)


def ideal_hit_rate(trace: str, limit: int) -> float:
    """Share of prompt blocks a single unlimited cache would already hold (the most any
    routing can reuse)."""
    from tokenfab.bench.traces import load_trace, resolve_trace

    seen: set[int] = set()
    hit = total = 0
    for r in load_trace(resolve_trace(trace))[:limit]:
        prefix = 0
        for h in r.hash_ids:
            if h not in seen:
                break
            prefix += 1
        hit += prefix
        total += len(r.hash_ids)
        seen.update(r.hash_ids)
    return hit / total if total else 0.0


def run_policy(policy: str, model: Path, args: argparse.Namespace, logs: Path) -> dict:
    port = _peers.free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("tokenfab")
    cmd = [str(exe), "serve", "--model", str(model), "--port", str(port), "--workers",
           str(args.workers), "--router", policy, "--max-model-len", str(args.max_model_len),
           "--dtype", "bfloat16", "--overlap-weight", str(args.overlap_weight)]  # fmt: skip
    _peers.log(f"{policy}: starting {args.workers} workers ({_peers.machine_load()})")
    import os

    with _peers.server_process(cmd, dict(os.environ), url, logs / f"router-{policy}.log"):
        result = asyncio.run(replay(url, model, args))
        m = scrape(url)
    queries = sum(m["tokenfab_prefix_cache_queries_total"].values())
    hits = sum(m["tokenfab_prefix_cache_hits_total"].values())
    decisions = m["tokenfab_router_decisions_total"]
    result["hit_rate"] = hits / queries if queries else 0.0
    result["max_share"] = max(decisions.values()) / sum(decisions.values()) if decisions else 0.0
    result["decisions"] = decisions
    result["load_after"] = _peers.machine_load()
    _peers.log(f"{policy}: {json.dumps({k: v for k, v in result.items() if k != 'decisions'})}")
    return result


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"router policies: {Path(doc['trace']).name} ({doc['requests']} requests, "
        f"{doc['ideal_hit_rate']:.0%} of blocks reusable)"
    )
    for col in ("policy", "TTFT p50 ms", "TTFT p99 ms", "out tok/s", "hit rate", "max share"):
        t.add_column(col, justify="right")
    for name, r in doc["policies"].items():
        t.add_row(
            name, f"{r['ttft_p50_ms']:,.0f}", f"{r['ttft_p99_ms']:,.0f}", f"{r['tok_s']:.1f}",
            f"{r['hit_rate']:.1%}", f"{r['max_share']:.1%}",
        )  # fmt: skip
    Console().print(t)
    kv, rr = doc["policies"].get("kv"), doc["policies"].get("round_robin")
    if kv and rr and rr["ttft_p50_ms"]:
        ratio = kv["ttft_p50_ms"] / rr["ttft_p50_ms"]
        print(f"kv TTFT p50 / round_robin: {ratio:.2f} (goal <= 0.5); "
              f"kv max share {kv['max_share']:.1%} (goal <= 35%)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trace", default="mooncake", help="Mooncake .jsonl (default: bundled)")
    ap.add_argument("--requests", type=int, default=300, help="first N rows of the trace")
    ap.add_argument(
        "--conversation-every", type=int, default=1,
        help="keep every K-th conversation of the trace (1: all rows)",
    )  # fmt: skip
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--block-tokens", type=int, default=16, help="tokens per trace hash id")
    ap.add_argument("--max-input-len", type=int, default=1536)
    ap.add_argument("--output-scale", type=float, default=0.05)
    ap.add_argument("--max-output-len", type=int, default=32)
    ap.add_argument("--time-scale", type=float, default=1.0, help="0.5 = twice as fast")
    ap.add_argument("--max-in-flight", type=int, default=64)
    ap.add_argument(
        "--overlap-weight", type=float, default=1.0,
        help="kv: weight of uncached prompt blocks against active blocks",
    )  # fmt: skip
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    from tokenfab.engine.model.loader import resolve_model

    model = resolve_model(None)
    logs = Path(__file__).resolve().parent / "out"
    args.trace = sampled_trace(args, logs)
    doc = {"trace": args.trace, "requests": args.requests, "workers": args.workers,
           "ideal_hit_rate": ideal_hit_rate(args.trace, args.requests),
           "settings": {k: v for k, v in vars(args).items() if k != "json"},
           "policies": {}}  # fmt: skip
    for policy in args.policies.split(","):
        doc["policies"][policy] = run_policy(policy, model, args, logs)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)


if __name__ == "__main__":
    main()
