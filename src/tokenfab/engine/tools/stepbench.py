"""Time ModelRunner steps: a batched decode and a chunked prefill.

    python -m tokenfab.engine.tools.stepbench [--model M] [--dtype bfloat16] [--batch 64] [--ctx 300]
        [--prefill 2048] [--prompt-len 256] [--threads 2] [--profile]

Prints milliseconds per step (median of the timed repeats) for each case.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenfab.engine.core.batch import SeqChunk, StepBatch
from tokenfab.engine.model.loader import load_model
from tokenfab.engine.model.runner import ModelRunner


def _timed(runner: ModelRunner, batch: StepBatch, repeats: int) -> str:
    """Median wall and process-CPU milliseconds per step (CPU time is less disturbed by other
    processes sharing the cores; with N threads it counts up to N x wall)."""
    runner.execute(batch)  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        runner.execute(batch)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return f"{statistics.median(wall) * 1000:.1f} ms/step wall, {statistics.median(cpu) * 1000:.1f} ms cpu"


def decode_batch(batch: int, ctx: int, block_size: int) -> StepBatch:
    per = -(-(ctx + 1) // block_size)
    return StepBatch(
        [
            SeqChunk([100 + i], ctx, list(range(i * per, (i + 1) * per)), sample=True)
            for i in range(batch)
        ]
    )


def prefill_batch(total: int, prompt_len: int, block_size: int) -> StepBatch:
    per = -(-prompt_len // block_size)
    n = total // prompt_len
    return StepBatch(
        [
            SeqChunk(
                [(7 * i + j) % 30000 + 10 for j in range(prompt_len)],
                0,
                list(range(i * per, (i + 1) * per)),
                sample=True,
            )
            for i in range(n)
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=300)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    loaded = load_model(args.model, dtype=args.dtype)
    bs = 16
    blocks = max(args.batch * -(-(args.ctx + 1) // bs), args.prefill // bs + 64)
    runner = ModelRunner(loaded, num_blocks=blocks, block_size=bs, num_threads=args.threads)
    dec = decode_batch(args.batch, args.ctx, bs)
    pre = prefill_batch(args.prefill, args.prompt_len, bs)
    print(f"model={loaded.name} dtype={args.dtype} threads={torch.get_num_threads()}")
    print(f"decode  batch={args.batch} ctx={args.ctx}: {_timed(runner, dec, args.repeats)}")
    print(
        f"prefill {len(pre.chunks)}x{args.prompt_len} tokens: "
        f"{_timed(runner, pre, max(1, args.repeats // 2))}"
    )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, b in (("decode", dec), ("prefill", pre)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runner.execute(b)
            print(f"--- {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
