"""Predict measured rows with the calibrated physics and summarize the errors.

What is predicted here is exactly what `tokenfab plan` predicts: the calibrated physics
(`serving.predict`), nothing pulled toward stored measurements. The JSON summary keys
(`rows`, `predicted`, `skipped`, `ttft_mdape`, `tpot_mdape`, `ttft_p90_ape`, `tpot_p90_ape`,
percent; `ttft_in_interval`, `tpot_in_interval`: share of rows inside the 80% error bars)
are a stable interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tokenfab.factory.errorbars import ErrorBars
from tokenfab.factory.measured import Case
from tokenfab.factory.params import bundled_calibration
from tokenfab.factory.perf import Calibration
from tokenfab.factory.serving import AggDeployment, predict


@dataclass(frozen=True)
class RowResult:
    row_id: str
    backend: str
    mode: str  # agg | disagg
    ttft_ms: float
    tpot_ms: float
    ttft_meas: float | None
    tpot_meas: float | None

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


def mode_of(c: Case) -> str:
    return "agg" if isinstance(c.deployment, AggDeployment) else "disagg"


def predict_cases(
    cases: Sequence[Case], cal_for: Callable[[str], Calibration] | None = None
) -> list[RowResult]:
    """Predictions for cases; `cal_for(backend)` picks the calibration (default: bundled)."""
    cal_for = cal_for or bundled_calibration
    out = []
    for c in cases:
        p = predict(c.model, c.system, c.deployment, cal_for(c.backend))
        out.append(
            RowResult(c.row_id, c.backend, mode_of(c), p.ttft_ms, p.tpot_ms, c.ttft_ms, c.tpot_ms)
        )
    return out


def computable(cases: Sequence[Case]) -> tuple[list[Case], list[tuple[str, str]]]:
    """Cases the model can evaluate; a case whose numbers break the model (it shouldn't
    happen, but a file of unknown provenance may hold anything) is skipped with the reason
    instead of ending the run."""
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


def coverage(results: Sequence[RowResult], bars: ErrorBars) -> tuple[float | None, ...]:
    """Share of rows whose measured TTFT / TPOT lies inside the prediction's error bar."""
    hit: tuple[list[bool], list[bool]] = ([], [])
    for r in results:
        iv = bars.interval(r.mode, r.backend, r.ttft_ms, r.tpot_ms)
        for lst, meas, (lo, hi) in ((hit[0], r.ttft_meas, iv[0]), (hit[1], r.tpot_meas, iv[1])):
            if meas is not None:
                lst.append(lo <= meas <= hi)
    return tuple(round(float(np.mean(h)), 4) if h else None for h in hit)


def summarize(
    results: Sequence[RowResult], rows: int, skipped: int, bars: ErrorBars | None = None
) -> dict:
    te = [r.ttft_ape for r in results if r.ttft_ape is not None]
    pe = [r.tpot_ape for r in results if r.tpot_ape is not None]
    out = {
        "rows": rows,
        "predicted": len(results),
        "skipped": skipped,
        "ttft_mdape": _pct(te, 50),
        "tpot_mdape": _pct(pe, 50),
        "ttft_p90_ape": _pct(te, 90),
        "tpot_p90_ape": _pct(pe, 90),
    }
    if bars is not None and bars.groups:
        out["ttft_in_interval"], out["tpot_in_interval"] = coverage(results, bars)
    return out
