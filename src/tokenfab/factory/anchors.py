"""Measured anchors: a prediction for a deployment that has been measured is pulled toward
those measurements.

Why a second layer on top of the calibrated physics: the physics model's error on the
measured file sits in the level of whole deployments, not in their shape. Within one
concurrency sweep the error is small once the sweep's own level is removed; the levels are
set by what the file does not record (speculative decoding on or off, harness, engine flags),
and no recorded feature explains them. What does predict a deployment's level is other
measurements of the same deployment. So for a row whose *family* (backend, backend version,
model, system, mode, precisions; for a disaggregated one also its lengths and pool layouts)
has measurements, the prediction is multiplied by `exp(r)`, `r` an estimate of
log(measured / physics) from the family's other points, pooled in three steps, each shrunk
toward zero by a pseudo-count so a lone point moves little:

1. the family's median log ratio, times n / (n + `k_family`);
2. the median of what is left over the same sweep (same lengths and layout), times
   n / (n + `k_sweep`);
3. a kernel-weighted mean of what is then left over the sweep's points at nearby concurrency
   (weights exp(-d^2 / 2 sigma^2), d in doublings), divided by (sum of weights + `k_local`).

Coarser groups (backend x model x system across versions, backend x model) are deliberately
not used: with whole backend versions or whole families held out they made predictions worse,
not better (their residuals do not carry over). A row from another GPU, another backend
version or an unmeasured family keeps the physics prediction unchanged. A point never anchors
its own row (same id, same measured values), so `plan validate` on the measured file itself
reports leave-one-out errors of this layer (its physics is still fitted in-sample).

The anchors are built from the bundled measurements and the bundled calibration
(`data/anchors.json`); `python -m tokenfab.factory.anchors` rebuilds them after a refit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tokenfab.factory.perf import Layout
from tokenfab.factory.serving import AggDeployment

if TYPE_CHECKING:
    from tokenfab.factory.measured import Case
    from tokenfab.factory.validate import RowResult


@dataclass(frozen=True)
class AnchorParams:
    k_family: float = 1.0
    k_sweep: float = 1.0
    k_local: float = 1.0
    sigma: float = 1.0  # kernel width in doublings of concurrency


def _layout_sig(lay: Layout) -> str:
    return f"tp{lay.tp}pp{lay.pp}dp{lay.attn_dp}etp{lay.moe_tp_size}ep{lay.ep}"


def _precision_sig(lay: Layout) -> str:
    return f"{lay.precision}/{lay.moe_precision or '-'}/{lay.kv_precision or '-'}"


def family_key(case: Case) -> str:
    """What stays the same across an aggregated deployment's measurements except lengths and
    layout. A disaggregated deployment's level is set by its two pools and how prompts
    arrive at them, so its family is its sweep: held out whole, other sweeps of the same
    engine and model made its errors worse (TTFT p90 doubled)."""
    d = case.deployment
    agg = isinstance(d, AggDeployment)
    lay = d.layout if agg else d.decode_layout
    mode = "agg" if agg else f"disagg|{sweep_key(case)}"
    return "|".join(
        (case.backend, case.version, case.model.name, case.system.key, mode, _precision_sig(lay))
    )


def sweep_key(case: Case) -> str:
    """A concurrency sweep of the family: same lengths and worker layouts."""
    d = case.deployment
    if isinstance(d, AggDeployment):
        lay = _layout_sig(d.layout)
    else:
        pools = f"pb{d.prefill_batch}" if case.pools_known else "pools?"
        lay = f"P{_layout_sig(d.prefill_layout)}D{_layout_sig(d.decode_layout)}{pools}"
    return f"{d.isl}x{d.osl}|{lay}"


def log_concurrency(case: Case) -> float:
    d = case.deployment
    users = d.concurrency if isinstance(d, AggDeployment) else d.users
    return math.log2(max(users, 1))


@dataclass
class _Family:
    ids: np.ndarray  # row ids (object)
    sweeps: np.ndarray  # sweep keys (object)
    log_conc: np.ndarray
    resid: np.ndarray  # (n, 2) log(measured / physics) for TTFT, TPOT; NaN: not measured
    measured: np.ndarray  # (n, 2) the measured TTFT, TPOT in ms; NaN: not measured


def _shrunk_median(r: np.ndarray, k: float) -> float:
    return float(np.median(r)) * len(r) / (len(r) + k) if len(r) else 0.0


@dataclass
class Anchors:
    families: dict[str, _Family]
    params: AnchorParams = field(default_factory=AnchorParams)

    def log_correction(self, case: Case) -> tuple[float, float]:
        """Estimated log(measured / physics) of TTFT and TPOT for the case (0: no anchor)."""
        fam = self.families.get(family_key(case))
        if fam is None:
            return 0.0, 0.0
        keep = ~_same_measurement(fam, case)
        in_sweep = keep & (fam.sweeps == sweep_key(case))
        w = np.exp(-((fam.log_conc - log_concurrency(case)) ** 2) / (2 * self.params.sigma**2))
        return tuple(  # type: ignore[return-value]
            self._one(fam.resid[:, m], keep, in_sweep, w) for m in range(2)
        )

    def _one(self, r: np.ndarray, keep: np.ndarray, in_sweep: np.ndarray, w: np.ndarray) -> float:
        p = self.params
        ok = ~np.isnan(r)
        level = _shrunk_median(r[keep & ok], p.k_family)
        sw = in_sweep & ok
        if not sw.any():
            return level
        left = r[sw] - level
        sweep = _shrunk_median(left, p.k_sweep)
        left = left - sweep
        local = float(np.sum(w[sw] * left) / (np.sum(w[sw]) + p.k_local))
        return level + sweep + local

    def to_dict(self) -> dict:
        fams = {}
        for key, f in self.families.items():
            fams[key] = [
                [
                    i,
                    s,
                    round(float(c), 4),
                    *(None if np.isnan(x) else float(f"{x:.6g}") for x in r),
                ]
                for i, s, c, r in zip(
                    f.ids, f.sweeps, f.log_conc, np.hstack([f.resid, f.measured]), strict=True
                )
            ]
        return {"params": asdict(self.params), "families": fams}

    @classmethod
    def from_dict(cls, d: dict) -> Anchors:
        fams = {
            key: _family(
                [
                    (*p[:3], *([np.nan if x is None else x for x in p[i : i + 2]] for i in (3, 5)))
                    for p in pts
                ]
            )
            for key, pts in d["families"].items()
        }
        return cls(fams, AnchorParams(**d.get("params", {})))


def _family(points: Sequence[tuple]) -> _Family:
    """A family from (row id, sweep key, log2 concurrency, (TTFT, TPOT) log ratios,
    measured (TTFT, TPOT)) points."""
    return _Family(
        ids=np.array([p[0] for p in points], dtype=object),
        sweeps=np.array([p[1] for p in points], dtype=object),
        log_conc=np.array([p[2] for p in points], dtype=float),
        resid=np.array([p[3] for p in points], dtype=float).reshape(-1, 2),
        measured=np.array([p[4] for p in points], dtype=float).reshape(-1, 2),
    )


def _same_measurement(fam: _Family, case: Case) -> np.ndarray:
    """Points that are the case's own measurement: same row id and the same measured values
    (a later re-measurement under the same id is another measurement and may anchor it)."""
    same = fam.ids == case.row_id
    for m, v in enumerate((case.ttft_ms, case.tpot_ms)):
        col = fam.measured[:, m]
        if v is None:
            same &= np.isnan(col)
        else:
            same &= np.isclose(col, v, rtol=1e-5, atol=0.0)
    return same


def _log_ratio(meas: float | None, pred: float) -> float:
    if meas is None or not (0 < meas < math.inf and 0 < pred < math.inf):
        return math.nan
    return math.log(meas / pred)


def build_anchors(
    cases: Sequence[Case], physics: Sequence[RowResult], params: AnchorParams | None = None
) -> Anchors:
    """Anchors from measured cases and the physics predictions of the same cases."""
    groups: dict[str, list[tuple]] = {}
    for c, r in zip(cases, physics, strict=True):
        res = (_log_ratio(c.ttft_ms, r.ttft_ms), _log_ratio(c.tpot_ms, r.tpot_ms))
        if all(math.isnan(x) for x in res):
            continue
        meas = tuple(math.nan if v is None else v for v in (c.ttft_ms, c.tpot_ms))
        groups.setdefault(family_key(c), []).append(
            (c.row_id, sweep_key(c), log_concurrency(c), res, meas)
        )
    fams = {k: _family(pts) for k, pts in groups.items()}
    return Anchors(fams, params or AnchorParams())


_FILE = "data/anchors.json"


@cache
def bundled_anchors() -> Anchors | None:
    """The shipped anchors (None when the file is absent: predictions are physics only)."""
    f = resources.files("tokenfab.factory").joinpath(_FILE)
    return Anchors.from_dict(json.loads(f.read_text())) if f.is_file() else None


def write_bundled(cases: Sequence[Case], physics: Sequence[RowResult]) -> Path:
    out = Path(str(resources.files("tokenfab.factory").joinpath(_FILE)))
    out.write_text(json.dumps(build_anchors(cases, physics).to_dict(), separators=(",", ":")))
    bundled_anchors.cache_clear()
    return out


def main() -> None:
    """Rebuild `data/anchors.json` from the bundled measurements and calibration."""
    from tokenfab.factory.measured import load_cases
    from tokenfab.factory.validate import predict_cases

    data = resources.files("tokenfab.factory").joinpath("data/measured_serving.csv")
    cases, _ = load_cases(Path(str(data)))
    out = write_bundled(cases, predict_cases(cases, physics_only=True))
    print(f"wrote {out} ({len(cases)} measured rows)")


if __name__ == "__main__":
    main()
