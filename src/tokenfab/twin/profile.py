"""`tokenfab twin profile`: fit a `LinearStepTime` from real engine steps on this machine.

A grid of batch shapes (prefill prompts of each size; decode batches of each size at each
context length) runs through a real `LLMEngine`; every step's wall time is recorded with the
batch's features (prefill tokens, decoding sequences, context tokens: the ones
`LinearStepTime.seconds` reads), and the four coefficients are fitted by non-negative least
squares. With `engines > 1` that many engine processes run the grid at once and all their steps
are pooled, so the profile sees the contention of that many engines sharing the cores (what a
`serve --workers N` deployment on the same machine sees when all its workers are busy).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenfab.engine.core.batch import StepBatch
from tokenfab.twin.step_time import LinearStepTime


@dataclass(frozen=True, slots=True)
class StepSample:
    prefill_tokens: int
    decode_seqs: int
    context_tokens: int
    seconds: float


@dataclass(frozen=True, slots=True)
class ProfileGrid:
    prefill_lens: tuple[int, ...] = (32, 128, 512)
    decode_batches: tuple[int, ...] = (1, 8, 32)
    context_lens: tuple[int, ...] = (64, 512)
    decode_steps: int = 6
    """Decode steps timed per (batch, context) point."""
    repeats: int = 2

    def __post_init__(self) -> None:
        for name in ("prefill_lens", "decode_batches", "context_lens"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ValueError(f"{name} needs at least one size, all >= 1")
        if self.decode_steps < 1 or self.repeats < 1:
            raise ValueError("decode_steps and repeats must be >= 1")


@dataclass(frozen=True, slots=True)
class Fit:
    step_time: LinearStepTime
    samples: int
    rel_rms_error: float
    """Root mean square of (predicted - measured) / measured over the samples."""
    mean_abs_error_pct: float


def features(batch: StepBatch) -> tuple[int, int, int]:
    """(prefill tokens, decoding sequences, context tokens), as `LinearStepTime.seconds`."""
    prefill = decode = context = 0
    for c in batch.chunks:
        n = len(c.token_ids)
        if n == 1:
            decode += 1
        else:
            prefill += n
        context += c.start_pos
    return prefill, decode, context


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0: drop the most negative coefficient and refit until none is
    (four unknowns, so this active-set loop ends in at most four rounds)."""
    free = list(range(a.shape[1]))
    x = np.zeros(a.shape[1])
    while free:
        sol, *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
        if (sol >= 0).all():
            x[:] = 0
            x[free] = sol
            return x
        free.pop(int(np.argmin(sol)))
    return x


def fit(samples: Sequence[StepSample]) -> Fit:
    """Fit the step-time coefficients; each sample weighted by 1 / its seconds, so the fit
    minimizes relative error (short decode steps matter as much as long prefills)."""
    if len(samples) < 4:
        raise ValueError(f"need at least 4 step samples to fit 4 coefficients, got {len(samples)}")
    a = np.array(
        [[1.0, s.prefill_tokens, s.decode_seqs, s.context_tokens] for s in samples], dtype=float
    )
    y = np.array([s.seconds for s in samples], dtype=float)
    w = 1.0 / np.maximum(y, 1e-6)
    x = _nnls(a * w[:, None], y * w)
    pred = a @ x
    rel = (pred - y) / np.maximum(y, 1e-9)
    return Fit(
        step_time=LinearStepTime(
            base_s=float(x[0]),
            per_prefill_token_s=float(x[1]),
            per_decode_seq_s=float(x[2]),
            per_context_token_s=float(x[3]),
        ),
        samples=len(samples),
        rel_rms_error=float(np.sqrt(np.mean(rel**2))),
        mean_abs_error_pct=float(np.mean(np.abs(rel)) * 100),
    )


@dataclass(frozen=True, slots=True)
class ProfileEngine:
    """The engine settings profiled (match them to the deployment the twin models)."""

    model: str | None = None
    dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int = 2048
    max_num_batched_tokens: int = 2048
    num_threads: int | None = None
    """None: the engine tunes its thread count while running, as `serve` does."""


def measure(
    settings: ProfileEngine, grid: ProfileGrid, seed: int = 0, start: Any = None
) -> list[StepSample]:
    """Run the grid through a real engine; return every step's features and wall seconds.
    `start`: a barrier all concurrent engines pass once loaded and warm, so their grids
    overlap (otherwise the first loaded would time steps with fewer neighbours busy)."""
    from tokenfab.config import EngineConfig
    from tokenfab.engine.engine import LLMEngine
    from tokenfab.protocol import GenerateRequest, SamplingParams

    engine = LLMEngine(
        EngineConfig(
            model=settings.model,
            dtype=settings.dtype,  # type: ignore[arg-type]
            block_size=settings.block_size,
            num_kv_blocks=settings.num_kv_blocks,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            num_threads=settings.num_threads,
            max_model_len=max(grid.prefill_lens + grid.context_lens) + grid.decode_steps + 16,
        )
    )
    engine.warm_up()
    if start is not None:
        start.wait()
    samples: list[StepSample] = []
    shape: list[tuple[int, int, int]] = []
    runner = engine.runner
    execute = runner.execute

    def shaped(sched):  # type: ignore[no-untyped-def]
        shape.append(features(sched.batch))
        return execute(sched)

    # The whole step is timed (scheduling, sampling, detokenizing: all a served step costs);
    # the runner is wrapped only to learn the step's batch shape.
    runner.execute = shaped  # type: ignore[method-assign]
    rng = random.Random(seed)
    vocab = engine.vocab_size
    ids = iter(range(1 << 30))

    def prompt(n: int) -> list[int]:
        # Random ids: no two prompts share a cached prefix, so every step computes its shape.
        return [rng.randrange(10, vocab) for _ in range(n)]

    def run(prompts: list[list[int]], max_tokens: int) -> None:
        for p in prompts:
            engine.add_request(
                GenerateRequest(
                    request_id=f"profile-{next(ids)}",
                    prompt_token_ids=p,
                    sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                )
            )
        while engine.has_unfinished():
            shape.clear()
            t0 = time.perf_counter()
            engine.step()
            seconds = time.perf_counter() - t0
            if shape:
                samples.append(StepSample(*shape[0], seconds))

    for _ in range(grid.repeats):
        for n in grid.prefill_lens:
            run([prompt(n)], 1)
        for ctx in grid.context_lens:
            for b in grid.decode_batches:
                # The batch shares all but its last few tokens, computed once beforehand, so
                # a large decode batch at a long context costs one prefill, not b of them
                # (decode attention still reads each sequence's whole context).
                common = prompt(max(ctx - 8, 1))
                run([common], 1)
                run([common + prompt(8) for _ in range(b)], grid.decode_steps)
    return samples


def _measure_in_child(args: tuple[ProfileEngine, ProfileGrid, int, Any]) -> list[StepSample]:
    return measure(*args)


def measure_concurrent(
    settings: ProfileEngine, grid: ProfileGrid, engines: int, seed: int = 0
) -> list[StepSample]:
    """`engines` processes run the grid at the same time (each its own engine); all steps."""
    if engines <= 1:
        return measure(settings, grid, seed)
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(engines) as pool:
        start = manager.Barrier(engines)
        jobs = [(settings, grid, seed + i, start) for i in range(engines)]
        parts = pool.map(_measure_in_child, jobs)
    return [s for part in parts for s in part]
