"""Next-interval forecasts of a load series: EWMA (level only) and Holt (level + trend).

Which one the planner uses is chosen by measured one-step-ahead error on real traces
(`python -m tokenfab.planner.forecast_eval`); both are immutable values updated by `update`,
so the planner's state stays a plain value the twin can copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Ewma:
    """Exponentially weighted moving average: forecast = level."""

    alpha: float = 0.5
    level: float | None = None

    def update(self, x: float) -> Ewma:
        if self.level is None:
            return replace(self, level=x)
        return replace(self, level=self.alpha * x + (1 - self.alpha) * self.level)

    def forecast(self) -> float:
        return 0.0 if self.level is None else self.level


@dataclass(frozen=True)
class Holt:
    """Holt's linear (double exponential) smoothing: forecast = level + trend, never below 0
    (a falling trend must not forecast negative load)."""

    alpha: float = 0.5
    beta: float = 0.2
    level: float | None = None
    trend: float = 0.0

    def update(self, x: float) -> Holt:
        if self.level is None:
            return replace(self, level=x, trend=0.0)
        level = self.alpha * x + (1 - self.alpha) * (self.level + self.trend)
        trend = self.beta * (level - self.level) + (1 - self.beta) * self.trend
        return replace(self, level=level, trend=trend)

    def forecast(self) -> float:
        return 0.0 if self.level is None else max(0.0, self.level + self.trend)


Forecaster = Ewma | Holt


def one_step_errors(model: Forecaster, series: Iterable[float]) -> list[float]:
    """Absolute errors of forecasting each value from those before it (the first value only
    seeds the model)."""
    errors = []
    seeded = False
    for x in series:
        if seeded:
            errors.append(abs(model.forecast() - x))
        model = model.update(x)
        seeded = True
    return errors


def scaled_error(model: Forecaster, series: Sequence[float]) -> float:
    """Mean absolute one-step error divided by the series' mean absolute value: comparable
    across series of different scales (requests/s, tokens)."""
    errs = one_step_errors(model, series)
    scale = sum(abs(x) for x in series) / len(series) if series else 0.0
    if not errs or scale == 0:
        return 0.0
    return sum(errs) / len(errs) / scale


def candidates() -> list[Forecaster]:
    """The forecasters compared on the traces: a small grid of each kind."""
    out: list[Forecaster] = [Ewma(alpha=a) for a in (0.2, 0.3, 0.5, 0.7, 0.9)]
    out += [Holt(alpha=a, beta=b) for a in (0.3, 0.5, 0.7) for b in (0.1, 0.3)]
    return out


def choose(series_set: Sequence[Sequence[float]], models: Sequence[Forecaster]) -> Forecaster:
    """The model with the least mean scaled error over all series (ties: the first)."""
    if not models:
        raise ValueError("no forecaster to choose from")
    best, best_err = models[0], math.inf
    for m in models:
        err = sum(scaled_error(m, s) for s in series_set) / max(len(series_set), 1)
        if err < best_err:
            best, best_err = m, err
    return best


DEFAULT_FORECASTER: Forecaster = Ewma(alpha=0.5)
"""What the planner uses; set from `forecast_eval` on the bundled traces (see
docs/architecture.md for the measured errors)."""
