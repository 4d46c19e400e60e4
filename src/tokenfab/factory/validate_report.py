"""`tokenfab plan validate`: the command body (table, JSON, per-row CSV).

Every row that names a known (or bundled-equivalent) model and a catalog system is predicted
with what `tokenfab plan` uses, the calibrated physics; only rows that cannot be computed at
all are skipped, with the reason. `--cv K` refits on K-1 random folds of the file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenfab.factory.errorbars import bundled_error_bars
from tokenfab.factory.measured import load_cases
from tokenfab.factory.validate import RowResult, computable, predict_cases, summarize


def validate_file(
    path: Path, cv: int = 0, progress: Callable[[str], None] | None = None
) -> tuple[dict, list[RowResult], list[tuple[str, str]]]:
    """Predict every row with the bundled calibration, or (cv = K > 1) each row with a
    calibration refitted on the other K-1 random folds of the same file."""
    cases, skipped = load_cases(path)
    cases, broken = computable(cases)
    skipped += broken
    if cv > 1:
        from tokenfab.factory.crossval import cross_validate, kfold

        results = cross_validate(cases, kfold(cases, cv, seed=0), progress=progress)
    else:
        results = predict_cases(cases)
    bars = bundled_error_bars()
    return summarize(results, len(cases) + len(skipped), len(skipped), bars), results, skipped


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def write_rows(out: Path, results: Sequence[RowResult]) -> None:
    """Per-row predictions with their error bars as CSV: what a script needs to study the
    errors itself."""
    bars = bundled_error_bars()
    cols = ["id", "backend", "mode", "ttft_ms", "ttft_lo_ms", "ttft_hi_ms", "ttft_measured_ms"]
    cols += ["ttft_ape", "tpot_ms", "tpot_lo_ms", "tpot_hi_ms", "tpot_measured_ms", "tpot_ape"]
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            (tl, th), (pl, ph) = bars.interval(r.mode, r.backend, r.ttft_ms, r.tpot_ms)
            vals = (r.ttft_ms, tl, th, r.ttft_meas, r.ttft_ape)
            vals += (r.tpot_ms, pl, ph, r.tpot_meas, r.tpot_ape)
            w.writerow(
                [r.row_id, r.backend, r.mode, *("" if v is None else f"{v:.6g}" for v in vals)]
            )


def run_validate(path: Path, as_json: bool = False, cv: int = 0, out: Path | None = None) -> None:
    """CLI body: per-row table and summary, or one JSON object with `as_json`; `out` also
    writes the per-row predictions as CSV. With `cv` (K-fold cross-validation, minutes of
    fitting) progress goes to stderr."""
    import typer

    path = Path(path)
    if not path.is_file():
        typer.echo(f"error: no such file: {path}", err=True)
        raise typer.Exit(2)
    if cv == 1 or cv < 0:
        typer.echo("error: --cv needs K >= 2 folds", err=True)
        raise typer.Exit(2)
    try:
        summary, results, skipped = validate_file(
            path, cv=cv, progress=lambda m: typer.echo(f"cv {m}", err=True)
        )
    except (KeyError, ValueError, UnicodeDecodeError) as e:  # not a CSV of this format
        typer.echo(f"error: cannot read {path}: {e}", err=True)
        raise typer.Exit(2) from e
    if out is not None:
        try:
            write_rows(Path(out), results)
        except OSError as e:
            typer.echo(f"error: cannot write {out}: {e.strerror or e}", err=True)
            raise typer.Exit(2) from e
    if as_json:
        typer.echo(json.dumps(summary))
        return
    _print_table(path, summary, results, skipped)


def _print_table(path: Path, summary: dict, results, skipped) -> None:
    from rich.console import Console
    from rich.table import Table

    bars = bundled_error_bars()
    con = Console()
    t = Table(title=f"tokenfab plan validate: {path.name}")
    cols = ("row", "backend", "TTFT ms", f"{bars.level:.0%} range", "meas", "err %")
    cols += ("TPOT ms", f"{bars.level:.0%} range", "meas", "err %")
    for col in cols:
        t.add_column(col, justify="left" if col in ("row", "backend") else "right")
    for r in results:
        (tl, th), (pl, ph) = bars.interval(r.mode, r.backend, r.ttft_ms, r.tpot_ms)
        t.add_row(
            r.row_id[:60],
            r.backend,
            _fmt(r.ttft_ms),
            f"{tl:.0f}-{th:.0f}" if bars.known else "-",
            _fmt(r.ttft_meas),
            _fmt(r.ttft_ape),
            _fmt(r.tpot_ms, 2),
            f"{pl:.1f}-{ph:.1f}" if bars.known else "-",
            _fmt(r.tpot_meas, 2),
            _fmt(r.tpot_ape),
        )
    con.print(t)
    for rid, why in skipped:
        con.print(f"skipped {rid}: {why}")
    inside = ""
    if summary.get("ttft_in_interval") is not None:
        inside = (
            f"; inside the {bars.level:.0%} error bars: TTFT {summary['ttft_in_interval']:.0%}, "
            f"TPOT {summary['tpot_in_interval']:.0%}"
        )
    con.print(
        f"rows {summary['rows']}, predicted {summary['predicted']}, skipped "
        f"{summary['skipped']}; TTFT MdAPE {_fmt(summary['ttft_mdape'])}% "
        f"(p90 {_fmt(summary['ttft_p90_ape'])}%), TPOT MdAPE {_fmt(summary['tpot_mdape'])}% "
        f"(p90 {_fmt(summary['tpot_p90_ape'])}%){inside}"
    )
