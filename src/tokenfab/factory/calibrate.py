"""Calibration of the performance model's efficiencies on measured serving data.

The model has a handful of physically meaningful parameters (`perf.Calibration`): achieved
fractions of peak FLOPs and bandwidth, fixed per-layer/per-step/per-request costs, and two
serving-level ones. A few of them (the fixed software costs) differ by backend; the rest are
shared. They are fitted by robust Levenberg-Marquardt in log space minimizing a Cauchy loss of
the log errors of TTFT and TPOT (the median error is what we report), then in rounds of a few
coordinate pattern-search sweeps (LM stalls at kinks) and LM again until a round stops gaining,
nothing per row or per model. The result ships in `data/calibration.json`;
`params.bundled_calibration()` loads it. Cross-validation lives in `crossval.py`.

    python -m tokenfab.factory.calibrate            # refit; write data/calibration.json
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from importlib import resources
from pathlib import Path

import numpy as np

from tokenfab.factory.measured import Case
from tokenfab.factory.params import bundled_raw, calibration_from_dict, mean_backend
from tokenfab.factory.perf import DEFAULT_CAL, Calibration
from tokenfab.factory.serving import predict

# (name, low, high): searched in log space inside the bounds
COMMON_PARAMS: tuple[tuple[str, float, float], ...] = (
    ("flops_half_m", 4.0, 2048.0),
    ("flops_half_elems", 1e4, 1e9),
    ("attn_eff", 0.05, 0.9),
    ("decode_attn_eff", 0.02, 0.9),
    ("expert_us", 0.01, 50.0),
    ("linear_prefill_us", 1.0, 5000.0),
    ("link_eff", 0.1, 0.95),
    ("scaleout_lat_us", 1.0, 500.0),
    ("a2a_lat_us", 0.5, 500.0),
    ("fp4_flops_scale", 0.2, 1.0),
    ("moe_layer_us", 0.5, 200.0),
    ("mla_layer_us", 0.5, 200.0),
    ("moe_imbalance", 0.05, 20.0),
    ("disagg_ms", 1.0, 2000.0),
    ("disagg_queue_weight", 0.01, 4.0),
    ("bench_requests", 50.0, 1e6),
    ("prefill_util", 0.3, 0.97),
    ("max_decode_batch", 16.0, 4096.0),
    ("decode_pool_gpus", 1.0, 512.0),
)
# each engine brings its own kernels (GEMM/MoE/attention libraries), fixed software costs and
# scheduling policy
BACKEND_PARAMS: tuple[tuple[str, float, float], ...] = (
    ("bw_eff", 0.3, 0.95),
    ("flops_eff", 0.2, 0.95),
    ("coll_lat_us", 1.0, 200.0),
    ("layer_us", 0.5, 200.0),
    ("prefill_layer_us", 1.0, 3000.0),
    ("moe_prefill_us", 1.0, 5000.0),
    ("mla_prefill_us", 1.0, 5000.0),
    ("step_ms", 0.05, 20.0),
    ("seq_us", 0.1, 500.0),
    ("ttft_ms", 1.0, 1000.0),
    ("queue_weight", 0.01, 2.0),
    ("first_steps", 0.1, 8.0),
    ("prefill_chunk", 512.0, 32768.0),
)
BACKENDS = ("trtllm", "sglang", "vllm")


# ---- fitting ------------------------------------------------------------------------------


LOSS_SCALE = 0.15  # log error (~15%) past which a row counts as an outlier


def _robust(e: np.ndarray, scale: float = LOSS_SCALE) -> float:
    """Mean Cauchy loss of log errors: quadratic near 0, growing only logarithmically past
    `scale`, so unexplainable outliers (runs whose TTFT held minutes of queueing) don't pull
    the parameters away from the bulk of the rows."""
    return float(np.mean(np.log1p((e / scale) ** 2))) if len(e) else 0.0


class _Objective:
    """Mean |log error| of TTFT and TPOT over cases for a parameter vector."""

    def __init__(self, cases: Sequence[Case]):
        self.cases = [c for c in cases if c.ttft_ms or c.tpot_ms]
        self.backends = sorted({self._bk(c) for c in self.cases})
        self.names: list[tuple[str, str | None]] = [(n, None) for n, _, _ in COMMON_PARAMS]
        self.bounds = [(lo, hi) for _, lo, hi in COMMON_PARAMS]
        for b in self.backends:
            self.names += [(n, b) for n, _, _ in BACKEND_PARAMS]
            self.bounds += [(lo, hi) for _, lo, hi in BACKEND_PARAMS]

    @staticmethod
    def _bk(c: Case) -> str:
        return c.backend if c.backend in BACKENDS else "other"

    def cals(self, x: np.ndarray) -> dict[str, Calibration]:
        common = {n: float(v) for (n, b), v in zip(self.names, x, strict=True) if b is None}
        out = {}
        for bk in self.backends:
            per = {n: float(v) for (n, b), v in zip(self.names, x, strict=True) if b == bk}
            out[bk] = replace(DEFAULT_CAL, **common, **per)
        return out

    def errors(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cals = self.cals(x)
        te, pe = [], []
        for c in self.cases:
            p = predict(c.model, c.system, c.deployment, cals[self._bk(c)])
            if c.ttft_ms:
                te.append(math.log(max(p.ttft_ms, 1e-6) / c.ttft_ms))
            if c.tpot_ms:
                pe.append(math.log(max(p.tpot_ms, 1e-6) / c.tpot_ms))
        return np.array(te), np.array(pe)

    def __call__(self, x: np.ndarray) -> float:
        te, pe = self.errors(x)
        return _robust(te) + _robust(pe)

    def residuals(self, x: np.ndarray, w: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """IRLS residuals: log errors weighted by fixed robust weights `w`, TTFT and TPOT
        each normalized to count equally."""
        te, pe = self.errors(x)
        return np.concatenate(
            [te * np.sqrt(w[0] / max(len(te), 1)), pe * np.sqrt(w[1] / max(len(pe), 1))]
        )

    def start(self, base: Calibration = DEFAULT_CAL) -> np.ndarray:
        return np.array([float(getattr(base, n)) for n, _ in self.names])


def pattern_search(
    f: Callable[[np.ndarray], float],
    x0: np.ndarray,
    bounds: Sequence[tuple[float, float]],
    sweeps: int = 6,
    step: float = 2.0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, float]:
    """Coordinate pattern search on log(x): try x*s and x/s per coordinate, keep what
    improves, shrink s each sweep. Deterministic and derivative-free (the loss has kinks)."""
    lo = np.log([b[0] for b in bounds])
    hi = np.log([b[1] for b in bounds])
    y = np.clip(np.log(x0), lo, hi)
    best = f(np.exp(y))
    s = math.log(step)
    for sweep in range(sweeps):
        for i in range(len(y)):
            for d in (s, -s):
                t = y.copy()
                t[i] = min(max(t[i] + d, lo[i]), hi[i])
                if t[i] == y[i]:
                    continue
                v = f(np.exp(t))
                if v < best - 1e-9:
                    y, best = t, v
                    # keep going in a direction that works
                    while True:
                        t2 = y.copy()
                        t2[i] = min(max(t2[i] + d, lo[i]), hi[i])
                        if t2[i] == y[i]:
                            break
                        v2 = f(np.exp(t2))
                        if v2 >= best - 1e-9:
                            break
                        y, best = t2, v2
                    break
        if progress:
            progress(sweep, best)
        s /= 2.0
    return np.exp(y), best


def levenberg_marquardt(
    obj: _Objective,
    x0: np.ndarray,
    bounds: Sequence[tuple[float, float]],
    iters: int = 12,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, float]:
    """Robust (IRLS, Cauchy weights) Levenberg-Marquardt on log(parameters) inside bounds,
    with a forward-difference Jacobian; a weak pull toward the start keeps parameters that
    the data cannot see where physics put them."""
    lo = np.log([b[0] for b in bounds])
    hi = np.log([b[1] for b in bounds])
    y0 = np.clip(np.log(x0), lo, hi)
    y, lam, h, prior = y0.copy(), 1e-2, 0.02, 0.005
    best = obj(np.exp(y))
    for it in range(iters):
        te, pe = obj.errors(np.exp(y))
        w = (1.0 / (1.0 + (te / LOSS_SCALE) ** 2), 1.0 / (1.0 + (pe / LOSS_SCALE) ** 2))

        def res(yy: np.ndarray, w=w) -> np.ndarray:
            return np.concatenate([obj.residuals(np.exp(yy), w), prior * (yy - y0)])

        r = res(y)
        jac = np.empty((len(r), len(y)))
        for j in range(len(y)):
            step = h if y[j] + h <= hi[j] else -h
            yj = y.copy()
            yj[j] += step
            jac[:, j] = (res(yj) - r) / step
        jtj, jtr = jac.T @ jac, jac.T @ r
        improved = False
        # damping rises until a step helps (one Jacobian serves every trial)
        while lam <= 1e4:
            a = jtj + lam * np.diag(np.diag(jtj) + 1e-9)
            dy = np.linalg.solve(a, -jtr)
            cand = np.clip(y + dy, lo, hi)
            val = obj(np.exp(cand))
            if val < best - 1e-7:
                # a step that gains almost nothing ends the descent: stalled, not converging
                improved = val < best - 1e-4
                y, best, lam = cand, val, max(lam / 3.0, 1e-6)
                break
            lam *= 4.0
        if progress:
            progress(it, best)
        if not improved:
            break
    return np.exp(y), best


def fit(
    cases: Sequence[Case],
    sweeps: int = 25,
    start: dict | None = None,
    progress: Callable[[int, float], None] | None = None,
    polish: int = 2,
    rounds: int = 4,
) -> dict:
    """Fit the calibration on cases; returns the JSON-able {"common", "backends"} dict."""
    obj = _Objective(cases)
    x0 = obj.start()
    if start:
        for i, (n, b) in enumerate(obj.names):
            common = start.get("common", {})
            # a parameter that moved between shared and per backend starts from its old value
            src = common if b is None else {**common, **start.get("backends", {}).get(b, {})}
            if b is None and n not in src:
                src = mean_backend(start.get("backends", {}))
            if n in src:
                x0[i] = src[n]
    x, best = levenberg_marquardt(obj, x0, obj.bounds, iters=sweeps, progress=progress)
    for _ in range(rounds if polish else 0):
        # LM stalls at kinks of the loss (ceil/min in the serving model): a few derivative-free
        # coordinate sweeps get past them, and LM may then descend again from where they end
        x, _ = pattern_search(obj, x, obj.bounds, sweeps=polish, step=1.5)
        x, val = levenberg_marquardt(obj, x, obj.bounds, iters=sweeps, progress=progress)
        if val > best - 1e-3:
            break
        best = val
    common = {n: round(float(v), 6) for (n, b), v in zip(obj.names, x, strict=True) if b is None}
    per: dict[str, dict[str, float]] = {}
    for (n, b), v in zip(obj.names, x, strict=True):
        if b is not None:
            per.setdefault(b, {})[n] = round(float(v), 6)
    return {"common": common, "backends": per}


def cals_from_fit(result: dict) -> Callable[[str], Calibration]:
    def cal_for(backend: str) -> Calibration:
        per = result["backends"]
        extra = per.get(backend) or mean_backend(per)
        return calibration_from_dict({**asdict(DEFAULT_CAL), **result["common"], **extra})

    return cal_for


def main() -> None:
    import time

    from tokenfab.factory.measured import load_cases

    data = resources.files("tokenfab.factory").joinpath("data/measured_serving.csv")
    cases, _ = load_cases(Path(str(data)))
    t0 = time.perf_counter()
    result = fit(
        cases,
        start=bundled_raw() or None,
        progress=lambda i, v: print(f"iter {i}: loss {v:.4f} ({time.perf_counter() - t0:.0f}s)"),
    )
    result["fitted_on"] = f"measured_serving.csv ({len(cases)} rows)"
    out = Path(str(resources.files("tokenfab.factory").joinpath("data/calibration.json")))
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
