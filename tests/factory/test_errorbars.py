"""Error bars: built from held-out cross-validation errors, and they cover what they claim."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from tokenfab.factory.errorbars import (
    LEVEL,
    ErrorBars,
    Residual,
    build,
    bundled_error_bars,
    read_residuals,
)

DATA = Path(str(resources.files("tokenfab.factory").joinpath("data")))


@pytest.fixture(scope="module")
def residuals() -> list[Residual]:
    f = DATA / "cv_residuals.csv"
    if not f.is_file():  # produced by a cross-validation run (see errorbars.py)
        pytest.skip("no data/cv_residuals.csv shipped: run benchmarks/plan_accuracy.py --loso")
    return read_residuals(f)


def _inside(bars: ErrorBars, r: Residual, metric: str) -> bool:
    lo, hi = bars.factors(r.mode, r.backend)[metric]
    # a residual is log(measured / predicted): inside when measured / predicted is in [lo, hi]
    from math import exp

    return lo <= exp(getattr(r, metric)) <= hi


def test_80pct_bars_cover_about_80pct_of_unseen_folds(residuals):
    # folds are GPU systems: bars built on the other systems' held-out errors, checked on
    # the held-out system's rows, for every system
    folds = sorted({r.fold for r in residuals})
    assert len(folds) >= 2
    for metric in ("ttft", "tpot"):
        hits = []
        for f in folds:
            bars = build(r for r in residuals if r.fold != f)
            hits += [_inside(bars, r, metric) for r in residuals
                     if r.fold == f and getattr(r, metric) is not None]  # fmt: skip
        cover = sum(hits) / len(hits)
        assert 0.72 <= cover <= 0.88, (metric, cover)


def test_bars_differ_by_mode(residuals):
    bars = build(residuals)
    assert {"agg", "disagg", "all"} <= set(bars.groups)
    agg, dis = bars.groups["agg"]["ttft"], bars.groups["disagg"]["ttft"]
    assert agg != dis


def test_shipped_bars_are_rebuilt_from_the_shipped_residuals(residuals):
    if not (DATA / "error_bars.json").is_file():
        pytest.skip("no data/error_bars.json shipped")
    shipped = json.loads((DATA / "error_bars.json").read_text())
    assert shipped["level"] == LEVEL and shipped["rows"] == len(residuals)
    assert shipped["groups"] == build(residuals).to_dict()["groups"]
    assert bundled_error_bars().groups  # loaded, not the empty fallback


def test_quantile_bars_cover_their_level_on_fresh_draws():
    # the method on residuals of known spread: bars from 4 folds of draws cover ~80% of a
    # fifth, per mode, even when the modes' spreads differ 3x
    import numpy as np

    rng = np.random.default_rng(0)

    def draws(fold: int, n: int) -> list[Residual]:
        out = []
        for mode, sd in (("agg", 0.2), ("disagg", 0.6)):
            t, p = rng.normal(0.1, sd, n), rng.normal(-0.05, sd / 2, n)
            out += [
                Residual(fold, mode, "vllm", float(a), float(b)) for a, b in zip(t, p, strict=True)
            ]
        return out

    train = [r for f in range(4) for r in draws(f, 300)]
    test = draws(4, 2000)
    bars = build(train)
    for metric in ("ttft", "tpot"):
        for mode in ("agg", "disagg"):
            sub = [r for r in test if r.mode == mode]
            cover = sum(_inside(bars, r, metric) for r in sub) / len(sub)
            assert 0.76 <= cover <= 0.84, (metric, mode, cover)


def test_interval_and_throughput_factors_move_together():
    bars = ErrorBars(0.8, {"all": {"ttft": (0.5, 2.0), "tpot": (0.8, 1.25)}})
    (tl, th), (pl, ph) = bars.interval("agg", "vllm", 100.0, 10.0)
    assert (tl, th, pl, ph) == (50.0, 200.0, 8.0, 12.5)
    lo, hi = bars.throughput_factors("agg", "vllm", 100.0, 10.0, osl=101)
    # slow end: 200 + 100 * 12.5 = 1450 ms per request vs 1100 predicted
    assert lo == pytest.approx(1100 / 1450) and hi == pytest.approx(1100 / 850)
