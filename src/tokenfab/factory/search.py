"""Search over deployments: which layout, batch and pool split serves a model best on N GPUs.

The space:
- worker layouts valid for the model and system: GPUs per worker a power of two up to N;
  tensor parallelism inside the scale-up domain and dividing the heads; for MoE models every
  split of a pipeline stage's GPUs into attention TP x attention-DP and into MoE-TP x EP
  (EP dividing the experts, MoE-TP dividing the expert FFN into slices of >= 128 columns);
  pipeline stages for memory;
- per layout, batch sizes on a grid (per attention-DP rank) up to what the KV cache holds;
- aggregated: `N // gpus` identical workers;
- disaggregated: a prefill pool and a decode pool, rate-matched within N GPUs, replicated.

Aggregated points are all predicted with `serving.predict`. Disaggregated combinations are
too many to predict one by one (prefill x decode x worker counts), so they are screened in
closed form first: each prefill candidate's capacity and each decode candidate's step come from
the per-step perf model, dominated ones are dropped, and the integer worker counts that give
the most tokens/s per GPU are found with numpy for a few prefill utilizations. Only the
survivors are predicted. Every number shown to the user comes from `serving.predict`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

from tokenfab.factory.catalog import PRECISIONS, System
from tokenfab.factory.modelspec import ModelSpec
from tokenfab.factory.pareto import marginal_mask, pareto_indices
from tokenfab.factory.perf import (
    Calibration,
    Layout,
    decode_step_time,
    kv_capacity_tokens,
    prefill_time,
)
from tokenfab.factory.serving import AggDeployment, DisaggDeployment, Prediction, predict

# Sequences per attention-DP rank; a worker's batch is this times attn_dp.
BATCH_PER_RANK = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
COARSE_PER_RANK = (1, 4, 16, 64, 256, 1024)  # first pass; the full grid only near the frontier
NEAR = 0.75  # "near the frontier": within 25% of its tokens/s/GPU at the same interactivity
PREFILL_BATCH_PER_RANK = (1, 2, 4, 8)
PREFILL_TOKENS_MAX = 16384  # prompt tokens per prefill pass per rank (engines cap the chunk)
PREFILL_UTILIZATIONS = (0.5, 0.7, 0.85, 0.95)  # prefill pool load targets tried per pairing
MAX_WORKER_GPUS = 128
MIN_EXPERT_SLICE = 128  # MoE-TP keeps >= one tensor-core tile of each expert's FFN per GPU
PIPELINE_STAGES = (1, 2, 4, 8)
POLISH_TOP = 8  # best deployments whose batch is refined between grid steps
MODES = ("agg", "disagg")
# Limits applied when the user gives none: without them the "best" point is the one of most
# tokens/s/GPU, a batch nobody would serve (66k users at 6 s TTFT for R1 on 72 GB200).
# 2 s to first token and 50 ms per token (20 tokens/s, above reading speed) are the interactive
# chat targets the engines' own benchmarks use.
DEFAULT_TTFT_MS = 2000.0
DEFAULT_TPOT_MS = 50.0
# Frontier points bought dearly: at most 15% more tokens/s/user than another point that
# serves twice the tokens/s per GPU (or more) are not shown.
PRUNE_USER_GAIN = 1.15
PRUNE_GPU_COST = 2.0
BACKENDS = (None, "trtllm", "sglang", "vllm")


class PlanError(ValueError):
    """Bad input or an impossible question; the message is one line for the user."""


@dataclass(frozen=True)
class PlanQuery:
    model: ModelSpec
    system: System
    gpus: int
    isl: int
    osl: int
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    precision: str = "fp8"
    modes: tuple[str, ...] = MODES
    backend: str | None = None  # calibration of this serving backend; None = their mean

    def check(self) -> None:
        if self.gpus < 1:
            raise PlanError(f"--gpus must be >= 1, got {self.gpus}")
        if self.isl < 1 or self.osl < 1:
            raise PlanError(f"--isl and --osl must be >= 1, got {self.isl} and {self.osl}")
        if self.precision not in PRECISIONS:
            raise PlanError(f"unknown precision {self.precision!r}; one of {', '.join(PRECISIONS)}")
        for name, v in (("--ttft", self.ttft_ms), ("--tpot", self.tpot_ms)):
            if v is not None and v <= 0:
                raise PlanError(f"{name} must be > 0 ms, got {v}")
        if self.backend not in BACKENDS:
            raise PlanError(f"unknown backend {self.backend!r}; one of trtllm, sglang, vllm, auto")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise PlanError(f"unknown mode {bad}; use agg, disagg or both")


@dataclass(frozen=True)
class Candidate:
    """One evaluated deployment, replicated `replicas` times on the N GPUs asked."""

    mode: str
    deployment: AggDeployment | DisaggDeployment
    prediction: Prediction
    replicas: int
    gpus_asked: int
    allin_power_w: float

    @property
    def gpus_used(self) -> int:
        return self.replicas * self.prediction.num_gpus

    @property
    def tokens_per_s(self) -> float:
        p = self.prediction
        return self.replicas * p.tokens_per_s_per_gpu * p.num_gpus

    @property
    def tokens_per_s_per_gpu(self) -> float:
        """Output tokens/s per GPU of the N asked (idle leftover GPUs count, as when bought)."""
        return self.tokens_per_s / self.gpus_asked

    @property
    def tokens_per_s_per_user(self) -> float:
        return self.prediction.tokens_per_s_per_user

    @property
    def tokens_per_s_per_mw(self) -> float:
        return self.tokens_per_s_per_gpu * 1e6 / self.allin_power_w

    @property
    def users(self) -> int:
        d = self.deployment
        if isinstance(d, AggDeployment):
            return self.replicas * d.concurrency
        return self.replicas * (d.concurrency or d.decode_batch * d.decode_workers)

    def meets(self, ttft_ms: float | None, tpot_ms: float | None) -> bool:
        p = self.prediction
        return (ttft_ms is None or p.ttft_ms <= ttft_ms) and (
            tpot_ms is None or p.tpot_ms <= tpot_ms
        )

    def describe(self) -> str:
        """Short human form, e.g. `3x(tp1 dp8 ep8) b64` or `2P(tp4)b1 + 1D(tp1 dp16 ep16)b128`."""
        d = self.deployment
        if isinstance(d, AggDeployment):
            return f"{self.replicas}x {layout_str(d.layout)} b{d.concurrency}"
        unit = (
            f"{d.prefill_workers}P[{layout_str(d.prefill_layout)} b{d.prefill_batch}]"
            f" + {d.decode_workers}D[{layout_str(d.decode_layout)} b{d.decode_batch}]"
        )
        return unit if self.replicas == 1 else f"{self.replicas}x({unit})"

    def to_dict(self) -> dict:
        d = self.deployment
        p = self.prediction
        out: dict = {
            "mode": self.mode,
            "describe": self.describe(),
            "replicas": self.replicas,
            "gpus_used": self.gpus_used,
            "users": self.users,
            "ttft_ms": round(p.ttft_ms, 3),
            "tpot_ms": round(p.tpot_ms, 4),
            "tokens_per_s_per_user": round(p.tokens_per_s_per_user, 3),
            "tokens_per_s_per_gpu": round(self.tokens_per_s_per_gpu, 3),
            "tokens_per_s_per_mw": round(self.tokens_per_s_per_mw, 1),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "requests_per_s": round(self.replicas * p.requests_per_s, 4),
        }
        if isinstance(d, AggDeployment):
            out["layout"] = layout_dict(d.layout)
            out["batch"] = d.concurrency
        else:
            out["prefill"] = {
                "layout": layout_dict(d.prefill_layout),
                "workers": d.prefill_workers,
                "batch": d.prefill_batch,
            }
            out["decode"] = {
                "layout": layout_dict(d.decode_layout),
                "workers": d.decode_workers,
                "batch": d.decode_batch,
            }
        return out


@dataclass
class SearchResult:
    query: PlanQuery
    candidates: list[Candidate]  # every evaluated deployment that fits
    frontier: list[Candidate]  # all modes together, by increasing tokens/s/user
    frontier_by_mode: dict[str, list[Candidate]]
    best: Candidate | None  # most tokens/s/GPU within the limits
    evaluated: int  # predictions made
    screened: int  # disaggregated combinations screened in closed form
    seconds: float
    layouts: int = 0
    notes: list[str] = field(default_factory=list)


# ---- layouts ------------------------------------------------------------------------------


def _pow2_upto(n: int) -> list[int]:
    out, v = [], 1
    while v <= n:
        out.append(v)
        v *= 2
    return out


def _tp_ok(model: ModelSpec, tp: int) -> bool:
    if model.num_heads % tp:
        return False
    if model.attention == "mla":
        return True
    kv = model.num_kv_heads
    return kv % tp == 0 or tp % kv == 0


def enumerate_layouts(
    model: ModelSpec, system: System, max_gpus: int, precision: str
) -> list[Layout]:
    """All worker layouts of up to `max_gpus` GPUs valid for the model and the system."""
    out: list[Layout] = []
    for g in _pow2_upto(min(max_gpus, MAX_WORKER_GPUS)):
        for pp in PIPELINE_STAGES:
            if pp > g or g % pp or pp > model.num_layers:
                continue
            group = g // pp  # GPUs of one pipeline stage
            for tp in _pow2_upto(min(group, system.scaleup_size)):
                if not _tp_ok(model, tp):
                    continue
                dp = group // tp
                if not model.is_moe:
                    if dp == 1:  # dense attention-DP is just replication; searched as replicas
                        out.append(Layout(tp=tp, pp=pp, precision=precision))
                    continue
                for ep in _pow2_upto(group):
                    mtp = group // ep
                    if model.num_experts % ep or model.moe_ffn_dim % mtp:
                        continue
                    if mtp > 1 and model.moe_ffn_dim // mtp < MIN_EXPERT_SLICE:
                        continue
                    out.append(
                        Layout(tp=tp, pp=pp, ep=ep, attn_dp=dp, moe_tp=mtp, precision=precision)
                    )
    return out


def layout_str(lay: Layout) -> str:
    parts = [f"tp{lay.tp}"]
    if lay.pp > 1:
        parts.append(f"pp{lay.pp}")
    if lay.attn_dp > 1:
        parts.append(f"dp{lay.attn_dp}")
    if lay.ep > 1 or (lay.moe_tp or 1) > 1:
        parts.append(f"etp{lay.moe_tp_size}")
        parts.append(f"ep{lay.ep}")
    return " ".join(parts)


def layout_dict(lay: Layout) -> dict:
    return {
        "gpus": lay.num_gpus,
        "tp": lay.tp,
        "pp": lay.pp,
        "attn_dp": lay.attn_dp,
        "moe_tp": lay.moe_tp_size,
        "ep": lay.ep,
        "precision": lay.precision,
    }


def _batches(per_rank: tuple[int, ...], dp: int, max_batch: int) -> list[int]:
    out = [b * dp for b in per_rank if b * dp <= max_batch]
    if max_batch >= dp and (not out or out[-1] < max_batch <= per_rank[-1] * dp):
        out.append(max_batch - max_batch % dp)  # the KV-limited maximum itself
    return out


# ---- the search ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fit:
    layout: Layout
    max_batch: int  # sequences of isl+osl tokens the worker's KV cache holds


def _fits(q: PlanQuery, layouts: list[Layout], seq_len: int) -> list[_Fit]:
    out = []
    for lay in layouts:
        if lay.check():
            continue
        cap = kv_capacity_tokens(q.model, q.system, lay, ctx=seq_len)
        per_rank = cap // lay.attn_dp // seq_len
        if per_rank >= 1:
            out.append(_Fit(lay, per_rank * lay.attn_dp))
    return out


def _near_frontier(x: np.ndarray, y: np.ndarray, ok: np.ndarray | None = None) -> np.ndarray:
    """Mask of points within `NEAR` of the frontier (of the `ok` points) at their
    interactivity: the frontier value at x is the best y among frontier points with x' >= x."""
    sel = np.flatnonzero(ok) if ok is not None else np.arange(x.size)
    if sel.size == 0:
        return np.zeros(x.size, dtype=bool)
    idx = sel[pareto_indices(x[sel], y[sel])]
    fx, fy = x[idx], y[idx]  # increasing x, decreasing y
    j = np.searchsorted(fx, x, side="left")
    at = np.where(j < fx.size, fy[np.minimum(j, fx.size - 1)], 0.0)
    return y >= NEAR * at


def _search_agg(q: PlanQuery, fits: list[_Fit], cal: Calibration) -> tuple[list[Candidate], int]:
    """Every layout on a coarse batch grid, then the full grid for the layouts that came
    within `NEAR` of the frontier (overall, or among the points that meet the limits):
    throughput and interactivity move smoothly with the batch, so a layout far below the
    frontier at every coarse batch stays below it in between."""
    n = 0

    def run(f: _Fit, batches: list[int]) -> list[Candidate]:
        nonlocal n
        out = []
        for b in batches:
            dep = AggDeployment(f.layout, b, q.isl, q.osl)
            p = predict(q.model, q.system, dep, cal)
            n += 1
            if p.fits:
                reps = q.gpus // f.layout.num_gpus
                out.append(Candidate("agg", dep, p, reps, q.gpus, q.system.allin_power_w))
        return out

    full = [_batches(BATCH_PER_RANK, f.layout.attn_dp, f.max_batch) for f in fits]
    coarse = [[b for b in bs if b // f.layout.attn_dp in COARSE_PER_RANK or b == bs[-1]]
              for f, bs in zip(fits, full, strict=True)]  # fmt: skip
    per_layout = [run(f, bs) for f, bs in zip(fits, coarse, strict=True)]
    flat = [(i, c) for i, cs in enumerate(per_layout) for c in cs]
    if not flat:
        return [], n
    x = np.array([c.tokens_per_s_per_user for _, c in flat])
    y = np.array([c.tokens_per_s_per_gpu for _, c in flat])
    ok = np.array([c.meets(q.ttft_ms, q.tpot_ms) for _, c in flat])
    near = _near_frontier(x, y) | _near_frontier(x, y, ok)
    for i in sorted({flat[k][0] for k in np.flatnonzero(near)}):
        rest = [b for b in full[i] if b not in coarse[i]]
        per_layout[i] += run(fits[i], rest)
    return [c for cs in per_layout for c in cs], n


def _prefill_pool(q: PlanQuery, fits: list[_Fit], cal: Calibration) -> list[tuple]:
    """(layout, batch, t_one, prompts/s per worker) of non-dominated prefill candidates."""
    rows = []
    for f in fits:
        lay = f.layout
        if lay.num_gpus >= q.gpus:
            continue  # leave room for a decode worker
        cap_prompts = kv_capacity_tokens(q.model, q.system, lay, ctx=q.isl) // q.isl
        t_one = prefill_time(q.model, q.system, lay, 1, q.isl, cal)
        for b in PREFILL_BATCH_PER_RANK:
            pb = b * lay.attn_dp
            if pb > cap_prompts or b * q.isl > max(PREFILL_TOKENS_MAX, q.isl):
                continue
            rate = pb / prefill_time(q.model, q.system, lay, pb, q.isl, cal)
            rows.append((lay, pb, t_one, rate))
    if not rows:
        return []
    # keep prefill candidates that are fastest for a first token or cheapest per prompt
    keep = pareto_indices([-r[2] for r in rows], [r[3] / r[0].num_gpus for r in rows])
    return [rows[int(i)] for i in keep]


def _decode_pool(q: PlanQuery, fits: list[_Fit], cal: Calibration) -> list[tuple]:
    """(layout, batch, tpot_s, prompts/s per worker) of non-dominated decode candidates
    (coarse batch grid first, the full grid for layouts near the decode frontier)."""
    ctx = q.isl + q.osl // 2
    fits = [f for f in fits if f.layout.num_gpus < q.gpus]
    full = [_batches(BATCH_PER_RANK, f.layout.attn_dp, f.max_batch) for f in fits]

    def rows_of(i: int, batches: list[int]) -> list[tuple]:
        lay = fits[i].layout
        out = []
        for b in batches:
            tpot = decode_step_time(q.model, q.system, lay, b, ctx, cal)
            out.append((lay, b, tpot, b / (tpot * q.osl), i))
        return out

    def xy(rows: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
        return np.array([1.0 / r[2] for r in rows]), np.array([r[3] / r[0].num_gpus for r in rows])

    coarse = [[b for b in bs if b // f.layout.attn_dp in COARSE_PER_RANK or b == bs[-1]]
              for f, bs in zip(fits, full, strict=True)]  # fmt: skip
    rows = [r for i, bs in enumerate(coarse) for r in rows_of(i, bs)]
    if not rows:
        return []
    near = _near_frontier(*xy(rows))
    for i in sorted({rows[k][4] for k in np.flatnonzero(near)}):
        rows += rows_of(i, [b for b in full[i] if b not in coarse[i]])
    keep = pareto_indices(*xy(rows))
    return [rows[int(i)][:4] for i in keep]


def _search_disagg(
    q: PlanQuery, fits_full: list[_Fit], fits_prefill: list[_Fit], cal: Calibration
) -> tuple[list[Candidate], int, int]:
    pre = _prefill_pool(q, fits_prefill, cal)
    dec = _decode_pool(q, fits_full, cal)
    out: list[Candidate] = []
    n_pred = n_screen = 0
    n = q.gpus
    for dlay, db, _tpot, d_rate in dec:
        gd = dlay.num_gpus
        nd = np.arange(1, n // gd + 1)
        for play, pb, _t_one, p_rate in pre:
            gp = play.num_gpus
            for u in PREFILL_UTILIZATIONS:
                n_screen += nd.size
                npf = np.ceil(nd * d_rate / (p_rate * u)).astype(int)
                unit = npf * gp + nd * gd
                ok = unit <= n
                if not ok.any():
                    continue
                # decode-bound unit throughput, replicated as often as N allows
                tput = np.where(ok, (n // np.maximum(unit, 1)) * nd * d_rate, -1.0)
                i = int(np.argmax(tput))
                dep = DisaggDeployment(play, int(npf[i]), pb, dlay, int(nd[i]), db, q.isl, q.osl)
                p = predict(q.model, q.system, dep, cal)
                n_pred += 1
                if p.fits:
                    reps = n // p.num_gpus
                    out.append(Candidate("disagg", dep, p, reps, n, q.system.allin_power_w))
    return out, n_pred, n_screen


def _batch_of(dep: AggDeployment | DisaggDeployment) -> int:
    return dep.concurrency if isinstance(dep, AggDeployment) else dep.decode_batch


def _with_batch(dep: AggDeployment | DisaggDeployment, b: int) -> AggDeployment | DisaggDeployment:
    if isinstance(dep, AggDeployment):
        return replace(dep, concurrency=b)
    return replace(dep, decode_batch=b, concurrency=None)


def _polish(q: PlanQuery, cands: list[Candidate], cal: Calibration) -> tuple[list[Candidate], int]:
    """Between the grid batches, find the largest batch that still meets the limits for the
    few best deployments (bisection: latency grows with the batch), so the best answer is not
    an artifact of the grid spacing."""
    ok = sorted(
        (c for c in cands if c.meets(q.ttft_ms, q.tpot_ms)),
        key=lambda c: c.tokens_per_s_per_gpu,
        reverse=True,
    )
    seen: set = set()
    out: list[Candidate] = []
    n = 0
    for c in ok:
        key = _with_batch(c.deployment, 0)
        if key in seen:
            continue
        seen.add(key)
        if len(seen) > POLISH_TOP:
            break
        dp = (c.deployment.layout if c.mode == "agg" else c.deployment.decode_layout).attn_dp
        lo = _batch_of(c.deployment) // dp  # per rank; meets the limits
        hi = next((b for b in BATCH_PER_RANK if b > lo), lo * 2)  # next grid step
        best = c
        while hi - lo > 1:
            mid = (lo + hi) // 2
            dep = _with_batch(c.deployment, mid * dp)
            p = predict(q.model, q.system, dep, cal)
            n += 1
            cand = Candidate(c.mode, dep, p, c.replicas, c.gpus_asked, c.allin_power_w)
            if p.fits and cand.meets(q.ttft_ms, q.tpot_ms):
                lo = mid
                if cand.tokens_per_s_per_gpu > best.tokens_per_s_per_gpu:
                    best = cand
            else:
                hi = mid
        if best is not c:
            out.append(best)
    return out, n


def _prune(front: list[Candidate]) -> tuple[list[Candidate], int]:
    """The frontier without points that buy a sliver of interactivity at a multiple of the
    GPUs (`pareto.marginal_mask`), and how many were dropped."""
    keep = marginal_mask(
        [c.tokens_per_s_per_user for c in front],
        [c.tokens_per_s_per_gpu for c in front],
        PRUNE_USER_GAIN,
        PRUNE_GPU_COST,
    )
    return [c for c, k in zip(front, keep, strict=True) if k], int((~keep).sum())


def _frontier(cands: list[Candidate]) -> list[Candidate]:
    if not cands:
        return []
    idx = pareto_indices(
        [c.tokens_per_s_per_user for c in cands], [c.tokens_per_s_per_gpu for c in cands]
    )
    return [cands[int(i)] for i in idx]


def run_search(q: PlanQuery, cal: Calibration | None = None) -> SearchResult:
    """Enumerate, predict and rank; raises PlanError when nothing can run."""
    q.check()
    if cal is None:
        from tokenfab.factory.params import bundled_calibration

        cal = bundled_calibration(q.backend)
    t0 = time.perf_counter()
    layouts = enumerate_layouts(q.model, q.system, q.gpus, q.precision)
    fits = _fits(q, layouts, q.isl + q.osl)
    if not fits:
        raise PlanError(
            f"{q.model.name} ({q.model.params_total / 1e9:.0f}B params at {q.precision}) does not "
            f"fit on {q.gpus} x {q.system.name} ({q.system.hbm_gb:.0f} GB each) with a "
            f"{q.isl + q.osl}-token sequence"
        )
    cands: list[Candidate] = []
    evaluated = screened = 0
    notes: list[str] = []
    if "agg" in q.modes:
        c, n = _search_agg(q, fits, cal)
        cands += c
        evaluated += n
    if "disagg" in q.modes:
        if q.gpus < 2:
            notes.append("disaggregated serving needs at least 2 GPUs")
        else:
            fits_prefill = _fits(q, layouts, q.isl)
            c, n, s = _search_disagg(q, fits, fits_prefill, cal)
            cands += c
            evaluated += n
            screened += s
            if not c:
                notes.append(f"no disaggregated split fits in {q.gpus} GPUs")
    if not cands:
        raise PlanError(f"no deployment of {q.model.name} fits on {q.gpus} x {q.system.name}")
    if q.ttft_ms is not None or q.tpot_ms is not None:
        c, n = _polish(q, cands, cal)
        cands += c
        evaluated += n
    ok = [c for c in cands if c.meets(q.ttft_ms, q.tpot_ms)]
    best = max(ok, key=lambda c: (c.tokens_per_s_per_gpu, c.tokens_per_s_per_user), default=None)
    if best is None:
        notes.append("no deployment meets the TTFT/TPOT limits")
    elif q.ttft_ms is None and q.tpot_ms is None:
        notes.append(
            "no TTFT/TPOT limits (--ttft 0 --tpot 0): 'best' is the highest-throughput point"
        )
    by_mode = {m: _prune(_frontier([c for c in cands if c.mode == m]))[0] for m in q.modes}
    frontier, pruned = _prune(_frontier(cands))
    if best is not None and best not in frontier:  # the answer is always on what is shown
        frontier = sorted([*frontier, best], key=lambda c: c.tokens_per_s_per_user)
    if pruned:
        notes.append(
            f"{pruned} frontier point(s) not shown: each is at most "
            f"{PRUNE_USER_GAIN - 1:.0%} more interactive than a point serving "
            f"{PRUNE_GPU_COST:g}x its tokens/s per GPU or more"
        )
    return SearchResult(
        query=q,
        candidates=cands,
        frontier=frontier,
        frontier_by_mode=by_mode,
        best=best,
        evaluated=evaluated,
        screened=screened,
        seconds=time.perf_counter() - t0,
        layouts=len(fits),
        notes=notes,
    )


# ---- model precision ----------------------------------------------------------------------


def _raw_config(name_or_path: str) -> dict | None:
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if p.suffix == ".json" and p.exists():
        return json.loads(p.read_text())
    folder = resources.files("tokenfab.factory").joinpath("data/model_configs")
    want = name_or_path.strip().lower()
    for f in folder.iterdir():
        hf = f.name.removesuffix("_config.json").replace("--", "/").lower()
        if f.name.endswith("_config.json") and want in (hf, hf.split("/")[-1]):
            return json.loads(f.read_text())
    return None


def checkpoint_precision(name_or_path: str) -> str:
    """The precision a model's checkpoint ships in: fp8/fp4 from its quantization config or
    name, else bf16 (what `--precision auto` means)."""
    cfg = _raw_config(name_or_path) or {}
    qc = cfg.get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower() + str(qc.get("quant_algo", "")).lower()
    name = name_or_path.lower()
    if "fp4" in method or "fp4" in name:
        return "fp4"
    if "fp8" in method or "fp8" in name:
        return "fp8"
    return "bf16"


def user_rate_grid(lo: float, hi: float, n: int = 64) -> np.ndarray:
    """Log-spaced interactivity levels (tokens/s/user) for comparing frontiers."""
    return np.geomspace(max(lo, 1e-3), max(hi, lo * 1.01), n)
