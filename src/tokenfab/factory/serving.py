"""Serving model: TTFT, TPOT and throughput of a deployment under a closed-loop load.

Load model (what serving benchmarks run): `concurrency` users, each sending its next request
as soon as the previous one finishes, every request `isl` prompt tokens and `osl` output
tokens. With request rate X, Little's law gives X = C / (TTFT + (osl - 1) * TPOT).

- Aggregated: one worker runs mixed steps. Decode steps of the running batch absorb the
  prefill work of arriving requests (chunked prefill), so TPOT = decode step + the prefill work
  per output token; TTFT = own prefill + the prefill queue of the other users in its wave.
- Disaggregated: a prefill pool and a decode pool. TPOT is a pure decode step at the decode
  batch; TTFT is prefill + KV transfer + waiting for a prefill worker, the queue set by how
  close the offered rate is to the prefill pool's capacity (rate matching).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenfab.factory.catalog import System
from tokenfab.factory.modelspec import ModelSpec
from tokenfab.factory.perf import (
    DEFAULT_CAL,
    Calibration,
    Layout,
    decode_step_time,
    kv_capacity_tokens,
    prefill_time,
)


@dataclass(frozen=True)
class AggDeployment:
    layout: Layout
    concurrency: int  # users per worker (= running decode batch of the worker)
    isl: int
    osl: int
    workers: int = 1  # identical replicas; totals scale, latencies don't


@dataclass(frozen=True)
class DisaggDeployment:
    prefill_layout: Layout
    prefill_workers: int
    prefill_batch: int  # prompts per prefill forward pass per worker
    decode_layout: Layout
    decode_workers: int
    decode_batch: int  # running sequences per decode worker (whole worker)
    isl: int
    osl: int
    concurrency: int | None = None  # total users; None = decode_workers * decode_batch


@dataclass(frozen=True)
class Prediction:
    ttft_ms: float
    tpot_ms: float
    tokens_per_s_per_user: float
    tokens_per_s_per_gpu: float  # output tokens
    num_gpus: int
    fits: bool
    reason: str | None = None
    requests_per_s: float = 0.0


def _fit_reason(
    model: ModelSpec, system: System, lay: Layout, seqs: int, seq_len: int
) -> str | None:
    bad = lay.check()
    if bad:
        return bad
    cap = kv_capacity_tokens(model, system, lay, ctx=seq_len)
    if cap <= 0:
        return f"weights do not fit in {system.hbm_gb:.0f} GB per GPU with {lay.num_gpus} GPUs"
    need = seqs * seq_len
    if need > cap:
        return f"KV cache holds {cap} tokens, {seqs} x {seq_len} = {need} needed"
    return None


def _closed_loop_ttft(c: float, osl: int, tpot: float, t_first: float, capacity: float) -> float:
    """TTFT of a closed loop of `c` users whose requests need `t_first` alone and a server
    that completes at most `capacity` first tokens per second."""
    cycle_free = t_first + max(osl - 1, 0) * tpot
    x = min(c / cycle_free, capacity)
    rho = min(x / capacity, 0.999)
    # queueing delay of a nearly deterministic server (M/D/1 waiting time, halved variance)
    wait = t_first * rho / (2.0 * (1.0 - rho)) if c > 1 else 0.0
    return max(t_first + wait, c / x - max(osl - 1, 0) * tpot)


def predict_agg(
    model: ModelSpec, system: System, dep: AggDeployment, cal: Calibration = DEFAULT_CAL
) -> Prediction:
    lay, c = dep.layout, max(dep.concurrency, 1)
    reason = _fit_reason(model, system, lay, c, dep.isl + dep.osl)
    ctx = dep.isl + dep.osl // 2
    t_dec = decode_step_time(model, system, lay, c, ctx, cal)
    # prefill batching: as many prompts as the chunk budget allows, at least one
    pb = max(1, min(c, cal.prefill_chunk // max(dep.isl, 1)))
    t_pb = prefill_time(model, system, lay, pb, dep.isl, cal)
    per_req = t_pb / pb
    t_one = prefill_time(model, system, lay, 1, dep.isl, cal)
    tpot = t_dec + per_req * c / max(dep.osl, 1)
    wave = cal.queue_weight * (c - 1) / 2.0 * per_req
    ttft = t_one + t_dec / 2.0 + wave
    cycle = ttft + max(dep.osl - 1, 0) * tpot
    x = c / cycle
    gpus = lay.num_gpus * dep.workers
    return Prediction(
        ttft_ms=ttft * 1e3,
        tpot_ms=tpot * 1e3,
        tokens_per_s_per_user=1.0 / tpot,
        tokens_per_s_per_gpu=x * dep.osl * dep.workers / gpus,
        num_gpus=gpus,
        fits=reason is None,
        reason=reason,
        requests_per_s=x * dep.workers,
    )


def kv_transfer_time(model: ModelSpec, system: System, lay: Layout, isl: int) -> float:
    """Moving one prompt's KV from a prefill to a decode worker over the scale-out network."""
    kvb = 1.0 if lay.kv_dtype == "fp8" else 2.0
    nbytes = model.kv_bytes_per_token(kvb, isl) * isl
    return nbytes / (system.scaleout_gbps * 1e9 * lay.num_gpus)


def predict_disagg(
    model: ModelSpec, system: System, dep: DisaggDeployment, cal: Calibration = DEFAULT_CAL
) -> Prediction:
    pl, dl = dep.prefill_layout, dep.decode_layout
    bd = max(dep.decode_batch, 1)
    c = dep.concurrency or bd * dep.decode_workers
    reason = _fit_reason(model, system, dl, bd, dep.isl + dep.osl) or _fit_reason(
        model, system, pl, dep.prefill_batch, dep.isl
    )
    ctx = dep.isl + dep.osl // 2
    # decode batch actually running: users spread over decode workers
    b_run = max(1, min(bd, math.ceil(c / dep.decode_workers)))
    tpot = decode_step_time(model, system, dl, b_run, ctx, cal)
    pb = max(dep.prefill_batch, 1)
    t_p = prefill_time(model, system, pl, pb, dep.isl, cal)
    t_one = prefill_time(model, system, pl, 1, dep.isl, cal)
    capacity = dep.prefill_workers * pb / t_p  # prompts per second
    t_first = t_one + kv_transfer_time(model, system, pl, dep.isl) + tpot
    ttft = _closed_loop_ttft(c, dep.osl, tpot, t_first, capacity)
    x = c / (ttft + max(dep.osl - 1, 0) * tpot)
    gpus = pl.num_gpus * dep.prefill_workers + dl.num_gpus * dep.decode_workers
    return Prediction(
        ttft_ms=ttft * 1e3,
        tpot_ms=tpot * 1e3,
        tokens_per_s_per_user=1.0 / tpot,
        tokens_per_s_per_gpu=x * dep.osl / gpus,
        num_gpus=gpus,
        fits=reason is None,
        reason=reason,
        requests_per_s=x,
    )


def predict(
    model: ModelSpec,
    system: System,
    dep: AggDeployment | DisaggDeployment,
    cal: Calibration | None = None,
) -> Prediction:
    """TTFT/TPOT/throughput of a deployment; `cal` defaults to the bundled calibration."""
    if cal is None:
        from tokenfab.factory.calibrate import bundled_calibration

        cal = bundled_calibration()
    if isinstance(dep, AggDeployment):
        return predict_agg(model, system, dep, cal)
    return predict_disagg(model, system, dep, cal)
