"""`tokenfab twin`: replay a trace (or synthetic load) through the router and engine cores on a
virtual clock and report what the deployment would do. Heavy imports stay in the function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from tokenfab.bench.workload import RequestSpec
    from tokenfab.twin.sim import SimConfig
    from tokenfab.twin.step_time import LinearStepTime

app = typer.Typer(
    help="Replay a trace through the real router and schedulers on a virtual clock (the twin).",
    invoke_without_command=True,
    no_args_is_help=False,
    add_completion=False,
)


@app.callback(invoke_without_command=True)
def twin(
    ctx: typer.Context,
    trace: str | None = typer.Option(
        None,
        help="Mooncake jsonl or Azure csv trace: a path, or mooncake | azure-conv | azure-code.",
    ),
    workers: int = typer.Option(4, min=1, help="Aggregated engine workers (not with --disagg)."),
    profile: Path | None = typer.Option(
        None, help="Step-time profile JSON (LinearStepTime fields); default: built-in CPU guess."
    ),
    system: str | None = typer.Option(
        None,
        "--system",
        help="GPU system of the factory catalog (h100, h200, b200, gb200, mi300x, ...): step "
        "times, KV blocks, link, power and prices from the factory model. Needs --model.",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        help="With --system: a model the factory knows (e.g. llama-3.1-8b-instruct, "
        "deepseek-r1) or a path to its config.json.",
    ),
    tp: int = typer.Option(1, min=1, help="With --system: tensor-parallel GPUs per worker."),
    precision: str = typer.Option("fp8", help="With --system: bf16 | fp8 | fp4 | int4 weights."),
    backend: str | None = typer.Option(
        None, help="With --system: calibration of vllm | sglang | trtllm (default: their mean)."
    ),
    disagg: str | None = typer.Option(
        None,
        "--disagg",
        help="P:D prefill and decode workers (replaces --workers): prompts run on a prefill "
        "worker and their KV moves to a decode worker over --link-gbps.",
    ),
    link_gbps: float | None = typer.Option(
        None,
        help="KV link of a worker in GB/s (bytes, as the factory catalog's figures); default: "
        "the system's scale-out NIC per GPU x the GPUs the KV is split over, or 25 GB/s "
        "(a 200 Gb/s NIC) without --system.",
    ),
    kv_bytes_per_token: float | None = typer.Option(
        None,
        help="KV bytes one token stores (all layers); default: the --model's, or 23040 "
        "(SmolLM2-135M in bf16, the CPU default model) without --system.",
    ),
    planner: bool = typer.Option(
        False,
        "--planner",
        help="With --disagg: run the real planner every --planner-interval virtual seconds, "
        "moving workers between the pools (drain, then switch role).",
    ),
    planner_interval: float = typer.Option(10.0, help="Planner: virtual seconds between ticks."),
    planner_cooldown: float = typer.Option(30.0, help="Planner: seconds between two changes."),
    prefill_tps: float | None = typer.Option(
        None, help="Planner: prompt tokens/s of one worker (default: from the step-time model)."
    ),
    decode_tps: float | None = typer.Option(
        None, help="Planner: output tokens/s of one worker (default: from the step-time model)."
    ),
    ttft_ms: float = typer.Option(
        1000.0, help="TTFT limit, ms: goodput counts requests within it (and the planner's target)."
    ),
    itl_ms: float = typer.Option(
        100.0, help="Mean ITL limit, ms: goodput and the planner's target."
    ),
    requests: int = typer.Option(200, min=1, help="Requests to replay (first N of the trace)."),
    rate: float = typer.Option(4.0, help="Synthetic load without --trace: Poisson requests/s."),
    input_len: int = typer.Option(512, min=1, help="Synthetic prompt length."),
    output_len: int = typer.Option(64, min=1, help="Synthetic output length."),
    block_tokens: int = typer.Option(
        16, min=1, help="Tokens per KV block (and per trace hash id)."
    ),
    kv_blocks: int | None = typer.Option(
        None,
        min=1,
        help="KV blocks per worker (default: the factory's free HBM with --system, else 4096).",
    ),
    policy: str = typer.Option(
        "kv", help="Router policy: kv | round_robin | random | least_loaded."
    ),
    seed: int = typer.Option(0, help="Seed of the synthetic prompts and arrivals."),
    fast_decode: bool = typer.Option(
        False, help="Advance all-decode batches in closed form (large fleets; ~1% off per-step)."
    ),
    model_kind: str = typer.Option(
        "auto",
        help="Worker model: step (a real EngineCore per worker, step by step), fleet "
        "(twin/fleet.py: count-based workers, decode in closed form between batch changes; "
        "streamed percentiles) or auto (fleet above 100 workers; step with --disagg).",
    ),
    plot: Path | None = typer.Option(
        None, "--plot", help="PNG of pool sizes and latency over virtual time (step model)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run the twin and print TTFT / ITL / latency percentiles, goodput, throughput (per GPU,
    per MW and $ per Mtok with --system) and pool sizes over time."""
    if ctx.invoked_subcommand is not None:
        return
    import itertools

    from tokenfab.bench.traces import load_trace, resolve_trace
    from tokenfab.bench.workload import (
        TraceSynthesis,
        fallback_token_pool,
        poisson_arrivals,
        synthetic_requests,
        trace_requests,
    )
    from tokenfab.router import RouterConfig
    from tokenfab.twin.sim import SimConfig
    from tokenfab.twin.step_time import LinearStepTime

    try:
        if (system is None) != (model is None):
            raise ValueError("--system and --model go together (the factory's step times)")
        if planner and disagg is None:
            raise ValueError("--planner moves workers between pools: give --disagg P:D")
        pools = _parse_disagg(disagg) if disagg else None
        if system is not None and model is not None:
            from tokenfab.twin.factory_step import FactoryStepTime

            if profile is not None:
                raise ValueError("--profile and --system are two step-time models: pick one")
            step_time: LinearStepTime = FactoryStepTime.build(model, system, tp, precision, backend)
        else:
            step_time = LinearStepTime.load(profile) if profile else LinearStepTime()
        router = RouterConfig(policy=policy, seed=seed)  # type: ignore[arg-type]
        pool = fallback_token_pool()
        if trace:
            rows = load_trace(resolve_trace(trace))[:requests]
            specs = list(trace_requests(rows, pool, TraceSynthesis(block_tokens=block_tokens)))
        else:
            gen = synthetic_requests(pool, input_len, output_len, seed)
            specs = list(itertools.islice(poisson_arrivals(gen, rate, seed), requests))
        if model_kind not in ("auto", "step", "fleet"):
            raise ValueError(f"--model-kind must be auto, step or fleet, got {model_kind!r}")
        if pools is not None:
            workers = pools[0] + pools[1]
        blocks = kv_blocks or _default_kv_blocks(step_time, block_tokens)
        fleet = model_kind == "fleet" or (
            model_kind == "auto" and workers > 100 and pools is None and plot is None
        )
        if fleet and pools is not None:
            raise ValueError("--disagg runs on the step model (--model-kind step)")
        if fleet and plot is not None:
            raise ValueError("--plot needs per-request records: the step model")
    except (OSError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    config = SimConfig(
        workers=workers,
        num_kv_blocks=blocks,
        block_size=block_tokens,
        router=router,
        fast_decode=fast_decode,
    )
    gpus = workers * getattr(step_time, "num_gpus", 1)
    if fleet:
        _run_fleet(config, step_time, specs, json_out, system, gpus)
        return
    run = _Run(
        config=config,
        step_time=step_time,
        specs=specs,
        pools=pools,
        link_gbps=link_gbps,
        kv_bytes_per_token=kv_bytes_per_token,
        planner=planner,
        planner_interval=planner_interval,
        planner_cooldown=planner_cooldown,
        prefill_tps=prefill_tps,
        decode_tps=decode_tps,
        ttft_ms=ttft_ms,
        itl_ms=itl_ms,
    )
    try:
        sim = run.simulator()
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    records = _run_with_progress(sim, specs, json_out)
    doc = run.summary(sim, records, system, gpus)
    shape = f"{pools[0]}P:{pools[1]}D" if pools else f"{workers} workers"
    where = f" on {system} x{gpus} GPUs ({model}, tp{tp})" if system else ""
    title = f"twin: {shape}{where}, {len(records)} requests"
    if plot is not None:
        from tokenfab.twin.plot import plot_run

        plot_run(records, doc["pool_sizes"], plot, title)  # type: ignore[arg-type]
    _report(doc, title, json_out)


def _parse_disagg(text: str) -> tuple[int, int]:
    try:
        p, d = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--disagg takes P:D (e.g. 2:6), got {text!r}") from None
    if p < 1 or d < 1:
        raise ValueError(f"--disagg needs at least one worker of each role, got {text!r}")
    return p, d


def _default_kv_blocks(step_time: object, block_tokens: int) -> int:
    from tokenfab.twin.factory_step import FactoryStepTime

    if isinstance(step_time, FactoryStepTime):
        blocks = step_time.kv_blocks(block_tokens)
        if blocks <= 0:
            raise ValueError(
                "the model's weights leave no room for KV cache on one worker: raise --tp"
            )
        return blocks
    return 4096


DEFAULT_KV_BYTES_PER_TOKEN = 23040.0
"""SmolLM2-135M (the CPU default model) in bf16: 30 layers x 2 (K, V) x 3 KV heads x 64 x 2 B."""


@dataclass
class _Run:
    """One step-model run's setup and summary (aggregated, disaggregated, planned)."""

    config: SimConfig
    step_time: LinearStepTime
    specs: list[RequestSpec]
    pools: tuple[int, int] | None
    link_gbps: float | None
    kv_bytes_per_token: float | None
    planner: bool
    planner_interval: float
    planner_cooldown: float
    prefill_tps: float | None
    decode_tps: float | None
    ttft_ms: float
    itl_ms: float
    link_bytes_per_s: float = 0.0
    kv_bytes: float = 0.0

    def simulator(self):  # noqa: ANN201
        from tokenfab.planner.capacity import Capacity
        from tokenfab.planner.core import PlannerConfig
        from tokenfab.twin.pools import (
            DEFAULT_LINK_GBPS,
            PlannerSetup,
            PoolConfig,
            PoolSimulator,
            step_capacity,
        )
        from tokenfab.twin.sim import Simulator

        st, config = self.step_time, self.config
        if self.pools is None:
            return Simulator(config, st)
        link = self.link_gbps * 1e9 if self.link_gbps else None
        kv_bytes = self.kv_bytes_per_token
        if hasattr(st, "link_bytes_per_s"):
            link = link or st.link_bytes_per_s()
            kv_bytes = kv_bytes or st.kv_bytes_per_token()
        pools = PoolConfig(
            self.pools[0],
            self.pools[1],
            kv_bytes_per_token=kv_bytes or DEFAULT_KV_BYTES_PER_TOKEN,
            link_bytes_per_s=link or DEFAULT_LINK_GBPS * 1e9,
        )
        setup = None
        if self.planner:
            specs = self.specs
            mean_in = sum(len(s.prompt) for s in specs) / len(specs)
            mean_out = sum(s.max_tokens for s in specs) / len(specs)
            cap = step_capacity(st, config, int(mean_in + mean_out / 2), self.itl_ms)
            if self.prefill_tps or self.decode_tps:
                cap = Capacity(
                    self.prefill_tps or cap.prefill_tokens_per_s,
                    self.decode_tps or cap.decode_tokens_per_s,
                    source="given",
                )
            pc = PlannerConfig(
                ttft_ms=self.ttft_ms,
                itl_ms=self.itl_ms,
                budget=config.workers,
                interval_s=self.planner_interval,
                cooldown_s=self.planner_cooldown,
                fixed_fleet=True,
            )
            setup = PlannerSetup(pc, cap)
        self.link_bytes_per_s = pools.link_bytes_per_s
        self.kv_bytes = pools.kv_bytes_per_token
        return PoolSimulator(config, st, pools, setup)

    def summary(self, sim, records, system: str | None, gpus: int) -> dict[str, object]:  # noqa: ANN001
        from dataclasses import asdict

        from tokenfab.twin.pools import PoolSample, PoolSimulator
        from tokenfab.twin.report import economics_of, goodput, summarize

        base = summarize(records)
        doc: dict[str, object] = dict(base.as_dict())
        doc.update(goodput(records, self.ttft_ms, self.itl_ms).as_dict())
        if system is not None:
            doc.update(economics_of(base.output_tokens_per_s, gpus, system).as_dict())
        if isinstance(sim, PoolSimulator):
            doc["link_gbps"] = self.link_bytes_per_s / 1e9
            doc["kv_bytes_per_token"] = self.kv_bytes
            doc["remote_prefills"] = len(sim.transfers)
            if sim.transfers:
                waits = sorted(x.end - x.start for x in sim.transfers)
                doc["kv_transfer_p50"] = waits[len(waits) // 2]
            if sim.planner is not None:
                doc["planner_capacity"] = asdict(sim.planner.capacity)
                doc["planner_moves"] = [
                    {"t": t, "worker": d.worker_id, "from": d.from_role, "to": d.to_role}
                    for t, d in sim.planner_decisions
                    if d.kind == "move"
                ]
            samples = sim.pool_sizes
            end = max((r.finished or 0.0) for r in records) if records else 0.0
            if samples[-1].t < end:
                samples = [*samples, sim.sample_pools(end)]
            doc["pool_sizes"] = samples
        else:
            w = self.config.workers
            doc["pool_sizes"] = [PoolSample(0.0, 0, w, 0)]
        return doc


def _run_with_progress(sim, specs: list, json_out: bool) -> list:  # noqa: ANN001
    """`sim.run` under a rich progress bar over virtual time (off for --json or no TTY)."""
    from rich.console import Console
    from rich.progress import Progress

    horizon = max((s.arrival or 0.0) for s in specs)
    console = Console(stderr=True)
    with Progress(
        console=console, disable=json_out or not console.is_terminal, transient=True
    ) as bar:
        task = bar.add_task("virtual time", total=horizon or 1.0)
        return sim.run(specs, progress=lambda t: bar.update(task, completed=min(t, horizon)))


def _report(summary: dict[str, object], title: str, json_out: bool) -> None:
    """A run's summary as JSON or a table (both models); pool sizes as their own table."""
    import json
    from dataclasses import asdict, is_dataclass

    from rich.console import Console
    from rich.table import Table

    pools = summary.pop("pool_sizes", None)
    if json_out:
        if pools is not None:
            summary["pool_sizes"] = [asdict(p) if is_dataclass(p) else p for p in pools]  # type: ignore[union-attr, arg-type]
        typer.echo(json.dumps(summary))
        return
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key == "planner_capacity" and isinstance(value, dict):
            value = (
                f"prefill {value['prefill_tokens_per_s']:,.0f} tok/s, decode "
                f"{value['decode_tokens_per_s']:,.0f} tok/s per worker ({value['source']})"
            )
        elif key == "planner_moves" and isinstance(value, list):
            value = ", ".join(f"{m['t']:.0f}s {m['worker']} {m['from']}->{m['to']}" for m in value)
            value = value or "none"
        elif isinstance(value, list | dict):
            value = json.dumps(value)
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    if pools and len(pools) > 1:
        sizes = Table(title="pool sizes over virtual time (changes)")
        for col in ("t (s)", "prefill", "decode", "draining"):
            sizes.add_column(col, justify="right")
        last = None
        for p in pools:
            row = (p.prefill, p.decode, p.draining)
            if row != last:
                sizes.add_row(f"{p.t:.1f}", *(str(x) for x in row))
                last = row
        console.print(sizes)


def _run_fleet(
    config: object,
    step_time: object,
    specs: list,
    json_out: bool,
    system: str | None = None,
    gpus: int = 0,
) -> None:
    """The fleet model's run and summary (same keys as the step model's)."""

    from rich.console import Console
    from rich.progress import Progress

    from tokenfab.twin.fleet import FleetRequest, FleetSimulator, summarize_fleet
    from tokenfab.twin.report import economics_of
    from tokenfab.twin.sim import SimConfig
    from tokenfab.twin.step_time import LinearStepTime

    assert isinstance(config, SimConfig) and isinstance(step_time, LinearStepTime)
    sim = FleetSimulator(config, step_time)
    requests = [FleetRequest.from_spec(s, config.block_size) for s in specs]
    horizon = max((r.arrival for r in requests), default=0.0)
    console = Console(stderr=True)
    with Progress(
        console=console, disable=json_out or not console.is_terminal, transient=True
    ) as bar:
        task = bar.add_task("virtual time", total=horizon or 1.0)
        stats = sim.run(requests, progress=lambda t: bar.update(task, completed=min(t, horizon)))
    title = f"twin (fleet model): {config.workers} workers, {stats.requests} requests"
    summary = summarize_fleet(stats)
    doc: dict[str, object] = dict(summary.as_dict())
    if system is not None:
        doc.update(economics_of(summary.output_tokens_per_s, gpus, system).as_dict())
    _report(doc, title, json_out)


def _sizes(text: str, name: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{name}: comma-separated integers, got {text!r}") from None
    return sizes


@app.command("profile")
def profile(
    model: str | None = typer.Option(
        None, "--model", "-m", help="HF model folder or .gguf (default: SmolLM2-135M-Instruct)."
    ),
    out: Path = typer.Option(Path("twin-profile.json"), "--out", "-o", help="Profile JSON."),
    engines: int = typer.Option(
        1,
        min=1,
        help="Engine processes running the grid at once (match `serve --workers` to measure "
        "the contention of that many engines on this machine's cores).",
    ),
    prefill_lens: str = typer.Option("32,128,512", help="Prefill prompt lengths."),
    decode_batches: str = typer.Option("1,8,32", help="Decode batch sizes."),
    context_lens: str = typer.Option("64,512", help="Context lengths of the decode batches."),
    decode_steps: int = typer.Option(6, min=1, help="Decode steps per (batch, context) point."),
    repeats: int = typer.Option(2, min=1, help="Times the whole grid runs."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 (as serve)."),
    block_size: int = typer.Option(16, min=1, help="Tokens per KV block."),
    kv_blocks: int = typer.Option(2048, min=1, help="KV blocks of the profiled engine."),
    max_num_batched_tokens: int = typer.Option(2048, min=1, help="Token budget of one step."),
    num_threads: int | None = typer.Option(
        None, help="Torch threads per engine (default: tuned while running, as serve)."
    ),
    seed: int = typer.Option(0, help="Seed of the random prompts."),
    json_out: bool = typer.Option(False, "--json", help="Print the fit as JSON."),
) -> None:
    """Fit a step-time profile (fixed + per prefill token + per decoding sequence + per
    context token) from real engine steps of a model on this machine; save it as JSON for
    `tokenfab twin --profile`."""
    import json
    from dataclasses import asdict

    from rich.console import Console

    from tokenfab.twin.profile import ProfileEngine, ProfileGrid, fit, measure_concurrent

    try:
        grid = ProfileGrid(
            prefill_lens=_sizes(prefill_lens, "--prefill-lens"),
            decode_batches=_sizes(decode_batches, "--decode-batches"),
            context_lens=_sizes(context_lens, "--context-lens"),
            decode_steps=decode_steps,
            repeats=repeats,
        )
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    settings = ProfileEngine(
        model=model,
        dtype=dtype,
        block_size=block_size,
        num_kv_blocks=kv_blocks,
        max_num_batched_tokens=max_num_batched_tokens,
        num_threads=num_threads,
    )
    console = Console(stderr=True)
    try:
        with console.status(f"profiling: {engines} engine(s) running the grid"):
            samples = measure_concurrent(settings, grid, engines, seed)
        result = fit(samples)
        out.parent.mkdir(parents=True, exist_ok=True)
        result.step_time.save(out)
    except (OSError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    doc = {
        "profile": asdict(result.step_time),
        "samples": result.samples,
        "rel_rms_error": result.rel_rms_error,
        "mean_abs_error_pct": result.mean_abs_error_pct,
        "engines": engines,
        "out": str(out),
    }
    if json_out:
        typer.echo(json.dumps(doc))
        return
    st = result.step_time
    typer.echo(
        f"step = {st.base_s * 1e3:.3f} ms + {st.per_prefill_token_s * 1e3:.4f} ms/prefill token"
        f" + {st.per_decode_seq_s * 1e3:.4f} ms/decoding seq"
        f" + {st.per_context_token_s * 1e6:.3f} us/context token"
    )
    typer.echo(
        f"fit over {result.samples} steps ({engines} engine(s)): relative RMS error "
        f"{result.rel_rms_error:.1%}, mean |error| {result.mean_abs_error_pct:.1f}%; saved {out}"
    )
