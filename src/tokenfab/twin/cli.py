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
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run the twin and print TTFT / ITL / latency percentiles and throughput."""
    import itertools
    import json

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

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
    summary = summarize(records)
    if json_out:
        typer.echo(json.dumps(summary.as_dict()))
        return
    table = Table(title=f"twin: {workers} workers, {len(records)} requests")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.as_dict().items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
