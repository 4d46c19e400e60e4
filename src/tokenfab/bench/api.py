"""`run_bench(BenchConfig)`: the load generator as a library (the CLI and benchmarks use it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tokenfab.bench.client import ClientConfig, list_models
from tokenfab.bench.metrics import RequestResult, Slo, Summary, summarize
from tokenfab.bench.runner import RunLimits, run_load
from tokenfab.bench.traces import load_trace, resolve_trace
from tokenfab.bench.workload import (
    RequestSpec,
    TraceSynthesis,
    fallback_token_pool,
    poisson_arrivals,
    synthetic_requests,
    token_pool_from_tokenizer,
    trace_requests,
)

DEFAULT_SYNTHETIC_REQUESTS = 100


@dataclass(frozen=True)
class BenchConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    tokenizer: str | None = None  # folder whose vocabulary prompts are drawn from
    concurrency: int | None = None  # closed loop, or the in-flight cap with rate/trace
    rate: float | None = None  # Poisson arrivals, requests/s
    trace: str | None = None  # bundled name or file
    trace_format: str = "auto"
    synth: TraceSynthesis = field(default_factory=TraceSynthesis)
    input_len: int = 256
    output_len: int = 128
    ignore_eos: bool = True
    num_requests: int | None = None
    duration_s: float | None = None
    warmup: int = 0
    slo: Slo = field(default_factory=Slo)
    seed: int = 0
    timeout_s: float = 600.0

    @property
    def mode(self) -> str:
        if self.trace:
            return "trace"
        return "rate" if self.rate else "concurrency"


@dataclass
class BenchResult:
    config: BenchConfig
    model: str
    summary: Summary
    results: list[RequestResult]

    def config_dict(self) -> dict:
        d = dataclasses.asdict(self.config)
        d["model"] = self.model
        d["mode"] = self.config.mode
        d.pop("api_key", None)
        return d


def token_pool(cfg: BenchConfig, model: str) -> list[int]:
    source = cfg.tokenizer or (model if Path(model).is_dir() else None)
    return token_pool_from_tokenizer(source) if source else fallback_token_pool()


def build_specs(cfg: BenchConfig, pool: list[int]) -> tuple[Iterator[RequestSpec], int | None]:
    """The request stream and its length (None: endless synthetic stream)."""
    total: int | None = None
    if cfg.trace:
        rows = load_trace(resolve_trace(cfg.trace), cfg.trace_format)
        specs = trace_requests(rows, pool, cfg.synth)
        total = len(rows)
    else:
        specs = synthetic_requests(pool, cfg.input_len, cfg.output_len, cfg.seed)
    if cfg.rate:
        specs = poisson_arrivals(specs, cfg.rate, cfg.seed)
    return specs, total


def run_limits(cfg: BenchConfig, available: int | None) -> RunLimits:
    """Bounds of the measured run: --num-requests, else the whole trace, else (without
    --duration) DEFAULT_SYNTHETIC_REQUESTS."""
    n = cfg.num_requests
    if available is not None:
        n = min(n, available) if n else available
    elif n is None and cfg.duration_s is None:
        n = DEFAULT_SYNTHETIC_REQUESTS
    concurrency = cfg.concurrency if (cfg.concurrency or cfg.trace or cfg.rate) else 1
    return RunLimits(concurrency=concurrency, num_requests=n, duration_s=cfg.duration_s)


async def resolve_model_name(cfg: BenchConfig) -> str:
    if cfg.model:
        return cfg.model
    client_cfg = ClientConfig(cfg.url, "", cfg.api_key)
    async with httpx.AsyncClient(timeout=30.0) as client:
        models = await list_models(client, client_cfg)
    if not models:
        raise ValueError(f"{cfg.url} lists no models; pass --model")
    return models[0]


async def run_bench(
    cfg: BenchConfig,
    on_done: Callable[[RequestResult], None] | None = None,
    on_phase: Callable[[str, int | None], None] | None = None,
) -> BenchResult:
    """Warm up (uncounted), then run the measured load. `on_phase(name, total)` announces
    "warmup" and "measure" so a progress bar can reset."""
    model = await resolve_model_name(cfg)
    pool = token_pool(cfg, model)
    client_cfg = ClientConfig(
        cfg.url, model, cfg.api_key, ignore_eos=cfg.ignore_eos, timeout_s=cfg.timeout_s
    )
    specs, available = build_specs(cfg, pool)
    limits = run_limits(cfg, available)
    if cfg.warmup > 0:
        if on_phase:
            on_phase("warmup", cfg.warmup)
        warm = synthetic_requests(pool, cfg.input_len, cfg.output_len, cfg.seed + 1)
        warm_limits = RunLimits(
            concurrency=min(cfg.warmup, limits.concurrency or 8), num_requests=cfg.warmup
        )
        await run_load(warm, client_cfg, warm_limits, on_done)
    if on_phase:
        on_phase("measure", limits.num_requests)
    outcome = await run_load(specs, client_cfg, limits, on_done)
    summary = summarize(outcome.results, outcome.duration_s, cfg.slo)
    return BenchResult(cfg, model, summary, outcome.results)
