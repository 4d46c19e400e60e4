"""Serving model: TTFT, TPOT and throughput of a deployment under a closed-loop load.

Load model (what serving benchmarks run): `concurrency` users, each sending its next request
as soon as the previous one finishes, every request `isl` prompt tokens and `osl` output
tokens. With request rate X, Little's law gives X = C / (TTFT + (osl - 1) * TPOT).

- Aggregated: one worker runs mixed steps. The running decode batch absorbs the prefill work of
  arriving requests in chunks (chunked prefill): a fraction of the steps carries a prefill
  chunk, so TPOT = decode step + that fraction x the chunk's extra time; TTFT = own prefill
  chunks + part of the prefill queue of the users arriving with it.
- Disaggregated: a prefill pool and a decode pool. TPOT is a pure decode step at the decode
  batch; TTFT is prefill + KV transfer + the wait for a prefill worker, set by how close the
  offered rate comes to the prefill pool's capacity (rate matching). Pools left at 0 workers
  are sized as a deployer would: enough decode workers to hold the users (KV capacity and a
  maximum batch) and prefill workers for a target utilization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

from tokenfab.factory.catalog import System
from tokenfab.factory.modelspec import ModelSpec
from tokenfab.factory.perf import (
    DEFAULT_CAL,
    Calibration,
    Layout,
    combine,
    decode_work,
    kv_capacity_tokens,
    prefill_time,
    prefill_work,
    step_time,
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
    prefill_workers: int  # 0 = size by rate matching
    prefill_batch: int  # prompts per prefill forward pass per worker
    decode_layout: Layout
    decode_workers: int  # 0 = as many as the users need
    decode_batch: int  # running sequences per decode worker (whole worker)
    isl: int
    osl: int
    concurrency: int | None = None  # total users; None = decode_workers * decode_batch

    @property
    def users(self) -> int:
        """Total users: `concurrency`, or what the decode pool holds when it is not given."""
        return self.concurrency or max(self.decode_batch, 1) * self.decode_workers


@dataclass(frozen=True)
class Prediction:
    ttft_ms: float
    tpot_ms: float
    tokens_per_s_per_user: float
    tokens_per_s_per_gpu: float  # output tokens per second per GPU
    num_gpus: int
    fits: bool
    reason: str | None = None
    requests_per_s: float = 0.0


def _fit_reason(m: ModelSpec, system: System, lay: Layout, seqs: int, seq_len: int) -> str | None:
    return _fit_reason_cached(m, system.key, system, lay, seqs, seq_len)


@lru_cache(maxsize=65536)
def _fit_reason_cached(
    m: ModelSpec, _key: str, system: System, lay: Layout, seqs: int, seq_len: int
) -> str | None:
    bad = lay.check()
    if bad:
        return bad
    cap = kv_capacity_tokens(m, system, lay, ctx=seq_len)
    if cap <= 0:
        return f"weights do not fit in {system.hbm_gb:.0f} GB per GPU with {lay.num_gpus} GPUs"
    need = seqs * seq_len
    if need > cap:
        return f"KV cache holds {cap} tokens; {seqs} x {seq_len} = {need} needed"
    return None


def running_batch(users: int, lay: Layout, cal: Calibration) -> float:
    """Sequences an aggregated worker runs at once for `users` closed-loop users: the
    engine's batch limit. (Admission by KV capacity was tried too; with the coarse per-GPU
    memory estimate it queued users in runs that measured no queueing, so KV only decides
    whether a deployment fits.)"""
    return float(min(users, max(1.0, cal.max_decode_batch * lay.attn_dp)))


def predict_agg(
    model: ModelSpec, system: System, dep: AggDeployment, cal: Calibration = DEFAULT_CAL
) -> Prediction:
    lay, users = dep.layout, max(dep.concurrency, 1)
    isl, osl = max(dep.isl, 1), max(dep.osl, 1)
    reason = _fit_reason(model, system, lay, users, isl + osl)
    ctx = isl + osl / 2.0
    # the running batch: the engine's batch limit; further users wait in the queue
    c = running_batch(users, lay, cal)
    dec = decode_work(model, c, ctx, lay)
    t_dec = step_time(model, system, lay, dec, cal)
    # a prefill chunk: up to prefill_chunk tokens of whole prompts (at least one prompt part)
    # per attention-DP rank: each rank schedules its own requests, so a worker's mixed step
    # carries up to attn_dp chunks
    chunk = min(float(isl), cal.prefill_chunk)
    n_chunk = max(1.0, cal.prefill_chunk // isl) if isl <= cal.prefill_chunk else 1.0
    n_chunk = min(n_chunk * lay.attn_dp, c)
    pf = prefill_work(model, n_chunk, chunk, lay)
    t_mix = step_time(model, system, lay, combine(dec, pf), cal)
    steps_per_prompt = isl / chunk / n_chunk  # chunk-steps one prompt needs
    # each output token of each user brings isl/osl prompt tokens of prefill work
    frac = c / osl * steps_per_prompt
    # the prompts of the synchronized first wave (a share: one request of each user, of the
    # benchmark's requests per user) are prefilled while their users wait for the first token
    # (TTFT below), not between their decode steps
    qw = min(cal.queue_weight, users / cal.bench_requests, 1.0)
    tpot = t_dec + (1.0 - qw) * frac * (t_mix - t_dec)
    own = math.ceil(isl / chunk) * t_mix
    queue = qw * (c - 1) / 2.0 * steps_per_prompt * t_mix
    ttft = own + queue + cal.first_steps * t_dec + cal.ttft_ms * 1e-3
    x = c / (ttft + (osl - 1) * tpot)
    # users beyond the running batch wait for a slot: closed loop, slots free at rate x
    ttft += (users - c) / x
    gpus = lay.num_gpus * dep.workers
    return Prediction(
        ttft_ms=ttft * 1e3,
        tpot_ms=tpot * 1e3,
        tokens_per_s_per_user=1.0 / tpot,
        tokens_per_s_per_gpu=x * osl * dep.workers / gpus,
        num_gpus=gpus,
        fits=reason is None,
        reason=reason,
        requests_per_s=x * dep.workers,
    )


def kv_transfer_time(
    model: ModelSpec, system: System, pl: Layout, dl: Layout, isl: int, unit_gpus: int
) -> float:
    """Moving one prompt's KV from a prefill to a decode worker. A prompt lives on one
    attention rank (tp x pp GPUs) on each side, so that rank's links carry it, not the
    whole worker's: GQA KV is split over up to the KV-head count of TP ranks and over the
    pipeline stages, MLA latents are whole on every TP rank. The link is NVLink when the
    prefill + decode unit sits inside one scale-up domain (NIXL/UCX move it GPU to GPU
    there, e.g. GB200 NVL72), the scale-out NIC otherwise."""
    kvb = 1.0 if pl.kv_dtype == "fp8" else 2.0
    nbytes = model.kv_bytes_per_token(kvb, isl) * isl
    split = 1 if model.attention == "mla" else min(pl.tp, dl.tp, model.num_kv_heads)
    lanes = split * min(pl.pp, dl.pp)
    inside = unit_gpus <= system.scaleup_size
    gbps = system.scaleup_gbps if inside else system.scaleout_gbps
    return nbytes / (gbps * 1e9 * lanes)


def max_decode_batch(
    model: ModelSpec, system: System, lay: Layout, isl: int, osl: int, cal: Calibration
) -> int:
    """Most sequences a decode worker runs: KV capacity and the engine's batch limit."""
    cap = kv_capacity_tokens(model, system, lay, ctx=isl + osl) // max(isl + osl, 1)
    return max(1, min(int(cal.max_decode_batch * lay.attn_dp), cap))


def size_disagg_pools(
    model: ModelSpec,
    system: System,
    prefill_layout: Layout,
    decode_layout: Layout,
    concurrency: int,
    isl: int,
    osl: int,
    cal: Calibration = DEFAULT_CAL,
    prefill_batch: int = 1,
) -> DisaggDeployment:
    """A disaggregated deployment for `concurrency` users with pools sized as deployers do:
    a decode pool of about `cal.decode_pool_gpus` GPUs (more when the users' KV or the
    engine's batch limit need it), and prefill workers for the request rate at
    `cal.prefill_util` utilization (rate matching)."""
    c = max(concurrency, 1)
    dmax = max_decode_batch(model, system, decode_layout, isl, osl, cal)
    # a decode pool of about `decode_pool_gpus` GPUs, more if the users need it, never more
    # workers than users
    prior = max(1, round(cal.decode_pool_gpus / decode_layout.num_gpus))
    dw = max(math.ceil(c / dmax), min(prior, c), 1)
    bd = math.ceil(c / dw)
    tpot = step_time(
        model, system, decode_layout, decode_work(model, bd, isl + osl / 2, decode_layout), cal
    )
    t_p = prefill_time(model, system, prefill_layout, prefill_batch, isl, cal)
    rate = c / (t_p + max(osl - 1, 0) * tpot)
    pw = max(1, math.ceil(rate * t_p / prefill_batch / cal.prefill_util - 1e-9))
    return DisaggDeployment(
        prefill_layout, pw, prefill_batch, decode_layout, dw, bd, isl, osl, concurrency=c
    )


def _closed_loop_ttft(c: float, osl: int, tpot: float, t_first: float, capacity: float) -> float:
    """TTFT of a closed loop of `c` users whose first token needs `t_first` alone, served by
    a prefill pool completing at most `capacity` prompts per second."""
    gen = max(osl - 1, 0) * tpot
    x = min(c / (t_first + gen), capacity)
    rho = min(x / capacity, 0.95)
    # waiting time of a nearly deterministic server (M/D/1)
    wait = t_first * rho / (2.0 * (1.0 - rho)) if c > 1 else 0.0
    return max(t_first + wait, c / x - gen)


def predict_disagg(
    model: ModelSpec, system: System, dep: DisaggDeployment, cal: Calibration = DEFAULT_CAL
) -> Prediction:
    if dep.prefill_workers <= 0 or dep.decode_workers <= 0:
        c0 = dep.concurrency or max(dep.decode_batch, 1)
        sized = size_disagg_pools(
            model,
            system,
            dep.prefill_layout,
            dep.decode_layout,
            c0,
            dep.isl,
            dep.osl,
            cal,
            max(dep.prefill_batch, 1),
        )
        dep = replace(
            dep,
            prefill_workers=dep.prefill_workers or sized.prefill_workers,
            decode_workers=dep.decode_workers or sized.decode_workers,
            decode_batch=sized.decode_batch if dep.decode_workers <= 0 else dep.decode_batch,
        )
    pl, dl = dep.prefill_layout, dep.decode_layout
    isl, osl = max(dep.isl, 1), max(dep.osl, 1)
    c = dep.users
    b_run = max(1, math.ceil(c / dep.decode_workers))
    reason = _fit_reason(model, system, dl, b_run, isl + osl) or _fit_reason(
        model, system, pl, dep.prefill_batch, isl
    )
    tpot = step_time(model, system, dl, decode_work(model, b_run, isl + osl / 2.0, dl), cal)
    pb = max(dep.prefill_batch, 1)
    t_p = prefill_time(model, system, pl, pb, isl, cal)
    t_one = prefill_time(model, system, pl, 1, isl, cal) if pb > 1 else t_p
    capacity = dep.prefill_workers * pb / t_p
    gpus = pl.num_gpus * dep.prefill_workers + dl.num_gpus * dep.decode_workers
    t_kv = kv_transfer_time(model, system, pl, dl, isl, gpus)
    t_first = t_one + t_kv + cal.first_steps * tpot
    t_first += (cal.ttft_ms + cal.disagg_ms) * 1e-3
    # requests of a closed-loop benchmark arrive in waves (all users start together and
    # finish together): a request waits for part of its wave's prompts, as in aggregated mode
    dqw = min(cal.disagg_queue_weight, c / cal.bench_requests, 1.0)
    wave = dqw * (c - 1) / 2.0 / capacity
    ttft = max(_closed_loop_ttft(c, osl, tpot, t_first, capacity), t_first + wave)
    x = c / (ttft + (osl - 1) * tpot)
    return Prediction(
        ttft_ms=ttft * 1e3,
        tpot_ms=tpot * 1e3,
        tokens_per_s_per_user=1.0 / tpot,
        tokens_per_s_per_gpu=x * osl / gpus,
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
    backend: str | None = None,
) -> Prediction:
    """TTFT/TPOT/throughput of a deployment. `cal` defaults to the bundled calibration
    (for `backend` — trtllm, sglang, vllm — when given)."""
    if cal is None:
        from tokenfab.factory.params import bundled_calibration

        cal = bundled_calibration(backend)
    if isinstance(dep, AggDeployment):
        return predict_agg(model, system, dep, cal)
    return predict_disagg(model, system, dep, cal)
