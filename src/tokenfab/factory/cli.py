"""`tokenfab plan`: the factory model.

`tokenfab plan --model M --system S --gpus N ...` searches deployments and prints the Pareto
frontier, the best layout under the limits and the economics. `validate` is the stable
interface independent checks call; its implementation lives in `validate.py`. `keynote`
replays the GTC 2025 Hopper vs GB200 NVL72 comparison. Heavy work is imported inside the
command functions so `tokenfab --help` stays fast.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import typer

app = typer.Typer(
    help="Plan an AI factory: performance model, Pareto frontier, economics.\n\n"
    "Example: tokenfab plan --model deepseek-ai/DeepSeek-R1 --system gb200 --gpus 72 "
    "--isl 1024 --osl 1024 --ttft 2000 --tpot 30",
    no_args_is_help=True,
)


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(2)


@app.callback(invoke_without_command=True)
def plan(
    ctx: typer.Context,
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="HF id of a bundled config (e.g. deepseek-ai/DeepSeek-R1) "
        "or a path to a config.json / a folder with one.",
    ),
    system: str | None = typer.Option(
        None, "--system", "-s", help="GPU system name or alias (gb200, h200, b200, mi355x ...)."
    ),
    gpus: int = typer.Option(8, "--gpus", "-n", help="GPUs available for the deployment."),
    isl: int = typer.Option(1024, "--isl", help="Input (prompt) tokens per request."),
    osl: int = typer.Option(1024, "--osl", help="Output tokens per request."),
    ttft: float | None = typer.Option(
        None, "--ttft", help="TTFT limit in ms (default 2000; 0 = no limit)."
    ),
    tpot: float | None = typer.Option(
        None, "--tpot", help="TPOT (inter-token) limit in ms (default 50; 0 = no limit)."
    ),
    precision: str = typer.Option(
        "auto", "--precision", help="bf16 | fp8 | fp4 | auto (the checkpoint's own)."
    ),
    mode: str = typer.Option("both", "--mode", help="agg | disagg | both."),
    backend: str = typer.Option(
        "auto", "--backend", help="Calibrate for trtllm | sglang | vllm | auto (their mean)."
    ),
    price_per_gpu_hour: float | None = typer.Option(
        None, "--price-per-gpu-hour", help="$ per GPU-hour (default: a cited cloud price)."
    ),
    price_per_mtok: float | None = typer.Option(
        None, "--price-per-mtok", help="Selling price, $ per million output tokens (revenue)."
    ),
    usd_per_kwh: float | None = typer.Option(None, "--usd-per-kwh", help="Electricity price."),
    pue: float | None = typer.Option(None, "--pue", help="Facility PUE (default 1.0: IT power)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object for scripts."),
    csv_path: Path | None = typer.Option(None, "--csv", help="Write the frontier to this CSV."),
    plot_path: Path | None = typer.Option(None, "--plot", help="Write the frontier PNG here."),
    top: int = typer.Option(25, "--top", help="Frontier rows shown in the table."),
    emit_dir: Path | None = typer.Option(
        None,
        "--emit",
        help="Write the best point's deployment here: deployment.json (roles, worker counts, "
        "parallelism, engine backend and command — --backend, trtllm for auto —, planner "
        "capacity with error bars), serve.sh, k8s.yaml.",
    ),
) -> None:
    """Search layouts, batch sizes and aggregated/disaggregated splits; print the frontier."""
    if ctx.invoked_subcommand is not None:
        return
    if model is None or system is None:
        raise _fail("--model and --system are required (see `tokenfab plan --help`)")
    from tokenfab.factory.search import PlanError

    try:
        result, econ = _run_plan(
            model, system, gpus, isl, osl, ttft, tpot, precision, mode, backend,
            price_per_gpu_hour, price_per_mtok, usd_per_kwh, pue,
        )  # fmt: skip
    except (PlanError, KeyError, ValueError, OSError) as e:
        raise _fail(_one_line(e)) from None
    if csv_path is not None:
        _write_csv(result, econ, csv_path)
    if plot_path is not None:
        from tokenfab.factory.plots import plot_search

        plot_search(result, plot_path)
    emitted = _emit(result, econ, model, emit_dir) if emit_dir is not None else []
    if as_json:
        typer.echo(json.dumps(_finite(_plan_json(result, econ)), allow_nan=False))
        return
    _print_plan(result, econ, top)
    for label, p in (("frontier CSV", csv_path), ("plot", plot_path)):
        if p is not None:
            typer.echo(f"{label}: {p}")
    for p in emitted:
        typer.echo(f"emitted: {p}")


def _emit(result, econ: dict, model: str, out_dir: Path) -> list[Path]:
    """deployment.json, serve.sh and k8s.yaml of the best point (or, when none meets the
    limits, of the point the economics describe, with a note)."""
    from tokenfab.factory.deploy import emit
    from tokenfab.factory.errorbars import bundled_error_bars

    point = econ["point"]
    try:
        return emit(point, result.query, model, bundled_error_bars(), Path(out_dir))
    except OSError as e:
        raise _fail(f"cannot write {out_dir}: {e.strerror or e}") from None


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(msg).split())


def _finite(o: object) -> object:
    """JSON-safe copy: inf/NaN (e.g. the cost of a point that produces nothing) become null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


def _run_plan(
    model: str,
    system: str,
    gpus: int,
    isl: int,
    osl: int,
    ttft: float | None,
    tpot: float | None,
    precision: str,
    mode: str,
    backend: str,
    price_per_gpu_hour: float | None,
    price_per_mtok: float | None,
    usd_per_kwh: float | None,
    pue: float | None,
):
    from tokenfab.factory.catalog import get_system
    from tokenfab.factory.economics import economics, load_prices
    from tokenfab.factory.modelspec import load_model_spec
    from tokenfab.factory.search import (
        DEFAULT_TPOT_MS,
        DEFAULT_TTFT_MS,
        PlanError,
        PlanQuery,
        checkpoint_precision,
        run_search,
    )

    modes = {"both": ("agg", "disagg"), "agg": ("agg",), "disagg": ("disagg",)}
    if mode not in modes:
        raise PlanError(f"--mode must be agg, disagg or both, got {mode!r}")
    try:
        spec = load_model_spec(model)
    except (KeyError, ValueError, OSError) as e:
        raise PlanError(_one_line(e)) from None
    sysm = get_system(system)
    for name, v in (
        ("--price-per-gpu-hour", price_per_gpu_hour),
        ("--price-per-mtok", price_per_mtok),
        ("--pue", pue),
        ("--usd-per-kwh", usd_per_kwh),
    ):
        if v is not None and v <= 0:
            raise PlanError(f"{name} must be > 0, got {v}")
    prec = checkpoint_precision(model) if precision == "auto" else precision
    ttft, tpot = _limit(ttft, DEFAULT_TTFT_MS, "--ttft"), _limit(tpot, DEFAULT_TPOT_MS, "--tpot")
    be = None if backend == "auto" else backend
    q = PlanQuery(spec, sysm, gpus, isl, osl, ttft, tpot, prec, modes[mode], be)
    result = run_search(q)
    book = load_prices()
    # no default price (e.g. validation-only systems): rental cost stays unknown (NaN -> null)
    gpu_hour = price_per_gpu_hour or book.gpu_hour_usd.get(sysm.key, math.nan)
    point = result.best or max(result.frontier, key=lambda c: c.tokens_per_s_per_gpu)
    econ = economics(
        point.tokens_per_s_per_gpu,
        sysm.allin_power_w,
        gpu_hour,
        price_usd_per_mtok=price_per_mtok if price_per_mtok is not None else book.usd_per_mtok,
        usd_per_kwh=usd_per_kwh if usd_per_kwh is not None else book.usd_per_kwh,
        pue=pue if pue is not None else book.pue,
    )
    if price_per_gpu_hour is not None:
        note = source = "--price-per-gpu-hour"
    else:
        missing = "no default price for this system; pass --price-per-gpu-hour"
        note = book.gpu_hour_note.get(sysm.key, missing)
        source = book.gpu_hour_source.get(sysm.key, missing)
    return result, {"point": point, "econ": econ, "gpu_hour_note": note, "gpu_hour_source": source}


def _limit(v: float | None, default: float, name: str) -> float | None:
    """A latency limit: not given -> the default, 0 -> none, negative -> error."""
    from tokenfab.factory.search import PlanError

    if v is None:
        return default
    if v < 0:
        raise PlanError(f"{name} must be >= 0 ms (0 = no limit), got {v:g}")
    return v or None


def _query_dict(result) -> dict:
    q = result.query
    return {
        "model": q.model.name,
        "system": q.system.key,
        "system_name": q.system.name,
        "gpus": q.gpus,
        "isl": q.isl,
        "osl": q.osl,
        "ttft_ms": q.ttft_ms,
        "tpot_ms": q.tpot_ms,
        "precision": q.precision,
        "modes": list(q.modes),
        "backend": q.backend or "auto",
        "allin_power_w_per_gpu": q.system.allin_power_w,
        "preliminary_system": q.system.preliminary,
    }


def _econ_dict(econ: dict) -> dict:
    e = econ["econ"]
    return {
        "usd_per_gpu_hour": e.usd_per_gpu_hour,
        "usd_per_gpu_hour_source": econ["gpu_hour_source"],
        "usd_per_mtok": e.usd_per_mtok,
        "energy_usd_per_mtok": e.energy_usd_per_mtok,
        "tokens_per_s_per_mw": e.tokens_per_s_per_mw,
        "tokens_per_mw_year": e.tokens_per_mw_year,
        "price_usd_per_mtok": e.price_usd_per_mtok,
        "revenue_usd_per_mw_year": e.revenue_usd_per_mw_year,
        "energy_usd_per_mw_year": e.energy_usd_per_mw_year,
        "gpus_per_mw": e.gpus_per_mw,
        "usd_per_kwh": e.usd_per_kwh,
        "pue": e.pue,
    }


def _with_interval(c, q) -> dict:
    """A candidate's JSON with its error bars at the shipped level (80%): TTFT, TPOT and
    the tokens/s per GPU and per user they imply."""
    from tokenfab.factory.errorbars import bundled_error_bars

    bars = bundled_error_bars()
    if not bars.known:
        return c.to_dict()
    p = c.prediction
    (tl, th), (pl, ph) = bars.interval(c.mode, q.backend, p.ttft_ms, p.tpot_ms)
    lo, hi = bars.throughput_factors(c.mode, q.backend, p.ttft_ms, p.tpot_ms, q.osl)
    return {
        **c.to_dict(),
        "interval_level": bars.level,
        "ttft_ms_interval": [round(tl, 3), round(th, 3)],
        "tpot_ms_interval": [round(pl, 4), round(ph, 4)],
        "tokens_per_s_per_gpu_interval": [
            round(c.tokens_per_s_per_gpu * lo, 3),
            round(c.tokens_per_s_per_gpu * hi, 3),
        ],
        "tokens_per_s_per_user_interval": [
            round(1000.0 / ph, 3) if ph > 0 else None,
            round(1000.0 / pl, 3) if pl > 0 else None,
        ],
    }


def _plan_json(result, econ: dict) -> dict:
    q = result.query
    best = result.best
    return {
        "query": _query_dict(result),
        "search": {
            "seconds": round(result.seconds, 4),
            "layouts": result.layouts,
            "evaluated": result.evaluated,
            "screened": result.screened,
            "candidates": len(result.candidates),
        },
        "best": _with_interval(best, q) if best else None,
        "economics": {
            **_econ_dict(econ),
            "at": "best" if best else "max-throughput frontier point (no point met the limits)",
        },
        "frontier": [
            {**_with_interval(c, q), "meets_limits": c.meets(q.ttft_ms, q.tpot_ms)}
            for c in result.frontier
        ],
        "frontier_by_mode": {
            m: [_with_interval(c, q) for c in f] for m, f in result.frontier_by_mode.items()
        },
        "notes": result.notes,
    }


CSV_FIELDS = (
    "mode",
    "describe",
    "gpus_used",
    "replicas",
    "users",
    "ttft_ms",
    "tpot_ms",
    "tokens_per_s_per_user",
    "tokens_per_s_per_gpu",
    "tokens_per_s_per_mw",
    "tokens_per_s",
    "usd_per_mtok",
    "meets_limits",
)


def _write_csv(result, econ: dict, path: Path) -> None:
    from tokenfab.factory.economics import usd_per_mtok

    q = result.query
    gpu_hour = econ["econ"].usd_per_gpu_hour
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for c in result.frontier:
            row = c.to_dict()
            row["usd_per_mtok"] = round(usd_per_mtok(c.tokens_per_s_per_gpu, gpu_hour), 4)
            row["meets_limits"] = c.meets(q.ttft_ms, q.tpot_ms)
            w.writerow(row)


def _usd(v: float, digits: int) -> str:
    return f"${v:,.{digits}f}" if math.isfinite(v) else "n/a"


def _print_plan(result, econ: dict, top: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from tokenfab.factory.economics import usd_per_mtok

    con = Console()
    if not con.is_terminal:
        con = Console(width=170)  # piped output: no wrapping of the wide frontier table
    q = result.query
    limits = ", ".join(
        s
        for s in (
            f"TTFT <= {q.ttft_ms:g} ms" if q.ttft_ms else "",
            f"TPOT <= {q.tpot_ms:g} ms" if q.tpot_ms else "",
        )
        if s
    )
    con.print(
        f"[bold]{q.model.name}[/] on [bold]{q.gpus} x {q.system.name}[/]"
        f"{' (preliminary specs)' if q.system.preliminary else ''}, {q.precision}, "
        f"backend {q.backend or 'auto'}, "
        f"ISL {q.isl} / OSL {q.osl}; limits: {limits or 'none'}"
    )
    con.print(
        f"searched {result.layouts} layouts, {result.evaluated} predictions "
        f"({result.screened} disaggregated splits screened) in {result.seconds:.2f} s"
    )
    from tokenfab.factory.errorbars import bundled_error_bars

    bars = bundled_error_bars()
    gpu_hour = econ["econ"].usd_per_gpu_hour
    front = result.frontier
    shown = front
    if len(front) > top:
        keep = {round(i * (len(front) - 1) / max(top - 1, 1)) for i in range(top)}
        keep |= {i for i, c in enumerate(front) if c is result.best}  # always show the best
        shown = [front[i] for i in sorted(keep)]
    t = Table(
        title=f"Pareto frontier ({len(front)} points{', sampled' if shown is not front else ''})"
    )
    for col, just in (
        ("mode", "left"),
        ("deployment", "left"),
        ("GPUs", "right"),
        ("users", "right"),
        (f"TTFT ms ({bars.level:.0%} range)", "right"),
        (f"TPOT ms ({bars.level:.0%} range)", "right"),
        ("tok/s/user", "right"),
        ("tok/s/GPU", "right"),
        ("tok/s/MW", "right"),
        ("$/Mtok", "right"),
        ("ok", "center"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for c in shown:
        p = c.prediction
        ok = c.meets(q.ttft_ms, q.tpot_ms)
        (tl, th), (pl, ph) = bars.interval(c.mode, q.backend, p.ttft_ms, p.tpot_ms)
        t.add_row(
            c.mode,
            escape(c.describe()),
            str(c.gpus_used),
            str(c.users),
            f"{p.ttft_ms:,.0f} ({tl:,.0f}-{th:,.0f})" if bars.known else f"{p.ttft_ms:,.0f}",
            f"{p.tpot_ms:.1f} ({pl:.1f}-{ph:.1f})" if bars.known else f"{p.tpot_ms:.1f}",
            f"{c.tokens_per_s_per_user:,.1f}",
            f"{c.tokens_per_s_per_gpu:,.0f}",
            f"{c.tokens_per_s_per_mw / 1e6:.2f}M",
            _usd(usd_per_mtok(c.tokens_per_s_per_gpu, gpu_hour), 3),
            "[green]yes[/]" if ok else "[red]no[/]",
            style="bold" if c is result.best else None,
        )
    con.print(t)
    best = result.best
    if best is None:
        con.print(
            "[red]No deployment meets the limits.[/] Economics below are for the "
            "highest-throughput frontier point."
        )
    else:
        p = best.prediction
        lo, hi = bars.throughput_factors(best.mode, q.backend, p.ttft_ms, p.tpot_ms, q.osl)
        con.print(
            f"[bold green]Best within limits:[/] {best.mode} {escape(best.describe())} - "
            f"{best.tokens_per_s_per_gpu:,.0f} tok/s/GPU"
            + (
                f" ({bars.level:.0%} range {best.tokens_per_s_per_gpu * lo:,.0f}-"
                f"{best.tokens_per_s_per_gpu * hi:,.0f})"
                if bars.known
                else ""
            )
            + ", "
            f"{best.tokens_per_s_per_user:,.1f} "
            f"tok/s/user, TTFT {p.ttft_ms:,.0f} ms, TPOT {p.tpot_ms:.1f} ms, "
            f"{best.users} users on {best.gpus_used}/{q.gpus} GPUs, {best.tokens_per_s:,.0f} tok/s"
        )
    for n in result.notes:
        con.print(f"[yellow]note:[/] {n}")
    e = econ["econ"]
    et = Table(title="Economics (output tokens)", show_header=False)
    et.add_column("item")
    et.add_column("value", justify="right")
    et.add_row(
        "price per GPU-hour", f"{_usd(e.usd_per_gpu_hour, 2)}  ({escape(econ['gpu_hour_note'])})"
    )
    et.add_row("rental cost per million tokens", _usd(e.usd_per_mtok, 4))
    et.add_row(
        f"electricity per million tokens (${e.usd_per_kwh:.3f}/kWh, PUE {e.pue:g})",
        f"${e.energy_usd_per_mtok:.4f}",
    )
    et.add_row("GPUs per MW", f"{e.gpus_per_mw:,.0f}")
    et.add_row("tokens/s per MW", f"{e.tokens_per_s_per_mw:,.0f}")
    et.add_row("tokens per MW-year", f"{e.tokens_per_mw_year:.3e}")
    et.add_row(
        f"revenue per MW-year at ${e.price_usd_per_mtok:.2f}/Mtok",
        f"${e.revenue_usd_per_mw_year / 1e6:,.1f}M",
    )
    et.add_row("electricity per MW-year", f"${e.energy_usd_per_mw_year / 1e6:,.2f}M")
    con.print(et)


@app.command("validate")
def validate(
    data: Path = typer.Option(..., "--data", help="CSV in the format of measured_serving.csv."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (stable keys)."),
    cv: int = typer.Option(
        0, "--cv", help="K-fold cross-validation: refit on K-1 folds of FILE, predict the rest."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Also write every row's prediction, measurement and error as CSV."
    ),
) -> None:
    """Predict TTFT and TPOT for every row of a measured-serving CSV and report the errors.

    The prediction is exactly what `tokenfab plan` computes (the calibrated physics), with
    its 80% error bar from cross-validated held-out errors; the JSON adds the share of rows
    inside those bars. With --cv the calibration is refitted per fold of FILE."""
    from tokenfab.factory.validate_report import run_validate

    run_validate(data, as_json=as_json, cv=cv, out=out)


@app.command("keynote")
def keynote(
    isl: int = typer.Option(1024, "--isl", help="Prompt tokens of the reasoning request."),
    osl: int = typer.Option(8192, "--osl", help="Output (reasoning) tokens per request."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object for scripts."),
    plot_path: Path | None = typer.Option(
        Path("keynote.png"), "--plot", help="PNG of tokens/s per MW vs tokens/s per user."
    ),
) -> None:
    """GTC 2025: Hopper vs GB200 NVL72 on DeepSeek-R1 - which keynote claims the model supports."""
    from tokenfab.factory.keynote import KEYNOTE_NOTE, render_text, run_keynote
    from tokenfab.factory.search import PlanError

    try:
        rep = run_keynote(isl=isl, osl=osl)
    except (PlanError, KeyError, ValueError) as e:
        raise _fail(_one_line(e)) from None
    if plot_path is not None:
        from tokenfab.factory.keynote import plot_keynote

        plot_keynote(rep, plot_path)
    if as_json:
        d = rep.to_dict()
        d["plot"] = str(plot_path) if plot_path else None
        typer.echo(json.dumps(_finite(d), allow_nan=False))
        return
    typer.echo(render_text(rep))
    typer.echo(KEYNOTE_NOTE)
    if plot_path is not None:
        typer.echo(f"plot: {plot_path}")
