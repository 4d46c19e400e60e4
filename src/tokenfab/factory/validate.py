"""`tokenfab plan validate`: predict TTFT and TPOT for every row of a measured-serving CSV.

Every row that names a known (or bundled-equivalent) model and a catalog system is predicted;
only rows that cannot be computed at all are skipped, with the reason. The JSON summary keys
(`rows`, `predicted`, `skipped`, `ttft_mdape`, `tpot_mdape`, `ttft_p90_ape`, `tpot_p90_ape`,
percent) are a stable interface.

Predictions are the calibrated physics model's, pulled toward other measurements of the
same deployment where the bundled data has them (`anchors.py`; never a row's own
measurement); `physics_only` turns that layer off.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenfab.factory.anchors import Anchors
from tokenfab.factory.measured import Case, load_cases
from tokenfab.factory.perf import Calibration
from tokenfab.factory.serving import predict


@dataclass(frozen=True)
class RowResult:
    row_id: str
    backend: str
    ttft_ms: float
    tpot_ms: float
    ttft_meas: float | None
    tpot_meas: float | None
    ttft_physics_ms: float | None = None  # before the anchors (None: same as ttft_ms)
    tpot_physics_ms: float | None = None

    def physics(self) -> RowResult:
        """The same row as the physics model alone predicts it."""
        return RowResult(
            self.row_id,
            self.backend,
            self.ttft_ms if self.ttft_physics_ms is None else self.ttft_physics_ms,
            self.tpot_ms if self.tpot_physics_ms is None else self.tpot_physics_ms,
            self.ttft_meas,
            self.tpot_meas,
        )

    @property
    def ttft_ape(self) -> float | None:
        return _ape(self.ttft_ms, self.ttft_meas)

    @property
    def tpot_ape(self) -> float | None:
        return _ape(self.tpot_ms, self.tpot_meas)


def _ape(pred: float, meas: float | None) -> float | None:
    if meas is None or meas <= 0 or not np.isfinite(pred):
        return None
    return abs(pred - meas) / meas * 100.0


def predict_cases(
    cases: Sequence[Case],
    cal_for: Callable[[str], Calibration] | None = None,
    anchors: Anchors | None = None,
    physics_only: bool = False,
) -> list[RowResult]:
    """Predictions for cases. `cal_for(backend)` picks the calibration and `anchors` the
    measured anchors; both default to the bundled ones, but a calibration passed in gets no
    anchors unless they are passed too (anchors belong to the calibration they were built
    on)."""
    if cal_for is None:
        from tokenfab.factory.anchors import bundled_anchors
        from tokenfab.factory.calibrate import bundled_calibration

        cal_for = bundled_calibration
        anchors = anchors or bundled_anchors()
    if physics_only:
        anchors = None
    out = []
    for c in cases:
        p = predict(c.model, c.system, c.deployment, cal_for(c.backend))
        ttft, tpot = p.ttft_ms, p.tpot_ms
        if anchors is not None:
            lt, lp = anchors.log_correction(c)
            ttft, tpot = ttft * math.exp(lt), tpot * math.exp(lp)
        out.append(
            RowResult(c.row_id, c.backend, ttft, tpot, c.ttft_ms, c.tpot_ms, p.ttft_ms, p.tpot_ms)
        )
    return out


def _computable(cases: Sequence[Case]) -> tuple[list[Case], list[tuple[str, str]]]:
    """Cases the model can evaluate; a case whose numbers break the model (it shouldn't
    happen, but a file of unknown provenance may hold anything) is skipped with the reason
    instead of ending the run."""
    from tokenfab.factory.calibrate import bundled_calibration

    ok, bad = [], []
    for c in cases:
        try:
            predict(c.model, c.system, c.deployment, bundled_calibration(c.backend))
            ok.append(c)
        except (ArithmeticError, ValueError, KeyError) as e:
            bad.append((c.row_id, f"cannot be modeled: {e}"))
    return ok, bad


def _pct(vals: list[float], q: float) -> float | None:
    return round(float(np.percentile(vals, q)), 2) if vals else None


def summarize(results: Sequence[RowResult], rows: int, skipped: int) -> dict:
    te = [r.ttft_ape for r in results if r.ttft_ape is not None]
    pe = [r.tpot_ape for r in results if r.tpot_ape is not None]
    return {
        "rows": rows,
        "predicted": len(results),
        "skipped": skipped,
        "ttft_mdape": _pct(te, 50),
        "tpot_mdape": _pct(pe, 50),
        "ttft_p90_ape": _pct(te, 90),
        "tpot_p90_ape": _pct(pe, 90),
    }


def validate_file(
    path: Path,
    cv: int = 0,
    progress: Callable[[str], None] | None = None,
    physics_only: bool = False,
) -> tuple[dict, list[RowResult], list[tuple[str, str]]]:
    """Predict every row with the bundled calibration and anchors, or (cv = K > 1) each row
    with a calibration and anchors rebuilt on the other K-1 random folds of the same file."""
    cases, skipped = load_cases(path)
    cases, broken = _computable(cases)
    skipped += broken
    if cv > 1:
        from tokenfab.factory.calibrate import cross_validate, kfold

        results = cross_validate(cases, kfold(cases, cv, seed=0), progress=progress)
        if physics_only:
            results = [r.physics() for r in results]
    else:
        results = predict_cases(cases, physics_only=physics_only)
    return summarize(results, len(cases) + len(skipped), len(skipped)), results, skipped


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _anchor(r: RowResult) -> str:
    """What the measured anchors did to the physics: TTFT / TPOT factors, '-' for none."""
    p = r.physics()
    f = (r.ttft_ms / p.ttft_ms, r.tpot_ms / p.tpot_ms) if p.ttft_ms and p.tpot_ms else (1, 1)
    return "-" if f == (1.0, 1.0) else f"{f[0]:.2f} / {f[1]:.2f}"


def write_rows(out: Path, results: Sequence[RowResult]) -> None:
    """Per-row predictions as CSV: what a script needs to study the errors itself."""
    cols = ["id", "backend", "ttft_ms", "ttft_measured_ms", "ttft_ape", "tpot_ms"]
    cols += ["tpot_measured_ms", "tpot_ape", "ttft_physics_ms", "tpot_physics_ms"]
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            p = r.physics()
            vals = (r.ttft_ms, r.ttft_meas, r.ttft_ape, r.tpot_ms, r.tpot_meas, r.tpot_ape)
            w.writerow(
                [r.row_id, r.backend, *("" if v is None else f"{v:.6g}" for v in vals)]
                + [f"{p.ttft_ms:.6g}", f"{p.tpot_ms:.6g}"]
            )


def run_validate(
    path: Path,
    as_json: bool = False,
    cv: int = 0,
    physics_only: bool = False,
    out: Path | None = None,
) -> None:
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
            path,
            cv=cv,
            progress=lambda m: typer.echo(f"cv {m}", err=True),
            physics_only=physics_only,
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
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"tokenfab plan validate: {path.name}")
    cols = ("row", "backend", "TTFT ms", "meas", "err %", "TPOT ms", "meas", "err %", "anchor x")
    for col in cols:
        t.add_column(col, justify="left" if col in ("row", "backend") else "right")
    for r in results:
        t.add_row(
            r.row_id[:60],
            r.backend,
            _fmt(r.ttft_ms),
            _fmt(r.ttft_meas),
            _fmt(r.ttft_ape),
            _fmt(r.tpot_ms, 2),
            _fmt(r.tpot_meas, 2),
            _fmt(r.tpot_ape),
            _anchor(r),
        )
    con.print(t)
    for rid, why in skipped:
        con.print(f"skipped {rid}: {why}")
    con.print(
        f"rows {summary['rows']}, predicted {summary['predicted']}, skipped "
        f"{summary['skipped']}; TTFT MdAPE {_fmt(summary['ttft_mdape'])}% "
        f"(p90 {_fmt(summary['ttft_p90_ape'])}%), TPOT MdAPE {_fmt(summary['tpot_mdape'])}% "
        f"(p90 {_fmt(summary['tpot_p90_ape'])}%)"
    )
