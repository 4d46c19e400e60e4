"""`tokenfab twin`: replay a trace (or synthetic load) through the router and engine cores on a
virtual clock and report what the deployment would do. Heavy imports stay in the function."""

from __future__ import annotations

from pathlib import Path

import typer

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
    workers: int = typer.Option(4, min=1, help="Aggregated engine workers."),
    profile: Path | None = typer.Option(
        None, help="Step-time profile JSON (LinearStepTime fields); default: built-in CPU guess."
    ),
    requests: int = typer.Option(200, min=1, help="Requests to replay (first N of the trace)."),
    rate: float = typer.Option(4.0, help="Synthetic load without --trace: Poisson requests/s."),
    input_len: int = typer.Option(512, min=1, help="Synthetic prompt length."),
    output_len: int = typer.Option(64, min=1, help="Synthetic output length."),
    block_tokens: int = typer.Option(
        16, min=1, help="Tokens per KV block (and per trace hash id)."
    ),
    kv_blocks: int = typer.Option(4096, min=1, help="KV blocks per worker."),
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
        "streamed percentiles) or auto (fleet above 100 workers).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run the twin and print TTFT / ITL / latency percentiles and throughput."""
    if ctx.invoked_subcommand is not None:
        return
    import itertools

    from rich.console import Console
    from rich.progress import Progress

    from tokenfab.bench.traces import load_trace, resolve_trace
    from tokenfab.bench.workload import (
        TraceSynthesis,
        fallback_token_pool,
        poisson_arrivals,
        synthetic_requests,
        trace_requests,
    )
    from tokenfab.router import RouterConfig
    from tokenfab.twin.report import summarize
    from tokenfab.twin.sim import SimConfig, Simulator
    from tokenfab.twin.step_time import LinearStepTime

    try:
        step_time = LinearStepTime.load(profile) if profile else LinearStepTime()
        router = RouterConfig(policy=policy, seed=seed)  # type: ignore[arg-type]
        pool = fallback_token_pool()
        if trace:
            rows = load_trace(resolve_trace(trace))[:requests]
            specs = list(trace_requests(rows, pool, TraceSynthesis(block_tokens=block_tokens)))
        else:
            gen = synthetic_requests(pool, input_len, output_len, seed)
            specs = list(itertools.islice(poisson_arrivals(gen, rate, seed), requests))
    except (OSError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if model_kind not in ("auto", "step", "fleet"):
        typer.echo(f"error: --model-kind must be auto, step or fleet, got {model_kind!r}", err=True)
        raise typer.Exit(2)
    fleet = model_kind == "fleet" or (model_kind == "auto" and workers > 100)
    config = SimConfig(
        workers=workers,
        num_kv_blocks=kv_blocks,
        block_size=block_tokens,
        router=router,
        fast_decode=fast_decode,
    )
    if fleet:
        _run_fleet(config, step_time, specs, json_out)
        return
    sim = Simulator(
        SimConfig(
            workers=workers,
            num_kv_blocks=kv_blocks,
            block_size=block_tokens,
            router=router,
            fast_decode=fast_decode,
        ),
        step_time,
    )
    horizon = max((s.arrival or 0.0) for s in specs)
    console = Console(stderr=True)
    with Progress(console=console, disable=json_out, transient=True) as bar:
        task = bar.add_task("virtual time", total=horizon or 1.0)
        records = sim.run(specs, progress=lambda t: bar.update(task, completed=min(t, horizon)))
    _report(
        summarize(records).as_dict(), f"twin: {workers} workers, {len(records)} requests", json_out
    )


def _report(summary: dict[str, object], title: str, json_out: bool) -> None:
    """A run's summary as JSON or a table (both models)."""
    import json

    from rich.console import Console
    from rich.table import Table

    if json_out:
        typer.echo(json.dumps(summary))
        return
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def _run_fleet(config: object, step_time: object, specs: list, json_out: bool) -> None:
    """The fleet model's run and summary (same keys as the step model's)."""

    from rich.console import Console
    from rich.progress import Progress

    from tokenfab.twin.fleet import FleetRequest, FleetSimulator, summarize_fleet
    from tokenfab.twin.sim import SimConfig
    from tokenfab.twin.step_time import LinearStepTime

    assert isinstance(config, SimConfig) and isinstance(step_time, LinearStepTime)
    sim = FleetSimulator(config, step_time)
    requests = [FleetRequest.from_spec(s, config.block_size) for s in specs]
    horizon = max((r.arrival for r in requests), default=0.0)
    with Progress(console=Console(stderr=True), disable=json_out, transient=True) as bar:
        task = bar.add_task("virtual time", total=horizon or 1.0)
        stats = sim.run(requests, progress=lambda t: bar.update(task, completed=min(t, horizon)))
    title = f"twin (fleet model): {config.workers} workers, {stats.requests} requests"
    _report(summarize_fleet(stats).as_dict(), title, json_out)


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
