"""`tokenfab planner`: move workers between the prefill and decode pools as traffic shifts."""

from __future__ import annotations

import typer


def planner(
    runtime: str = typer.Option(..., "--runtime", help="Runtime to join: nats://host:port."),
    ttft_ms: float = typer.Option(..., "--ttft-ms", help="Time-to-first-token target, ms."),
    itl_ms: float = typer.Option(..., "--itl-ms", help="Inter-token latency target, ms."),
    budget: int = typer.Option(None, help="Most workers in all (default: those running)."),
    namespace: str = typer.Option("default", help="Runtime namespace (one deployment)."),
    interval: float = typer.Option(10.0, help="Seconds between planning steps."),
    cooldown: float = typer.Option(30.0, help="Seconds between two changes."),
    prefill_tps: float = typer.Option(
        None, help="Prompt tokens/s one prefill worker sustains (measured on CPU)."
    ),
    decode_tps: float = typer.Option(
        None, help="Output tokens/s one decode worker sustains within --itl-ms."
    ),
    gpu_model: str = typer.Option(None, help="GPUs: plan with the factory model for this model"),
    gpu_system: str = typer.Option("h200", help="GPUs: the system (h100, h200, b200, gb200...)."),
    gpus_per_worker: int = typer.Option(8, help="GPUs: GPUs per worker."),
    isl: int = typer.Option(2048, help="GPUs: typical prompt tokens."),
    osl: int = typer.Option(256, help="GPUs: typical output tokens."),
    metrics_port: int = typer.Option(None, help="Serve Prometheus /metrics on this port."),
    frontend_metrics: str = typer.Option(
        None, help="A frontend's /metrics URL: measured TTFT/ITL over target grow their pool."
    ),
    log_level: str = typer.Option("info", help="debug | info | warning | error."),
) -> None:
    """Every --interval seconds: read the workers' load reports, forecast the next interval,
    size the prefill and decode pools from per-worker capacity, and move workers between
    them (drain, switch role, re-announce). Capacity is --prefill-tps/--decode-tps (measured
    on CPU) or, with --gpu-model, the factory model's prediction for the hardware (it also
    prints which parallelism each pool should use). Every decision is logged with its inputs."""
    from tokenfab.planner.capacity import Capacity, factory_capacity
    from tokenfab.planner.core import PlannerConfig
    from tokenfab.planner.service import run_planner
    from tokenfab.serve.cli import _logging, _run

    try:
        if gpu_model is not None:
            cap, pre, dec = factory_capacity(
                gpu_model, gpu_system, gpus_per_worker, isl, osl, ttft_ms, itl_ms
            )
            typer.echo(f"prefill pool: {pre.layout} batch {pre.batch}, "
                       f"{pre.tokens_per_s:,.0f} prompt tok/s per worker")  # fmt: skip
            typer.echo(f"decode pool: {dec.layout} batch {dec.batch}, "
                       f"{dec.tokens_per_s:,.0f} output tok/s per worker")  # fmt: skip
        elif prefill_tps is not None and decode_tps is not None:
            cap = Capacity(prefill_tps, decode_tps, source="given")
        else:
            raise ValueError("give --prefill-tps and --decode-tps, or --gpu-model")
        config = PlannerConfig(
            ttft_ms=ttft_ms, itl_ms=itl_ms, budget=budget or 10**6, interval_s=interval,
            cooldown_s=cooldown, fixed_fleet=True,
        )  # fmt: skip
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    _logging(log_level)
    _run(run_planner(runtime, namespace, config, cap, metrics_port, frontend_metrics))
