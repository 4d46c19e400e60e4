"""Accuracy of the factory model on measured serving data, under cross-validation.

For each split the calibration is refitted from the uncalibrated defaults on the training
folds and every held-out row is predicted with exactly what `tokenfab plan` uses; the script
prints TTFT/TPOT MdAPE and p90 APE, by kind of row, and the share of held-out rows inside the
shipped 80% error bars. `--residuals FILE` writes each held-out row's log(measured /
predicted) of the last split run (the source of `data/error_bars.json`).

Splits:
- random 5-fold (rows at random),
- grouped 5-fold by series (a whole concurrency sweep of one deployment is held out together,
  so repeated measurements of the same configuration cannot leak),
- leave-one-model-out (`--lomo`: every row of a model held out; slow, one fit per model),
- leave-one-system-out (`--loso`: every row of a GPU system held out, the way rows from GPUs
  outside the file will be predicted; one fit per system).

    .venv/bin/python benchmarks/plan_accuracy.py [--data FILE] [--folds 5] [--lomo] [--loso]
        [--no-random | --no-grouped | --no-kfold] [--residuals FILE] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

from tokenfab.factory.crossval import cross_validate, kfold
from tokenfab.factory.errorbars import bundled_error_bars, log_ratio, write_residuals
from tokenfab.factory.measured import load_cases
from tokenfab.factory.serving import AggDeployment
from tokenfab.factory.validate import predict_cases, summarize


def _series(c) -> tuple:
    d = c.deployment
    lay = d.layout if isinstance(d, AggDeployment) else (d.prefill_layout, d.decode_layout)
    return (c.model.name, c.system.key, c.backend, lay, d.isl, d.osl)


def _kind(c) -> str:
    if isinstance(c.deployment, AggDeployment):
        return "agg"
    return "disagg, pools given" if c.pools_known else "disagg, pools inferred"


def _by_kind(label: str, cases, results) -> dict[str, dict]:
    """Summaries of the results of each kind of row, keyed `label + kind`."""
    out = {}
    for kind in ("agg", "disagg, pools given", "disagg, pools inferred"):
        sub = [r for c, r in zip(cases, results, strict=True) if _kind(c) == kind]
        out[label + kind] = summarize(sub, len(sub), 0, bundled_error_bars())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = resources.files("tokenfab.factory").joinpath("data/measured_serving.csv")
    ap.add_argument("--data", type=Path, default=Path(str(default)))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--sweeps", type=int, default=25, help="most fit iterations per fold")
    ap.add_argument("--lomo", action="store_true", help="also leave-one-model-out")
    ap.add_argument("--loso", action="store_true", help="also leave-one-system-out")
    ap.add_argument("--no-kfold", action="store_true", help="skip the k-fold splits")
    ap.add_argument(
        "--no-grouped", action="store_true", help="random k-fold only (skip the grouped split)"
    )
    ap.add_argument(
        "--no-random", action="store_true", help="grouped k-fold only (skip the random split)"
    )
    ap.add_argument(
        "--residuals", type=Path, help="write the last split's held-out log errors here"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    cases, skipped = load_cases(args.data)
    rows = len(cases) + len(skipped)
    report: dict[str, dict] = {}

    t = time.perf_counter()
    bars = bundled_error_bars()
    report["in-sample (bundled calibration)"] = summarize(
        predict_cases(cases), rows, len(skipped), bars
    )
    splits = {}
    if not args.no_kfold:
        if not args.no_random:
            splits[f"random {args.folds}-fold"] = kfold(cases, args.folds, seed=0)
        if not args.no_grouped:
            splits[f"grouped {args.folds}-fold by series"] = kfold(
                cases, args.folds, seed=0, key=_series
            )
    if args.lomo:
        models = sorted({c.model.name for c in cases})
        splits["leave-one-model-out"] = [models.index(c.model.name) for c in cases]
    if args.loso:
        systems = sorted({c.system.key for c in cases})
        splits["leave-one-system-out"] = [systems.index(c.system.key) for c in cases]
    for name, folds in splits.items():
        t0 = time.perf_counter()
        res = cross_validate(
            cases,
            folds,
            sweeps=args.sweeps,
            progress=lambda m, n=name: print(f"  {n}: {m}", flush=True),
        )
        report[name] = summarize(res, rows, len(skipped), bars)
        report[name]["seconds"] = round(time.perf_counter() - t0, 1)
        # the same held-out predictions by kind of row
        report.update(_by_kind(f"  {name}: ", cases, res))
        if name == "leave-one-system-out":  # how each GPU system fares when it is the new one
            for sysname in sorted({c.system.key for c in cases}):
                sub = [r for c, r in zip(cases, res, strict=True) if c.system.key == sysname]
                report[f"  {name}: {sysname} held out"] = summarize(sub, len(sub), 0, bars)
        if args.residuals:
            write_residuals(
                args.residuals,
                [
                    (c.row_id, f, r.mode, r.backend, log_ratio(r.ttft_ms, r.ttft_meas),
                     log_ratio(r.tpot_ms, r.tpot_meas))
                    for c, f, r in zip(cases, folds, res, strict=True)
                ],
            )  # fmt: skip

    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(
        f"\n{args.data.name}: {rows} rows, {len(skipped)} skipped ({time.perf_counter() - t:.0f}s)"
    )
    head = f"{'split':58s} {'rows':>5s} {'TTFT MdAPE':>10s} {'p90':>7s} {'TPOT MdAPE':>10s} {'p90':>7s}"
    print(head + f" {'in 80% bars (TTFT/TPOT)':>24s}")
    for name, s in report.items():
        vals = [s[k] for k in ("ttft_mdape", "ttft_p90_ape", "tpot_mdape", "tpot_p90_ape")]
        # a kind of row the file does not have summarizes to None
        cells = ["-" if v is None else f"{v:.1f}%" for v in vals]
        cover = [s.get(k) for k in ("ttft_in_interval", "tpot_in_interval")]
        bars = " / ".join("-" if v is None else f"{100 * v:.0f}%" for v in cover)
        print(
            f"{name:58s} {s['predicted']:5d} {cells[0]:>10s} {cells[1]:>7s} "
            f"{cells[2]:>10s} {cells[3]:>7s} {bars:>24s}"
        )


if __name__ == "__main__":
    main()
