"""tokenfab's own engine on a GPU: offline throughput against transformers `generate` (and
vLLM where importable), decode step time against the memory-bandwidth bound, and greedy
equality with transformers on all four families.

Workload (issue 17): random-weight bfloat16 models built on the device, in the shapes of
SmolLM2-135M (64 and 512 requests) and Llama-3.2-1B (256 requests); 256 random prompt tokens
and 128 greedy output tokens per request (ignore_eos), the same prompts for every engine.
Equality: tiny random models of each family (llama3 RoPE, mistral's sliding window, qwen2's
biases, qwen3's q/k norms and head_dim 48), 20 prompts of 256 tokens, 128 greedy tokens, float32
(bfloat16 agreement is printed too, for information: rounding differences may flip near-ties).

    python benchmarks/gpu_engine.py [--json] [--only tokenfab,hf,vllm] [--no-equality]
    python benchmarks/gpu_engine.py --device cpu --tiny     # a smoke test without a GPU

Runs on whatever GPU torch sees; without one it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

COPY_BANDWIDTH = 4.3e12
"""Bytes/s a device-to-device copy reached on the H200 (read + written); the decode bound."""

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rope_scaling=None,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
    ),
    "tiny": {},  # tokenfab.engine.tools.tiny's llama (smoke tests)
}


@dataclass
class Workload:
    shape: str
    requests: int
    prompt_len: int = 256
    output_len: int = 128


WORKLOADS = [
    Workload("smollm2-135m", 64),
    Workload("smollm2-135m", 512),
    Workload("llama-3.2-1b", 256),
]
TINY_WORKLOADS = [Workload("tiny", 8, 32, 16)]


@dataclass
class RunResult:
    engine: str
    seconds: float
    output_tokens: int
    outputs: list[list[int]] = field(repr=False, default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=gen).tolist()


def build_model(root: Path, shape: str, device: str) -> Path:
    from tokenfab.engine.tools.tiny import make_tiny_model

    dtype = "float32" if shape == "tiny" else "bfloat16"
    return make_tiny_model(
        root / shape, "llama", seed=0, dtype=dtype, device=device, **SHAPES[shape]
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- engines


def run_tokenfab(
    path: Path,
    wl: Workload,
    device: str,
    dtype: str,
    prompts: list[list[int]] | None = None,
    profile: bool = False,
) -> RunResult:
    from tokenfab import LLM, SamplingParams

    n = wl.requests
    llm = LLM(
        model=str(path),
        dtype=dtype,
        device=device,
        max_num_seqs=max(256, n),
        # Several whole prompts per step: prefill runs as a few large batched steps.
        max_num_batched_tokens=max(2048, 64 * wl.prompt_len),
        kv_cache_memory_gb=8.0 if device.startswith("cuda") else 0.25,
    )
    engine = llm.engine
    vocab = engine.vocab_size
    step_times = _time_runner_steps(engine, device)
    # Warm-up on other prompts (no prefix-cache hits later) of the same batch size: compiles
    # the Triton kernels and captures the CUDA graph of this batch's bucket.
    warm = make_prompts(n, wl.prompt_len, vocab, seed=99)
    llm.generate(
        warm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False
    )
    step_times.clear()
    if prompts is None:
        prompts = make_prompts(n, wl.prompt_len, vocab, seed=1)
    params = SamplingParams(max_tokens=wl.output_len, temperature=0.0, ignore_eos=True)
    sync(device)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    sync(device)
    dt = time.perf_counter() - t
    tokens = [list(o.token_ids) for o in outs]
    decode = sorted(s for s, is_decode in step_times if is_decode)
    extra = {
        "steps": len(step_times),
        "runner_seconds": sum(s for s, _ in step_times),
        "decode_steps": len(decode),
        "decode_step_ms_median": 1e3 * decode[len(decode) // 2] if decode else None,
        "other_step_ms": [round(1e3 * s, 2) for s, is_decode in step_times if not is_decode],
    }
    if profile:
        extra["engine_profile"] = _profile_engine(llm, wl, vocab)
        extra["profile"] = _profile_steps(engine, wl, vocab, device)
    del llm, engine
    _free(device)
    return RunResult("tokenfab", dt, sum(map(len, tokens)), tokens, extra)


def _profile_engine(llm: Any, wl: Workload, vocab: int) -> str:
    """Python functions by own time over a short run of the whole batch (16 output tokens):
    where the engine's time outside the runner goes."""
    import cProfile
    import io
    import pstats

    from tokenfab import SamplingParams

    prompts = make_prompts(wl.requests, wl.prompt_len, vocab, seed=6)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prof = cProfile.Profile()
    prof.enable()
    llm.generate(prompts, params, use_tqdm=False)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    return out.getvalue()[-6000:]


def _profile_steps(engine: Any, wl: Workload, vocab: int, device: str) -> str:
    """CUDA kernel table of one prefill step (16 prompts) and one decode step of the whole
    batch, straight through the runner (after the timed run; its blocks are free again)."""
    from torch.profiler import ProfilerActivity, profile

    from tokenfab.engine.core.batch import SeqChunk, StepBatch

    bs = engine.runner.model_runner.block_size
    per_seq = -(-(wl.prompt_len + 1) // bs)
    n = min(wl.requests, engine.runner.model_runner.num_blocks // per_seq)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(n)]
    prompts = make_prompts(n, wl.prompt_len, vocab, seed=5)
    prefill = StepBatch([SeqChunk(p, 0, t, True) for p, t in zip(prompts, tables, strict=True)])
    decode = StepBatch([SeqChunk([5], wl.prompt_len, t, True) for t in tables])
    engine.runner.model_runner.execute(StepBatch(prefill.chunks[:16]))  # warm (same shapes)
    engine.runner.model_runner.execute(prefill)
    engine.runner.model_runner.execute(decode)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    text = []
    for name, batch in (
        ("prefill of 16 prompts", StepBatch(prefill.chunks[:16])),
        ("decode", decode),
    ):
        with profile(activities=acts) as prof:
            engine.runner.model_runner.execute(batch)
            sync(device)
        key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60)
        text.append(f"{name}, batch {len(batch.chunks)}:\n{table}")
    return "\n".join(text)


def _time_runner_steps(engine: Any, device: str) -> list[tuple[float, bool]]:
    """Wrap the engine's runner so each step's seconds (to the logits being ready) and whether
    it was decode-only are recorded; the list is returned and filled as steps run."""
    times: list[tuple[float, bool]] = []
    runner = engine.runner.model_runner
    execute = runner.execute

    def timed(batch: Any) -> torch.Tensor:
        t = time.perf_counter()
        out = execute(batch)
        sync(device)
        times.append((time.perf_counter() - t, all(len(c.token_ids) == 1 for c in batch.chunks)))
        return out

    runner.execute = timed
    return times


def run_hf(path: Path, wl: Workload, device: str, dtype: str) -> RunResult:
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    vocab = lm.config.vocab_size
    gen = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        warm = torch.tensor(make_prompts(4, wl.prompt_len, vocab, seed=99), device=device)
        lm.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, **gen)
        ids = torch.tensor(make_prompts(wl.requests, wl.prompt_len, vocab, seed=1), device=device)
        sync(device)
        t = time.perf_counter()
        out = lm.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=wl.output_len, **gen
        )
        sync(device)
        dt = time.perf_counter() - t
    tokens = out[:, ids.shape[1] :].tolist()
    del lm, out
    _free(device)
    return RunResult("hf", dt, sum(map(len, tokens)), tokens)


def run_vllm(path: Path, wl: Workload, device: str, dtype: str) -> RunResult | None:
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        return None
    llm = LLM(model=str(path), dtype=dtype, max_num_seqs=max(256, wl.requests), seed=0)
    vocab = SHAPES[wl.shape].get("vocab_size", 512)
    warm = [{"prompt_token_ids": p} for p in make_prompts(4, wl.prompt_len, vocab, seed=99)]
    llm.generate(
        warm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False
    )
    prompts = make_prompts(wl.requests, wl.prompt_len, vocab, seed=1)
    params = SamplingParams(max_tokens=wl.output_len, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    _free(device)
    return RunResult("vllm", dt, sum(map(len, tokens)), tokens)


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- decode bound


def decode_bound_ms(path: Path, wl: Workload) -> float:
    """Milliseconds to read every weight the decode step reads (all but the embedding table,
    unless tied to the head) plus the KV of `requests` sequences at their mean context, at
    the copy bandwidth."""
    from tokenfab.engine.model.model import load_model_config

    cfg = load_model_config(path, "bfloat16")
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    weights = 2 * (layers * per_layer + cfg.vocab_size * h)
    context = wl.prompt_len + wl.output_len / 2
    kv_bytes = wl.requests * context * 2 * layers * kv * 2
    return 1e3 * (weights + kv_bytes) / COPY_BANDWIDTH


# ---------------------------------------------------------------- equality


def equality(root: Path, device: str, tiny: bool) -> dict[str, dict[str, Any]]:
    """Per family: prompts whose greedy tokens equal transformers' (float32 and bfloat16)."""
    from tokenfab.engine.tools.tiny import TINY_FAMILIES, make_tiny_model

    n, plen, olen = (4, 32, 16) if tiny else (20, 256, 128)
    results: dict[str, dict[str, int]] = {}
    for family in TINY_FAMILIES:
        path = make_tiny_model(root / f"eq-{family}", family, seed=0)
        prompts = make_prompts(n, plen, 512, seed=7)
        row: dict[str, Any] = {"prompts": n}
        for dtype in ("float32", "bfloat16"):
            wl = Workload("tiny", n, plen, olen)
            try:
                ours = run_tokenfab(path, wl, device, dtype, prompts).outputs
                theirs = _hf_greedy(path, prompts, olen, device, dtype)
            except Exception as e:  # report it, go on with the other families
                row[f"{dtype}_error"] = f"{type(e).__name__}: {e}"[:2000]
                row[dtype] = -1
                continue
            row[dtype] = sum(a == b for a, b in zip(ours, theirs, strict=True))
        results[family] = row
    return results


def _hf_greedy(
    path: Path, prompts: list[list[int]], olen: int, device: str, dtype: str
) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        out = lm.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=olen,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].tolist()


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny model and workload (smoke test)")
    ap.add_argument("--only", default="tokenfab,hf,vllm")
    ap.add_argument("--no-equality", action="store_true")
    ap.add_argument(
        "--profile", action="store_true", help="kernel tables of one prefill and decode step"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON report instead of text")
    ap.add_argument("--json-out", type=Path, help="also write the JSON report here, as it grows")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_engine: torch sees no GPU here; nothing measured.")
        return 0
    device = args.device
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    engines = args.only.split(",")
    report: dict[str, Any] = {"device": gpu, "torch": torch.__version__, "workloads": []}

    def save() -> None:
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        built: dict[str, Path] = {}
        for wl in TINY_WORKLOADS if args.tiny else WORKLOADS:
            if wl.shape not in built:
                built[wl.shape] = build_model(root, wl.shape, device)
            row = run_workload(built[wl.shape], wl, device, engines, args.profile)
            report["workloads"].append(row)
            _print_workload(row, args.json)
            save()
        if not args.no_equality:
            report["equality"] = equality(root, device, args.tiny)
            _print_equality(report["equality"], args.json)
            save()
    if args.json:
        print(json.dumps(report))
    return 0


def run_workload(
    path: Path, wl: Workload, device: str, engines: list[str], profile: bool = False
) -> dict[str, Any]:
    dtype = "float32" if wl.shape == "tiny" else "bfloat16"
    runs = {
        "tokenfab": lambda *a: run_tokenfab(*a, profile=profile),
        "hf": run_hf,
        "vllm": run_vllm,
    }
    row: dict[str, Any] = {"shape": wl.shape, "requests": wl.requests, "engines": {}}
    results: dict[str, RunResult] = {}
    for name in engines:
        try:
            res = runs[name](path, wl, device, dtype)
        except Exception as e:  # one engine failing must not hide the others' figures
            row["engines"][name] = f"failed: {type(e).__name__}: {e}"[:2000]
            _free(device)
            continue
        if res is None:
            row["engines"][name] = "not importable"
            continue
        results[name] = res
        row["engines"][name] = {
            "seconds": round(res.seconds, 3),
            "out_tok_s": round(res.tok_s, 1),
            **res.extra,
        }
    if "tokenfab" in results:
        tf = results["tokenfab"]
        for name, res in results.items():
            if name != "tokenfab":
                row[f"tokenfab_over_{name}"] = round(tf.tok_s / res.tok_s, 2)
                same = sum(a == b for a, b in zip(tf.outputs, res.outputs, strict=True))
                row[f"same_outputs_as_{name}"] = f"{same}/{wl.requests}"
        row["decode_bound_ms"] = round(decode_bound_ms(path, wl), 3)
    return row


def _print_equality(eq: dict[str, dict[str, Any]], quiet: bool) -> None:
    if quiet:
        return
    print("greedy equality with transformers (prompts equal / prompts):")
    for family, r in eq.items():
        n = r["prompts"]
        print(f"  {family:8s} float32 {r['float32']}/{n}   bfloat16 {r['bfloat16']}/{n}")


def _print_workload(row: dict[str, Any], quiet: bool) -> None:
    if quiet:
        return
    print(f"{row['shape']}, {row['requests']} requests:")
    for name, r in row["engines"].items():
        if isinstance(r, str):
            print(f"  {name:9s} {r}")
            continue
        line = f"  {name:9s} {r['out_tok_s']:>10,.0f} out tok/s  ({r['seconds']:.2f} s)"
        if r.get("decode_step_ms_median") is not None:
            line += (
                f"  decode step {r['decode_step_ms_median']:.2f} ms (bound "
                f"{row['decode_bound_ms']:.2f} ms), {r['steps']} steps, runner "
                f"{r['runner_seconds']:.2f} s"
            )
        print(line)
    for k, v in row.items():
        if k.startswith(("tokenfab_over_", "same_outputs_")):
            print(f"  {k} {v}")
    tf = row["engines"].get("tokenfab")
    if isinstance(tf, dict):
        print(f"  tokenfab steps other than decode (ms): {tf.get('other_step_ms')}")
        if tf.get("profile"):
            print(tf["engine_profile"])
            print(tf["profile"])


if __name__ == "__main__":
    sys.exit(main())
