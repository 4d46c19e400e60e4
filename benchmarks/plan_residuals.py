"""Where the factory model's held-out error lives: the leave-one-GPU-out residuals by group.

Reads the held-out log(measured / predicted) of every bundled row (`data/cv_residuals.csv`,
written by `plan_accuracy.py --loso --no-kfold --residuals FILE`), joins each row's
configuration from the measured data, and prints TTFT/TPOT MdAPE and the median log ratio
(> 0: the model predicts too little) per GPU system, backend x mode, system x backend x mode,
model, ISL x OSL and concurrency band, so a physics fix can be aimed at the rows that carry the
error. No fitting happens here: it only regroups residuals that cross-validation produced.

    .venv/bin/python benchmarks/plan_residuals.py [--residuals FILE] [--data FILE]
        [--min-rows 15] [--json]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from tokenfab.factory.measured import Case, load_cases
from tokenfab.factory.serving import AggDeployment
from tokenfab.factory.validate import mode_of


def _conc(c: Case) -> int:
    d = c.deployment
    return d.concurrency if isinstance(d, AggDeployment) else d.users


def _band(n: int) -> str:
    lo = 4 ** min(int(math.log(max(n, 1), 4)), 4)
    return f"{lo}-{lo * 4 - 1}" if lo < 256 else ">=256"


GROUPS: dict[str, Callable[[Case], str]] = {
    "system": lambda c: c.system.key,
    "backend/mode": lambda c: f"{c.backend}/{mode_of(c)}",
    "system/backend/mode": lambda c: f"{c.system.key}/{c.backend}/{mode_of(c)}",
    "model": lambda c: c.model.name,
    "isl x osl": lambda c: f"{c.deployment.isl}x{c.deployment.osl}",
    "mode/concurrency": lambda c: f"{mode_of(c)}/{_band(_conc(c))}",
}


def _stats(logs: list[float]) -> tuple[float | None, float | None]:
    """(MdAPE %, median log ratio); APE = |pred - meas| / meas = |exp(-log ratio) - 1|."""
    if not logs:
        return None, None
    a = np.array(logs)
    return round(float(np.median(np.abs(np.exp(-a) - 1)) * 100), 1), round(float(np.median(a)), 2)


def profile(cases: list[Case], resid: dict[str, tuple], min_rows: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for name, key in {"all": lambda c: "all", **GROUPS}.items():
        groups: dict[str, list[tuple]] = defaultdict(list)
        for c in cases:
            if c.row_id in resid:
                groups[key(c)].append(resid[c.row_id])
        rows = []
        for g, vals in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            if len(vals) < min_rows:
                continue
            t_mdape, t_med = _stats([v[0] for v in vals if v[0] is not None])
            p_mdape, p_med = _stats([v[1] for v in vals if v[1] is not None])
            rows.append(
                dict(group=g, rows=len(vals), ttft_mdape=t_mdape, ttft_median_log=t_med,
                     tpot_mdape=p_mdape, tpot_median_log=p_med)
            )  # fmt: skip
        out[name] = rows
    return out


def _read_residuals(path: Path) -> dict[str, tuple]:
    def num(v: str) -> float | None:
        return float(v) if v else None

    with path.open() as f:
        return {r["id"]: (num(r["ttft_log_ratio"]), num(r["tpot_log_ratio"])) for r in csv.DictReader(f)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = resources.files("tokenfab.factory").joinpath("data")
    ap.add_argument("--residuals", type=Path, default=Path(str(data / "cv_residuals.csv")))
    ap.add_argument("--data", type=Path, default=Path(str(data / "measured_serving.csv")))
    ap.add_argument("--min-rows", type=int, default=15, help="hide groups with fewer rows")
    ap.add_argument("--json", action="store_true", help="print the tables as JSON")
    args = ap.parse_args()
    cases, _ = load_cases(args.data)
    out = profile(cases, _read_residuals(args.residuals), args.min_rows)
    if args.json:
        print(json.dumps(out, indent=1))
        return
    for name, rows in out.items():
        print(f"\n{name:40s} {'rows':>5s}  TTFT MdAPE (med log)  TPOT MdAPE (med log)")
        for r in rows:
            print(
                f"{r['group']:40s} {r['rows']:5d}  {r['ttft_mdape']:6.1f}% ({r['ttft_median_log']:+.2f})"
                f"       {r['tpot_mdape']:6.1f}% ({r['tpot_median_log']:+.2f})"
            )


if __name__ == "__main__":
    main()
