"""The twin against reality on this machine: one trace through `tokenfab serve --workers 4`
(kv router, engine processes of the default model) and through `tokenfab twin` with a CPU
step-time profile and the same workers, KV blocks and batch limits.

1. Profile: `tokenfab twin profile --engines W` runs a synthetic grid of batch shapes (not the
   trace) in W engine processes at once, so the fit carries the contention of W engines
   sharing this machine's cores, and fits `LinearStepTime`.
2. Real: `tokenfab serve` replays the trace slice (Mooncake-format, scaled to the small model
   and time-compressed as `benchmarks/router.py` does) with `tokenfab.bench`.
3. Twin: the same request specs (same lengths, hash-id sharing and arrivals) through
   `Simulator` with the profile.

Prints TTFT p50/p90 and ITL p50/p90 of both and the twin's % error; `--json` prints
`{"errors_pct": {...}, "real": {...}, "twin": {...}, ...}`.

    PYTHONPATH=src .venv/bin/python benchmarks/twin_fidelity.py [--requests N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peers  # noqa: E402

KEYS = ("ttft_p50", "ttft_p90", "itl_p50", "itl_p90")


def synthesis(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from tokenfab.bench.workload import TraceSynthesis

    return TraceSynthesis(
        block_tokens=args.block_tokens,
        output_scale=args.output_scale,
        time_scale=args.time_scale,
        max_input_len=args.max_input_len,
        max_output_len=args.max_output_len,
    )


def profile(args: argparse.Namespace, out: Path) -> dict:
    exe = Path(sys.executable).with_name("tokenfab")
    cmd = [str(exe), "twin", "profile", "--engines", str(args.workers), "--dtype", "bfloat16",
           "--kv-blocks", str(args.kv_blocks), "--repeats", str(args.profile_repeats),
           "--out", str(out), "--json"]  # fmt: skip
    _peers.log(f"profile: {args.workers} engines on a synthetic grid ({_peers.machine_load()})")
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"profile failed:\n{r.stderr[-2000:]}")
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    _peers.log(f"profile: {json.dumps(doc)}")
    return doc


async def replay(url: str, model: Path, args: argparse.Namespace) -> dict:
    from tokenfab.bench.api import BenchConfig, run_bench

    cfg = BenchConfig(
        url=url,
        tokenizer=str(model),
        trace=args.trace,
        synth=synthesis(args),
        concurrency=args.max_in_flight,
        num_requests=args.requests,
        seed=args.seed,
    )
    s = (await run_bench(cfg)).summary
    return {
        "requests": s.requests,
        "failed": s.failed,
        "ttft_p50": s.ttft_ms.p50 / 1000,
        "ttft_p90": s.ttft_ms.p90 / 1000,
        "itl_p50": s.itl_ms.p50 / 1000,
        "itl_p90": s.itl_ms.p90 / 1000,
        "duration_s": s.duration_s,
    }


def real(model: Path, args: argparse.Namespace, logs: Path) -> dict:
    port = _peers.free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("tokenfab")
    cmd = [str(exe), "serve", "--model", str(model), "--port", str(port), "--workers",
           str(args.workers), "--router", "kv", "--max-model-len", str(args.max_model_len),
           "--dtype", "bfloat16", "--kv-blocks", str(args.kv_blocks),
           "--max-num-seqs", str(args.max_num_seqs)]  # fmt: skip
    _peers.log(f"real: serve --workers {args.workers} ({_peers.machine_load()})")
    with _peers.server_process(cmd, dict(os.environ), url, logs / "twin-fidelity-serve.log"):
        result = asyncio.run(replay(url, model, args))
    _peers.log(f"real: {json.dumps(result)}")
    return result


def twin(args: argparse.Namespace, profile_path: Path) -> dict:
    from tokenfab.bench.traces import load_trace, resolve_trace
    from tokenfab.bench.workload import fallback_token_pool, trace_requests
    from tokenfab.router import RouterConfig
    from tokenfab.twin.report import summarize
    from tokenfab.twin.sim import SimConfig, Simulator
    from tokenfab.twin.step_time import LinearStepTime

    rows = load_trace(resolve_trace(args.trace))[: args.requests]
    specs = list(trace_requests(rows, fallback_token_pool(), synthesis(args)))
    sim = Simulator(
        SimConfig(
            workers=args.workers,
            num_kv_blocks=args.kv_blocks,
            block_size=args.block_tokens,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            router=RouterConfig(policy="kv"),
        ),
        LinearStepTime.load(profile_path),
    )
    s = summarize(sim.run(specs))
    return {
        "requests": s.requests,
        "finished": s.finished,
        "ttft_p50": s.ttft_p50,
        "ttft_p90": s.ttft_p90,
        "itl_p50": s.itl_p50,
        "itl_p90": s.itl_p90,
        "virtual_s": s.virtual_seconds,
    }


def errors(real_: dict, twin_: dict) -> dict[str, float]:
    return {k: (twin_[k] - real_[k]) / real_[k] * 100 if real_[k] else float("nan") for k in KEYS}


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"twin fidelity: {doc['requests']} requests, {doc['workers']} workers")
    for col in ("metric", "real ms", "twin ms", "error %"):
        t.add_column(col, justify="right")
    for k in KEYS:
        t.add_row(
            k, f"{doc['real'][k] * 1000:.1f}", f"{doc['twin'][k] * 1000:.1f}",
            f"{doc['errors_pct'][k]:+.1f}",
        )  # fmt: skip
    Console().print(t)
    worst = max(abs(v) for v in doc["errors_pct"].values())
    print(f"worst |error| {worst:.1f}% (goal <= 15%: {'holds' if worst <= 15 else 'does not'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trace", default="/work/shared/data/traces/conversation_trace.jsonl")
    ap.add_argument("--requests", type=int, default=200, help="first N rows of the trace")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--block-tokens", type=int, default=16, help="tokens per trace hash id")
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--output-scale", type=float, default=0.05)
    ap.add_argument("--max-output-len", type=int, default=32)
    ap.add_argument("--time-scale", type=float, default=0.5, help="0.5 = twice as fast")
    ap.add_argument("--max-in-flight", type=int, default=256)
    ap.add_argument("--kv-blocks", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--profile-repeats", type=int, default=1)
    ap.add_argument("--profile", type=Path, default=None, help="reuse this profile JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    from tokenfab.engine.model.loader import resolve_model

    model = resolve_model(None)
    logs = Path(__file__).resolve().parent / "out"
    logs.mkdir(parents=True, exist_ok=True)
    profile_path = args.profile or logs / "twin-fidelity-profile.json"
    prof = None if args.profile else profile(args, profile_path)
    real_ = real(model, args, logs)
    twin_ = twin(args, profile_path)
    doc = {
        "errors_pct": errors(real_, twin_),
        "real": real_,
        "twin": twin_,
        "profile": prof,
        "trace": args.trace,
        "requests": args.requests,
        "workers": args.workers,
        "settings": {k: str(v) for k, v in vars(args).items() if k != "json"},
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)


if __name__ == "__main__":
    main()
