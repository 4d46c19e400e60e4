"""`tokenfab bench`: load-test an OpenAI-compatible server (tokenfab serve, vllm serve, ...).

`tokenfab bench` is a single command (a typer callback with invoke_without_command), so every
option goes straight after `bench`.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from tokenfab.bench.traces import BUNDLED

if TYPE_CHECKING:
    from rich.console import Console

    from tokenfab.bench.api import BenchConfig, BenchResult
    from tokenfab.bench.metrics import RequestResult

app = typer.Typer(
    help="Load-test an OpenAI-compatible server.", invoke_without_command=True, add_completion=False
)

_MODES = "Modes: fixed --concurrency (default 1), Poisson --rate, or --trace replay."


@app.callback(invoke_without_command=True, help=f"Load-test an OpenAI-compatible server. {_MODES}")
def bench(
    url: str = typer.Option("http://127.0.0.1:8000", help="Server base URL (with or without /v1)."),
    model: str | None = typer.Option(None, help="Model name; default: the first the server lists."),
    api_key: str | None = typer.Option(
        None, envvar="TOKENFAB_API_KEY", help="Bearer token (env TOKENFAB_API_KEY)."
    ),
    tokenizer: str | None = typer.Option(
        None,
        help="Tokenizer folder whose ordinary tokens make up the prompts; default: --model if "
        "it is a folder, else token ids 100..499.",
    ),
    concurrency: int | None = typer.Option(
        None,
        "--concurrency",
        "-c",
        help="Requests in flight (closed loop), or the cap with --rate/--trace.",
    ),
    rate: float | None = typer.Option(None, help="Poisson arrivals, requests per second."),
    trace: str | None = typer.Option(
        None,
        help=f"Replay a trace: a .jsonl (Mooncake) or .csv (Azure) file, or one of {', '.join(BUNDLED)}.",
    ),
    trace_format: str = typer.Option("auto", help="auto | mooncake | azure."),
    block_tokens: int = typer.Option(
        16,
        help="Mooncake: tokens per hash id (the trace's 512 scaled down); input lengths scale alike.",
    ),
    input_scale: float = typer.Option(1.0, help="Azure: multiply input lengths."),
    output_scale: float = typer.Option(1.0, help="Trace: multiply output lengths."),
    time_scale: float = typer.Option(
        1.0, help="Trace: multiply arrival times (0.5 = twice as fast, 0 = all at once)."
    ),
    max_input_len: int | None = typer.Option(
        None, help="Trace: truncate prompts to this many tokens."
    ),
    max_output_len: int | None = typer.Option(None, help="Trace: cap output lengths."),
    input_len: int = typer.Option(256, help="Synthetic: prompt tokens per request."),
    output_len: int = typer.Option(128, help="Synthetic: output tokens per request."),
    ignore_eos: bool = typer.Option(True, help="Ask for exactly max_tokens (vLLM's ignore_eos)."),
    num_requests: int | None = typer.Option(
        None, "--num-requests", "-n", help="Requests to send (default: whole trace, or 100)."
    ),
    duration: float | None = typer.Option(
        None, help="Stop sending new requests after this many seconds."
    ),
    warmup: int = typer.Option(0, help="Uncounted requests sent first."),
    ttft: float | None = typer.Option(None, help="SLO for goodput: TTFT limit in ms."),
    itl: float | None = typer.Option(
        None, help="SLO for goodput: per-request mean ITL (TPOT) limit in ms."
    ),
    seed: int = typer.Option(0, help="Seed for prompts and arrivals."),
    timeout: float = typer.Option(600.0, help="Per-request timeout in seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (no table)."),
    out: Path | None = typer.Option(
        None, help="Write results.json (with every request) and PNG plots into this folder."
    ),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    from rich.console import Console

    from tokenfab.bench.api import BenchConfig
    from tokenfab.bench.metrics import Slo
    from tokenfab.bench.workload import TraceSynthesis

    err = Console(stderr=True)
    try:
        cfg = BenchConfig(
            url=url,
            model=model,
            api_key=api_key or os.environ.get("OPENAI_API_KEY"),
            tokenizer=tokenizer,
            concurrency=concurrency,
            rate=rate,
            trace=trace,
            trace_format=trace_format,
            synth=TraceSynthesis(
                block_tokens=block_tokens,
                input_scale=input_scale,
                output_scale=output_scale,
                time_scale=time_scale,
                max_input_len=max_input_len,
                max_output_len=max_output_len,
                seed=seed,
            ),
            input_len=input_len,
            output_len=output_len,
            ignore_eos=ignore_eos,
            num_requests=num_requests,
            duration_s=duration,
            warmup=warmup,
            slo=Slo(ttft_ms=ttft, itl_ms=itl),
            seed=seed,
            timeout_s=timeout,
        )
        result = _run_with_progress(cfg, err, show=not quiet)
    except (ValueError, OSError) as e:
        err.print(f"[red]error:[/red] {_one_line(e)}")
        raise typer.Exit(2) from None
    _emit(result, as_json, out, err)
    if result.summary.completed == 0:
        raise typer.Exit(1)


def _one_line(e: BaseException) -> str:
    import httpx

    if isinstance(e, httpx.HTTPStatusError):
        return f"{e.request.url} answered HTTP {e.response.status_code}"
    if isinstance(e, httpx.HTTPError):
        return f"cannot reach the server: {type(e).__name__}: {e}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _run_with_progress(cfg: BenchConfig, err: Console, show: bool) -> BenchResult:
    import httpx
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from tokenfab.bench.api import run_bench

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        console=err,
        disable=not show,
        transient=False,
    )
    task = progress.add_task("connecting", total=None, failed=0)
    failed = 0

    def on_phase(name: str, total: int | None) -> None:
        nonlocal failed
        failed = 0
        progress.reset(task, description=name, total=total, failed=0)

    def on_done(r: RequestResult) -> None:
        nonlocal failed
        failed += 0 if r.ok else 1
        progress.update(task, advance=1, failed=failed)

    try:
        with progress:
            return asyncio.run(run_bench(cfg, on_done, on_phase))
    except httpx.HTTPError as e:
        raise OSError(_one_line(e)) from e


def _emit(result: BenchResult, as_json: bool, out: Path | None, err: Console) -> None:
    from rich.console import Console

    from tokenfab.bench.report import print_report, to_json, write_plots

    cfg = result.config
    title = f"{result.model} @ {cfg.url}: {cfg.mode}"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(
            to_json(result.summary, result.config_dict(), result.results)
        )
        for p in write_plots(result.results, out, title):
            err.print(f"wrote {p}")
    if as_json:
        sys.stdout.write(to_json(result.summary, result.config_dict(), None) + "\n")
    else:
        print_report(result.summary, Console(), title)
