"""The planner against the best static split, on traffic whose mix shifts.

Four engine processes (`tokenfab serve --prefill P --decode D`, the default model,
`--num-threads 1`) serve a trace in two phases: first the Azure conversation trace (chat:
prompts ~1k tokens, ~130 generated at full scale), then the Azure code trace (prompts ~1.5k,
~13 generated: prefill-heavy). Each phase takes its trace's first rows in order, their gaps
compressed to `--chat-rate` / `--code-rate` requests/s (the trace's burstiness is kept), and
token counts scaled for a CPU (`--chat-len-scale`, `--code-out-scale`, ...). Prompts are random tokens (the
Azure traces carry no prefix hashes), greedy, ignore_eos.

Runs, each on a fresh server:
1. every static split in `--splits` on the whole trace;
2. the split with the best goodput on the FIRST phase (what an operator who sized the
   deployment for the traffic before the shift would run) is the baseline;
3. `tokenfab serve --planner` started from that split, on the same trace.

Goodput: completed requests per second within `--ttft-limit-ms` and `--itl-limit-ms` (mean
inter-token time of the request; `tokenfab.bench.metrics.Slo`); the planner gets the same
limits as its targets. Pool sizes over time are sampled from the server's /metrics
(`tokenfab_planner_workers`) every second; moves are the planner's logged decisions.
Goal: planner goodput >= 1.2x the best first-phase static split.

    .venv/bin/python benchmarks/planner.py [--phase-seconds 90] [--plot out.png] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peers  # noqa: E402

TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
PHASES = ("chat", "code")


@dataclass(frozen=True)
class Phase:
    name: str
    trace: Path
    rate: float
    len_scale: float
    out_scale: float


def phase_specs(phase: Phase, start_s: float, first_index: int, pool: list[int], args) -> list:
    """The phase's requests: its trace's first rows, gaps scaled to the phase's rate."""
    from tokenfab.bench.traces import load_azure
    from tokenfab.bench.workload import RequestSpec, random_prompt

    rows = load_azure(phase.trace)
    n = max(1, round(phase.rate * args.phase_seconds))
    if len(rows) <= n:
        raise SystemExit(f"{phase.trace.name} has {len(rows)} rows; the phase needs {n + 1}")
    span = rows[n].timestamp_s - rows[0].timestamp_s
    squeeze = args.phase_seconds / span
    rng = random.Random(f"{args.seed}-{phase.name}")
    out = []
    for i, row in enumerate(rows[:n]):
        inp = min(args.max_input, max(16, round(row.input_len * phase.len_scale)))
        gen = min(args.max_output, max(2, round(row.output_len * phase.out_scale)))
        at = start_s + (row.timestamp_s - rows[0].timestamp_s) * squeeze
        out.append(RequestSpec(first_index + i, random_prompt(pool, inp, rng), gen, arrival=at))
    return out


def workload(pool: list[int], args) -> tuple[list, int]:
    """Both phases back to back; also the number of first-phase requests."""
    chat = Phase("chat", TRACES / "AzureLLMInferenceTrace_conv.csv", args.chat_rate,
                 args.chat_len_scale, args.chat_out_scale)  # fmt: skip
    code = Phase("code", TRACES / "AzureLLMInferenceTrace_code.csv", args.code_rate,
                 args.code_len_scale, args.code_out_scale)  # fmt: skip
    first = phase_specs(chat, 0.0, 0, pool, args)
    second = phase_specs(code, args.phase_seconds, len(first), pool, args)
    return first + second, len(first)


def goodput(results: list, seconds: float, args) -> dict:
    from tokenfab.bench.metrics import Distribution, Slo

    slo = Slo(ttft_ms=args.ttft_limit_ms, itl_ms=args.itl_limit_ms)
    good = sum(1 for r in results if slo.met_by(r))
    ok = [r for r in results if r.ok]
    ttft = Distribution.of([r.ttft for r in ok if r.ttft is not None], 1000)
    tpot = Distribution.of([r.tpot for r in ok if r.tpot is not None], 1000)
    return {
        "goodput": good / seconds,
        "slo_attainment": good / len(results) if results else 0.0,
        "requests": len(results),
        "failed": len(results) - len(ok),
        # which limit the misses broke: TTFT (prefill pool, queues) or the mean ITL (decode)
        "ttft_p50_ms": ttft.p50,
        "ttft_p90_ms": ttft.p90,
        "tpot_p50_ms": tpot.p50,
        "tpot_p90_ms": tpot.p90,
    }


def figures(results: list, n_first: int, args) -> dict:
    """Goodput per phase and over the run. Each phase's requests count against its own
    length of arrivals, so a backlog that spills past the phase costs goodput, not time."""
    from tokenfab.bench.metrics import Distribution

    first = [r for r in results if r.index < n_first]
    second = [r for r in results if r.index >= n_first]
    ok = [r for r in results if r.ok]
    return {
        **goodput(results, 2 * args.phase_seconds, args),
        "phases": {
            "chat": goodput(first, args.phase_seconds, args),
            "code": goodput(second, args.phase_seconds, args),
        },
        "ttft_p50_ms": Distribution.of([r.ttft for r in ok if r.ttft], 1000).p50,
        "ttft_p90_ms": Distribution.of([r.ttft for r in ok if r.ttft], 1000).p90,
        "itl_p50_ms": Distribution.of([x for r in ok for x in r.itls], 1000).p50,
        "itl_p90_ms": Distribution.of([x for r in ok for x in r.itls], 1000).p90,
    }


def pool_sizes(text: str) -> tuple[int, int] | None:
    """(prefill, decode) from the planner's gauges on a /metrics page (None: no planner)."""
    from prometheus_client.parser import text_string_to_metric_families

    sizes: dict[str, int] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "tokenfab_planner_workers":
            for s in fam.samples:
                sizes[s.labels["role"]] = int(s.value)
    if "prefill" not in sizes or "decode" not in sizes:
        return None
    return sizes["prefill"], sizes["decode"]


async def sample_pools(url: str, t0: float, out: list, stop: asyncio.Event) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=5) as client:
        while not stop.is_set():
            try:
                sizes = pool_sizes((await client.get(url + "/metrics")).text)
            except httpx.HTTPError:
                sizes = None
            if sizes is not None:
                out.append((round(time.monotonic() - t0, 1), *sizes))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)


async def drive(url: str, model_id: str, specs: list, args) -> tuple[list, list]:
    from tokenfab.bench.client import ClientConfig
    from tokenfab.bench.runner import RunLimits, run_load
    from tokenfab.bench.workload import RequestSpec

    cfg = ClientConfig(base_url=url, model=model_id)
    # Warm-up (not measured): reversed prompts, so the measured ones find nothing cached.
    warm = [RequestSpec(i, s.prompt[::-1], 4) for i, s in enumerate(specs[:8])]
    await run_load(warm, cfg, RunLimits(concurrency=8, num_requests=len(warm)))
    pools: list = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_pools(url, time.monotonic(), pools, stop))
    out = await run_load(specs, cfg, RunLimits(num_requests=len(specs)))
    stop.set()
    await sampler
    return out.results, pools


def moves(log_path: Path) -> list[dict]:
    """The planner's move decisions from the server's log (one JSON object per line)."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        head, sep, body = line.partition("planner decision ")
        if not sep:
            continue
        try:
            d = json.loads(body)
        except json.JSONDecodeError:
            continue
        if d.get("kind") == "move":
            out.append({"worker": d["worker"], "from": d["from"], "to": d["to"],
                        "reason": d["reason"]})  # fmt: skip
    return out


def run(split: tuple[int, int], planner: bool, model: Path, specs: list, n_first: int, args,
        logs: Path) -> dict:  # fmt: skip
    import httpx

    name = ("planner-from-" if planner else "static-") + f"{split[0]}p{split[1]}d"
    port = _peers.free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("tokenfab")
    cmd = [str(exe), "serve", "--model", str(model), "--port", str(port),
           "--prefill", str(split[0]), "--decode", str(split[1]),
           "--num-threads", str(args.threads), "--dtype", "bfloat16",
           "--max-model-len", str(args.max_model_len),
           "--disagg-min-uncached", str(args.disagg_min_uncached),
           "--max-num-seqs", str(args.max_num_seqs)]  # fmt: skip
    if planner:
        cmd += ["--planner", "--ttft-ms", str(args.ttft_limit_ms),
                "--itl-ms", str(args.itl_limit_ms),
                "--prefill-tps", str(args.prefill_tps), "--decode-tps", str(args.decode_tps),
                "--planner-interval", str(args.interval),
                "--planner-cooldown", str(args.cooldown)]  # fmt: skip
    log_path = logs / f"planner-{name}.log"
    _peers.log(f"{name}: starting ({_peers.machine_load()})")
    with _peers.server_process(cmd, dict(os.environ), url, log_path):
        model_id = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        results, pools = asyncio.run(drive(url, model_id, specs, args))
    doc = {"split": list(split), "planner": planner, **figures(results, n_first, args)}
    if planner:
        doc["moves"] = moves(log_path)
        doc["pools"] = pools
    doc["load_after"] = _peers.machine_load()
    _peers.log(f"{name}: goodput {doc['goodput']:.3f}/s "
               f"(chat {doc['phases']['chat']['goodput']:.3f}, "
               f"code {doc['phases']['code']['goodput']:.3f})")  # fmt: skip
    return doc


def parse_split(text: str) -> tuple[int, int]:
    p, _, d = text.partition(":")
    try:
        split = int(p), int(d)
    except ValueError:
        raise SystemExit(f"split {text!r} is not P:D (e.g. 1:3)") from None
    if min(split) < 1:
        raise SystemExit(f"split {text!r} needs at least one worker of each role")
    return split


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    pools = doc["planner"].get("pools") or []
    if pools:
        t = [p[0] for p in pools]
        ax.step(t, [p[1] for p in pools], where="post", label="planner: prefill workers")
        ax.step(t, [p[2] for p in pools], where="post", label="planner: decode workers")
    p, d = doc["static"]["split"]
    ax.axhline(p, ls="--", color="C0", alpha=0.5, label=f"static: {p} prefill")
    ax.axhline(d, ls="--", color="C1", alpha=0.5, label=f"static: {d} decode")
    ax.axvline(doc["settings"]["phase_seconds"], color="grey", lw=0.8)
    ax.set_xlabel("seconds (chat phase, then code phase)")
    ax.set_ylabel("workers")
    ax.set_ylim(0, p + d + 0.5)
    g = doc["planner"]["goodput"] / max(doc["static"]["goodput"], 1e-9)
    ax.set_title(f"Pool sizes: planner goodput {g:.2f}x the best first-phase static split")
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = doc["settings"]
    t = Table(title=f"4 workers, {s['phase_seconds']:.0f} s chat ({s['chat_rate']}/s) then "
                    f"{s['phase_seconds']:.0f} s code ({s['code_rate']}/s); goodput within "
                    f"TTFT {s['ttft_limit_ms']:.0f} ms, ITL {s['itl_limit_ms']:.0f} ms")  # fmt: skip
    cols = ("run", "goodput/s", "chat phase", "code phase", "chat TTFT/TPOT p90",
            "code TTFT/TPOT p90", "failed")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right")
    for r in doc["runs"]:
        name = ("planner from " if r["planner"] else "static ") + "{}:{}".format(*r["split"])
        ph = r["phases"]
        t.add_row(name, f"{r['goodput']:.3f}", f"{ph['chat']['goodput']:.3f}",
                  f"{ph['code']['goodput']:.3f}",
                  f"{ph['chat']['ttft_p90_ms']:,.0f} / {ph['chat']['tpot_p90_ms']:,.0f} ms",
                  f"{ph['code']['ttft_p90_ms']:,.0f} / {ph['code']['tpot_p90_ms']:,.0f} ms",
                  str(r["failed"]))  # fmt: skip
    Console(width=110).print(t)
    print(f"planner / best first-phase static ({doc['static']['split'][0]}:"
          f"{doc['static']['split'][1]}): goodput {doc['ratio']:.2f}x (goal >= 1.2); "
          f"{len(doc['planner']['moves'])} moves")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--phase-seconds", type=float, default=90.0, help="seconds of each phase")
    ap.add_argument("--chat-rate", type=float, default=1.5, help="chat phase requests/s")
    ap.add_argument("--code-rate", type=float, default=1.0, help="code phase requests/s")
    ap.add_argument("--chat-len-scale", type=float, default=0.125, help="chat prompt tokens x")
    ap.add_argument("--chat-out-scale", type=float, default=0.5, help="chat output tokens x")
    ap.add_argument("--code-len-scale", type=float, default=0.125, help="code prompt tokens x")
    ap.add_argument("--code-out-scale", type=float, default=0.5, help="code output tokens x")
    ap.add_argument("--max-input", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=128)
    ap.add_argument("--splits", default="1:3,2:2,3:1", help="static P:D splits to try")
    ap.add_argument("--ttft-limit-ms", type=float, default=3000.0)
    ap.add_argument("--itl-limit-ms", type=float, default=200.0)
    ap.add_argument("--prefill-tps", type=float, default=450.0,
                    help="planner: prompt tokens/s one worker computes (measured here)")  # fmt: skip
    ap.add_argument("--decode-tps", type=float, default=80.0,
                    help="planner: output tokens/s one worker decodes (measured here)")  # fmt: skip
    ap.add_argument("--interval", type=float, default=5.0, help="planner interval, s")
    ap.add_argument("--cooldown", type=float, default=15.0, help="planner cooldown, s")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    ap.add_argument("--disagg-min-uncached", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=8,
                    help="sequences per engine: a decode worker's concurrency, bounded on a GPU "
                         "by its KV memory (what makes a chat phase need decode workers)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=None, help="write the pool sizes PNG here")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    splits = [parse_split(s) for s in args.splits.split(",")]
    from tokenfab.bench.workload import token_pool_from_tokenizer
    from tokenfab.engine.model.loader import resolve_model

    model = resolve_model(None)
    specs, n_first = workload(token_pool_from_tokenizer(model), args)
    logs = Path(__file__).resolve().parent / "out"
    logs.mkdir(exist_ok=True)
    runs = [run(s, False, model, specs, n_first, args, logs) for s in splits]
    best = max(runs, key=lambda r: r["phases"]["chat"]["goodput"])
    split = (best["split"][0], best["split"][1])
    planned = run(split, True, model, specs, n_first, args, logs)
    runs.append(planned)
    hindsight = max((r for r in runs if not r["planner"]), key=lambda r: r["goodput"])
    doc = {
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"
        },  # fmt: skip
        "static": {"goodput": best["goodput"], "split": best["split"]},
        "planner": {
            "goodput": planned["goodput"],
            "moves": planned["moves"],
            "pools": planned["pools"],
        },  # fmt: skip
        "best_static_in_hindsight": {"goodput": hindsight["goodput"], "split": hindsight["split"]},
        "ratio": planned["goodput"] / best["goodput"] if best["goodput"] else float("inf"),
        "runs": runs,
    }
    if args.plot:
        plot(doc, args.plot)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)


if __name__ == "__main__":
    main()
