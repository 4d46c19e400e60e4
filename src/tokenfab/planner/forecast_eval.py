"""Measure the forecasters' one-step errors on real traces and print which one wins.

    python -m tokenfab.planner.forecast_eval [TRACE ...] [--interval S] [--json]

Each trace is cut into intervals of `--interval` seconds of its own time; the series
forecast are what the planner forecasts: requests/s, prompt tokens/s and output tokens/s.
Without traces, the three bundled ones are used.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from tokenfab.bench.traces import BUNDLED, TraceRow, load_trace, resolve_trace
from tokenfab.planner.forecast import Forecaster, candidates, choose, scaled_error

SERIES = ("requests_per_s", "prompt_tokens_per_s", "output_tokens_per_s")


def bucket(rows: Sequence[TraceRow], interval_s: float) -> dict[str, list[float]]:
    """Per-interval rates of one trace (empty intervals count as zero load)."""
    if not rows:
        return {k: [] for k in SERIES}
    t0 = rows[0].timestamp_s
    n = int((rows[-1].timestamp_s - t0) // interval_s) + 1
    req, pre, out = [0.0] * n, [0.0] * n, [0.0] * n
    for r in rows:
        i = int((r.timestamp_s - t0) // interval_s)
        req[i] += 1 / interval_s
        pre[i] += r.input_len / interval_s
        out[i] += r.output_len / interval_s
    return dict(zip(SERIES, (req, pre, out), strict=True))


def describe(m: Forecaster) -> str:
    if hasattr(m, "beta"):
        return f"holt(alpha={m.alpha}, beta={m.beta})"
    return f"ewma(alpha={m.alpha})"


def evaluate(traces: Sequence[str], interval_s: float) -> dict:
    series: list[list[float]] = []
    for t in traces:
        rows = load_trace(resolve_trace(t))
        series += [s for s in bucket(rows, interval_s).values() if len(s) > 2]
    models = candidates()
    errors = {describe(m): sum(scaled_error(m, s) for s in series) / len(series) for m in models}
    best = choose(series, models)
    return {
        "traces": list(traces),
        "interval_s": interval_s,
        "series": len(series),
        "scaled_mae": {k: round(v, 4) for k, v in errors.items()},
        "best": describe(best),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="*", default=list(BUNDLED), help="trace files or names")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds per interval")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    res = evaluate(a.traces, a.interval)
    if a.json:
        print(json.dumps(res))
        return
    print(f"{res['series']} series, {a.interval:g} s intervals, traces: {', '.join(a.traces)}")
    for name, err in sorted(res["scaled_mae"].items(), key=lambda kv: kv[1]):
        print(f"  {name:28s} mean |error| / mean = {err:.4f}")
    print(f"best: {res['best']}")


if __name__ == "__main__":
    main()
