"""Error bars: the interval a prediction's measurement falls in, from held-out errors.

Cross-validation (`crossval.py`, run by `benchmarks/plan_accuracy.py --loso --no-kfold
--residuals FILE`) predicts every bundled row from a fit that never saw its GPU system
(leave-one-system-out: the situation of a user asking about hardware not in the data);
`data/cv_residuals.csv` keeps each row's log(measured / predicted) for TTFT and TPOT with its
fold (the held-out system), mode and backend. The
interval at level L is [p x exp(q_lo), p x exp(q_hi)], q the (1-L)/2 and (1+L)/2 quantiles
of those held-out log ratios of the same mode and backend (of the same mode alone when that
group has fewer than `MIN_ROWS`, of all rows when the mode is unknown). Nothing here fits
the physics: the intervals describe how wrong the shipped model has been on data it did not
see.

    python -m tokenfab.factory.errorbars   # rebuild data/error_bars.json from the residuals
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

LEVEL = 0.8
MIN_ROWS = 40  # fewer held-out rows than this give too noisy a 10th/90th percentile
RESIDUAL_FIELDS = ("id", "fold", "mode", "backend", "ttft_log_ratio", "tpot_log_ratio")


@dataclass(frozen=True)
class Residual:
    """One held-out row: log(measured / predicted); None where it was not measured."""

    fold: int
    mode: str
    backend: str
    ttft: float | None
    tpot: float | None


@dataclass(frozen=True)
class ErrorBars:
    """Factor intervals (measured / predicted) per group key: "mode/backend", "mode", "all"."""

    level: float
    groups: dict[str, dict[str, tuple[float, float]]]

    @property
    def known(self) -> bool:
        """False when no held-out errors were shipped (every interval would be a point)."""
        return bool(self.groups)

    def factors(self, mode: str, backend: str) -> dict[str, tuple[float, float]]:
        for key in (f"{mode}/{backend}", mode, "all"):
            if key in self.groups:
                return self.groups[key]
        return {"ttft": (1.0, 1.0), "tpot": (1.0, 1.0)}

    def interval(
        self, mode: str, backend: str | None, ttft_ms: float, tpot_ms: float
    ) -> tuple[tuple[float, float], tuple[float, float]]:
        """((TTFT low, high), (TPOT low, high)) in ms around a prediction."""
        f = self.factors(mode, backend or "auto")
        return (
            (ttft_ms * f["ttft"][0], ttft_ms * f["ttft"][1]),
            (tpot_ms * f["tpot"][0], tpot_ms * f["tpot"][1]),
        )

    def throughput_factors(
        self, mode: str, backend: str | None, ttft_ms: float, tpot_ms: float, osl: int
    ) -> tuple[float, float]:
        """(low, high) factors on tokens/s (per GPU and per user alike at a fixed user
        count): a closed-loop user waits TTFT + (osl - 1) TPOT per request, so throughput
        falls when both latencies sit at the top of their bars and rises at the bottom."""
        f = self.factors(mode, backend or "auto")
        t = ttft_ms + (osl - 1) * tpot_ms
        slow = ttft_ms * f["ttft"][1] + (osl - 1) * tpot_ms * f["tpot"][1]
        fast = ttft_ms * f["ttft"][0] + (osl - 1) * tpot_ms * f["tpot"][0]
        return (t / slow if slow > 0 else 1.0, t / fast if fast > 0 else 1.0)

    def to_dict(self) -> dict:
        return {
            "level": self.level,
            "groups": {k: {m: list(v) for m, v in g.items()} for k, g in self.groups.items()},
        }


def _quantiles(vals: list[float], level: float) -> tuple[float, float]:
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return (round(math.exp(float(lo)), 4), round(math.exp(float(hi)), 4))


def build(residuals: Iterable[Residual], level: float = LEVEL) -> ErrorBars:
    """Error bars from held-out residuals: per mode/backend, per mode, and over all rows
    (a group keeps a metric only with at least MIN_ROWS measured rows)."""
    res = list(residuals)
    keys: dict[str, list[Residual]] = {"all": res}
    for r in res:
        keys.setdefault(r.mode, []).append(r)
        keys.setdefault(f"{r.mode}/{r.backend}", []).append(r)
    groups: dict[str, dict[str, tuple[float, float]]] = {}
    for key, rows in sorted(keys.items()):
        g = {}
        for metric in ("ttft", "tpot"):
            vals = [getattr(r, metric) for r in rows if getattr(r, metric) is not None]
            if len(vals) >= MIN_ROWS:
                g[metric] = _quantiles(vals, level)
        if len(g) == 2:
            groups[key] = g
    return ErrorBars(level, groups)


def log_ratio(pred: float, meas: float | None) -> float | None:
    if meas is None or meas <= 0 or not (pred > 0 and math.isfinite(pred)):
        return None
    return math.log(meas / pred)


def write_residuals(
    path: Path, rows: Sequence[tuple[str, int, str, str, float | None, float | None]]
):
    """rows: (id, fold, mode, backend, TTFT log ratio, TPOT log ratio)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(RESIDUAL_FIELDS)
        for rid, fold, mode, backend, lt, lp in rows:
            w.writerow(
                [rid, fold, mode, backend, *("" if v is None else f"{v:.5f}" for v in (lt, lp))]
            )


def read_residuals(path: Path) -> list[Residual]:
    def num(v: str) -> float | None:
        return float(v) if v else None

    with open(path, newline="") as f:
        return [
            Residual(
                int(r["fold"]),
                r["mode"],
                r["backend"],
                num(r["ttft_log_ratio"]),
                num(r["tpot_log_ratio"]),
            )
            for r in csv.DictReader(f)
        ]


def _data(name: str) -> Path:
    return Path(str(resources.files("tokenfab.factory").joinpath(f"data/{name}")))


@cache
def bundled_error_bars() -> ErrorBars:
    """The shipped error bars (`data/error_bars.json`); none (factor 1) when absent."""
    f = _data("error_bars.json")
    if not f.is_file():
        return ErrorBars(LEVEL, {})
    raw = json.loads(f.read_text())
    groups = {k: {m: (v[0], v[1]) for m, v in g.items()} for k, g in raw["groups"].items()}
    return ErrorBars(raw["level"], groups)


def main() -> None:
    res = read_residuals(_data("cv_residuals.csv"))
    bars = build(res)
    out = {
        "source": "data/cv_residuals.csv: held-out log(measured/predicted) of "
        "benchmarks/plan_accuracy.py --loso --no-kfold --residuals (leave-one-system-out); "
        "python -m tokenfab.factory.errorbars",
        "rows": len(res),
        **bars.to_dict(),
    }
    _data("error_bars.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {_data('error_bars.json')} from {len(res)} held-out rows")


if __name__ == "__main__":
    main()
