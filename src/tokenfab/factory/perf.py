"""Per-step time of one worker: roofline physics with a few calibrated efficiencies.

A worker is `tp * pp * attn_dp` GPUs. Attention runs tensor-parallel over `tp` GPUs inside each
of `attn_dp` data-parallel groups (each group holds its own sequences); the MoE layers spread
over all `tp * attn_dp` GPUs of a pipeline stage as `moe_tp` (slices of every expert) x `ep`
(whole experts). `batch` always means the sequences of the whole worker (all attention-DP
groups together), so a worker's concurrency is `batch`.

Each part of a layer costs max(FLOPs / achieved FLOP rate, bytes / achieved bandwidth) on the
busiest GPU; collectives cost bytes over the scale-up (or, past the domain, scale-out) link plus
a latency; every kernel and every step pays a fixed overhead. The achieved fractions come from
`Calibration`, fitted on measured serving data (calibrate.py); defaults are physics guesses.
Everything here is plain float arithmetic: one call costs microseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from tokenfab.factory.catalog import System
from tokenfab.factory.modelspec import ModelSpec

# bytes per stored element; 4-bit formats carry one 8-bit scale per 16 (nvfp4) / 32 (mxfp4,
# int4 groups) values, rounded to the nvfp4 figure
BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int4": 0.5625, "fp4": 0.5625}
ACT_BYTES = 2.0  # activations on the wire (bf16)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    attn_dp: int = 1
    moe_tp: int | None = None  # None: the rest of tp*attn_dp after ep (G // ep)
    precision: str = "fp8"  # weights/GEMMs: bf16 | fp8 | fp4 | int4 (weight-only, bf16 math)
    moe_precision: str | None = None  # experts when different (e.g. int4 experts, bf16 attn)
    kv_precision: str | None = None  # None: fp8 for fp8/fp4 models, else bf16

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.attn_dp

    @property
    def moe_group(self) -> int:
        """GPUs sharing one MoE layer (one pipeline stage)."""
        return self.tp * self.attn_dp

    @property
    def moe_tp_size(self) -> int:
        return self.moe_tp if self.moe_tp else max(1, self.moe_group // max(self.ep, 1))

    @property
    def expert_precision(self) -> str:
        return self.moe_precision or self.precision

    @property
    def kv_dtype(self) -> str:
        if self.kv_precision:
            return self.kv_precision
        return "fp8" if self.precision in ("fp8", "fp4") else "bf16"

    def check(self) -> str | None:
        """Why this layout is invalid, or None."""
        for n in ("tp", "pp", "ep", "attn_dp"):
            if getattr(self, n) < 1:
                return f"{n} must be >= 1"
        for p in (self.precision, self.expert_precision, self.kv_dtype):
            if p not in BYTES:
                return f"unknown precision {p}"
        if self.moe_tp_size * self.ep > self.moe_group:
            return f"moe_tp*ep = {self.moe_tp_size * self.ep} > tp*attn_dp = {self.moe_group}"
        return None


@dataclass(frozen=True)
class Calibration:
    """Achieved fractions of peak and fixed costs: few, physically meaningful parameters.

    The defaults are round-number engineering guesses (kernel launch ~3 us x ~10 kernels per
    layer, 70-75% of peak on big GEMMs and HBM, ...); fitted values ship in
    data/calibration.json and cross-validation refits from these defaults."""

    flops_eff: float = 0.7  # large-GEMM fraction of dense peak
    flops_half_m: float = 64.0  # GEMM rows (tokens) at which half of flops_eff is reached
    flops_half_elems: float = 1e6  # weight-matrix elements per GPU at which half is reached
    bw_eff: float = 0.75  # fraction of HBM bandwidth streaming weights / KV
    attn_eff: float = 0.3  # fraction of bf16 peak in prefill attention kernels
    decode_attn_eff: float = 0.3  # fraction of bf16 peak in decode attention kernels
    link_eff: float = 0.7  # fraction of link bandwidth reached by collectives
    coll_lat_us: float = 10.0  # latency of one collective inside the scale-up domain
    scaleout_lat_us: float = 30.0  # latency of one collective crossing the scale-out network
    a2a_lat_us: float = 10.0  # fixed cost of one expert dispatch or combine all-to-all
    layer_us: float = 30.0  # fixed kernel overheads per layer of a decode step (CUDA graphs)
    # the extra kernels of a MoE layer (router, top-k, permutes, grouped GEMMs) and of an MLA
    # layer (latent projections, rope, absorbed attention): each takes a few microseconds
    # however small the batch
    moe_layer_us: float = 10.0  # extra per MoE layer of a decode step
    mla_layer_us: float = 10.0  # extra per MLA layer of a decode step
    prefill_layer_us: float = 200.0  # per layer of a step carrying prefill (eager launches)
    moe_prefill_us: float = 200.0  # extra per MoE layer in such a step (routing syncs, permutes)
    mla_prefill_us: float = 200.0  # extra per MLA layer in such a step (latent up-projection)
    linear_prefill_us: float = 200.0  # extra per linear-attention layer (chunked scan)
    step_ms: float = 0.5  # fixed per-step overhead (scheduler, sampling, launch)
    # host work per running sequence per step on its rank (input preparation, sampling,
    # detokenizing and streaming the token): grows with the batch but not with TP
    seq_us: float = 20.0
    fp4_flops_scale: float = 0.6  # achieved fp4 rate relative to the fp8 kernels' fraction
    expert_us: float = 0.5  # fixed cost per touched expert per MoE layer on a GPU
    moe_imbalance: float = 1.0  # busiest GPU's expert load over the mean at large batch
    # serving-level
    ttft_ms: float = 50.0  # fixed request overhead before the first token (HTTP, tokenize)
    # steps a new request waits besides its own prefill: the running step ends, the request is
    # scheduled, and its token is sampled and streamed a step later (overlapped scheduling)
    first_steps: float = 0.5
    disagg_ms: float = 100.0  # prefill -> decode handoff (KV transfer setup, scheduling)
    prefill_chunk: float = 4096.0  # prefill tokens per step in aggregated serving
    queue_weight: float = 0.25  # share of a closed-loop wave's prefill queue seen in TTFT
    # the same in a disaggregated prefill pool: no decode steps interleave to spread the wave
    disagg_queue_weight: float = 0.5
    # a benchmark sends about this many requests in all (and at least 1/queue_weight per
    # user): with few users each sends many, so the synchronized first wave is a smaller share
    bench_requests: float = 50.0
    prefill_util: float = 0.9  # utilization a deployer sizes the prefill pool for
    max_decode_batch: float = 512.0  # largest decode batch per attention-DP rank
    decode_pool_gpus: float = 32.0  # typical decode pool when a file gives no pool sizes


DEFAULT_CAL = Calibration()


def _mm_precision(system: System, prec: str) -> tuple[float, float]:
    """(peak FLOP/s, bytes per weight) of GEMMs with weights in `prec`."""
    if prec == "int4" or (prec == "fp4" and not system.native("fp4")):
        # weight-only 4-bit (int4, or fp4 on GPUs without fp4 tensor cores): dequantized
        # into bf16 math, 4-bit weight traffic
        return system.peak_tflops("bf16") * 1e12, BYTES[prec]
    return system.peak_tflops(prec) * 1e12, BYTES[prec]


@dataclass(frozen=True)
class _HW:
    flops: float  # dense-GEMM FLOP/s per GPU
    moe_flops: float
    attn_flops: float  # attention math runs in bf16
    bw: float  # HBM bytes/s per GPU
    link_tp: float
    link_moe: float
    lat_tp: float
    lat_moe: float
    wbytes: float
    moe_wbytes: float
    kvbytes: float
    fp4_scale: float
    moe_fp4_scale: float


def _hw(system: System, lay: Layout, cal: Calibration) -> _HW:
    return _hw_cached(system.key, system, lay, cal)


@lru_cache(maxsize=4096)
def _hw_cached(_key: str, system: System, lay: Layout, cal: Calibration) -> _HW:
    flops, wb = _mm_precision(system, lay.precision)
    mflops, mwb = _mm_precision(system, lay.expert_precision)
    up, out = system.scaleup_gbps * 1e9, system.scaleout_gbps * 1e9
    in_tp = lay.tp <= system.scaleup_size
    in_moe = lay.moe_group <= system.scaleup_size
    lat_up, lat_out = cal.coll_lat_us * 1e-6, cal.scaleout_lat_us * 1e-6
    fp4 = cal.fp4_flops_scale if lay.precision == "fp4" and system.native("fp4") else 1.0
    mfp4 = cal.fp4_flops_scale if lay.expert_precision == "fp4" and system.native("fp4") else 1.0
    return _HW(
        flops=flops * fp4,
        moe_flops=mflops * mfp4,
        attn_flops=system.peak_tflops("bf16") * 1e12,
        bw=system.hbm_tbps * 1e12,
        link_tp=(up if in_tp else out) * cal.link_eff,
        link_moe=(up if in_moe else out) * cal.link_eff,
        lat_tp=lat_up if in_tp else lat_out,
        lat_moe=lat_up if in_moe else lat_out,
        wbytes=wb,
        moe_wbytes=mwb,
        kvbytes=BYTES[lay.kv_dtype],
        fp4_scale=fp4,
        moe_fp4_scale=mfp4,
    )


def _gemm(
    flops: float, nbytes: float, rows: float, elems: float, peak: float, bw: float, cal: Calibration
) -> float:
    """A GEMM of `rows` token rows against `elems`-element weight matrices (per GPU): roofline
    whose achieved FLOP rate falls for thin (few rows) and for small (few weights) GEMMs, where
    tiles and SMs go unfilled."""
    eff = cal.flops_eff * rows / (rows + cal.flops_half_m) * elems / (elems + cal.flops_half_elems)
    return max(flops / (peak * eff), nbytes / (bw * cal.bw_eff))


def expected_unique(n_experts: int, k: int, tokens: float) -> float:
    """Expected distinct experts hit when `tokens` tokens each pick `k` of `n_experts`
    uniformly: the experts whose weights a MoE layer must stream at that batch."""
    if tokens <= 0 or n_experts <= 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - k / n_experts) ** tokens)


@dataclass(frozen=True)
class StepWork:
    """What one step processes on a worker (all attention-DP groups together)."""

    tokens: float  # token rows through the GEMMs (prefill tokens + decode sequences)
    seqs: float  # sequences producing logits (LM head rows)
    attn_flops: float  # softmax-attention core FLOPs per layer (QK^T + PV), whole worker
    kv_bytes: float  # KV bytes read per softmax-attention layer, whole worker
    lin_state_bytes: float = 0.0  # linear-attention state traffic per linear layer
    prefill: bool = False  # carries prompt tokens (runs eagerly, not as a captured graph)


def step_time(
    m: ModelSpec, system: System, lay: Layout, w: StepWork, cal: Calibration = DEFAULT_CAL
) -> float:
    """Seconds for one forward step of the worker doing `w` (layers run stage after stage:
    with pipeline parallelism a token still crosses every layer, each stage holding 1/pp of
    them, so the latency of a step is that of all layers at the microbatch size)."""
    hw = _hw(system, lay, cal)
    tp, dp, pp = lay.tp, lay.attn_dp, lay.pp
    tokens = w.tokens / pp  # microbatch per stage
    # rows of the busiest attention-DP group: sequences are not split across groups
    seqs = max(w.seqs / pp, 1.0)
    busiest = math.ceil(seqs / dp - 1e-9) / seqs if dp > 1 else 1.0
    t_dp = tokens * busiest
    h = m.hidden
    bw = hw.bw

    # attention projections: TP-sharded, replicated per DP group
    ap = m.attn_params() / tp
    t_proj = _gemm(2 * t_dp * ap, ap * hw.wbytes, t_dp, ap / 4, hw.flops, bw, cal)
    # attention core: heads split over TP; KV split over TP only for GQA with enough KV heads
    core = w.attn_flops / pp * busiest / tp
    kv_split = min(tp, m.num_kv_heads) if m.attention != "mla" else 1
    kv = w.kv_bytes / pp * busiest / kv_split
    a_eff = cal.attn_eff if w.prefill else cal.decode_attn_eff
    t_core = max(core / (hw.attn_flops * a_eff), kv / (bw * cal.bw_eff))
    # TP allreduce after attention and after the FFN/MoE (ring: 2(n-1)/n of the message)
    ar = 0.0
    if tp > 1:
        ar = 2.0 * (tp - 1) / tp * t_dp * h * ACT_BYTES / hw.link_tp + hw.lat_tp

    total = m.n_softmax_attn * (t_proj + t_core) + m.num_layers * 2 * ar
    if m.n_linear_attn:
        lp = m.linear_attn_params() / tp
        state = w.lin_state_bytes / pp * busiest / tp
        fl = 2 * t_dp * lp + 6 * t_dp * m.lin_v_heads * m.lin_k_dim * m.lin_v_dim / tp
        t_lin = _gemm(fl, lp * hw.wbytes + state, t_dp, lp / 4, hw.flops, bw, cal)
        total += m.n_linear_attn * t_lin

    if m.n_dense_layers:
        fp = m.dense_ffn_params() / tp
        t_ffn = _gemm(2 * t_dp * fp, fp * hw.wbytes, t_dp, fp / 3, hw.flops, bw, cal)
        total += m.n_dense_layers * t_ffn

    if m.n_moe_layers:
        total += m.n_moe_layers * _moe_layer(m, lay, hw, tokens, t_dp, cal)

    # LM head (vocab split over TP), only for sequences that sample
    rows = seqs * busiest
    vp = m.vocab * h / tp
    total += _gemm(2 * rows * vp, vp * hw.wbytes, rows, vp, hw.flops, bw, cal)
    if w.prefill:
        # eager launches per layer; MoE routing syncs/permutes; MLA prefill decompresses the
        # latent KV and splits/ropes/requantizes it in extra kernels; linear attention runs
        # chunked-scan kernels
        mla = m.n_softmax_attn if m.attention == "mla" else 0
        total += (
            m.num_layers * cal.prefill_layer_us
            + m.n_moe_layers * cal.moe_prefill_us
            + mla * cal.mla_prefill_us
            + m.n_linear_attn * cal.linear_prefill_us
        ) * 1e-6
    else:
        mla = m.n_softmax_attn if m.attention == "mla" else 0
        total += (
            m.num_layers * cal.layer_us + m.n_moe_layers * cal.moe_layer_us + mla * cal.mla_layer_us
        ) * 1e-6
    # host work of the busiest rank's sequences
    return total + cal.step_ms * 1e-3 + rows * cal.seq_us * 1e-6


def _moe_layer(m: ModelSpec, lay: Layout, hw: _HW, tokens: float, t_dp: float, cal) -> float:
    g = lay.moe_group
    ep, mtp = max(lay.ep, 1), lay.moe_tp_size
    pe = m.expert_params()
    local = m.num_experts / ep
    touched = min(max(expected_unique(m.num_experts, m.top_k, tokens) / ep, 1.0), local)
    # busiest GPU: routed work spread over g GPUs, with load imbalance between EP ranks that
    # fades as the batch grows (law of large numbers over the assignments per rank)
    # (expected max of ep multinomial loads ~ mean + sqrt(2 ln(ep) mean)); moe_imbalance
    # scales it for routing that is less uniform than random
    assign = tokens * m.top_k
    per_rank = max(assign / ep, 1.0)
    imb = 1.0 + cal.moe_imbalance * math.sqrt(2.0 * math.log(ep) / per_rank) if ep > 1 else 1.0
    flops = 2 * assign * pe / (ep * mtp) * imb
    rows = assign / max(touched * ep, 1.0)  # tokens per expert GEMM
    pe_gpu = pe / mtp
    t = _gemm(flops, touched * pe_gpu * hw.moe_wbytes, rows, pe_gpu / 3, hw.moe_flops, hw.bw, cal)
    # every expert a GPU runs is its own small GEMM problem (grouped-GEMM scheduling, tile
    # tails): a fixed cost per touched local expert, which is why EP beats TP at small batch
    t += touched * cal.expert_us * 1e-6
    sp = m.shared_params() / lay.tp
    if sp:
        t += _gemm(2 * t_dp * sp, sp * hw.wbytes, t_dp, sp / 3, hw.flops, hw.bw, cal)
    if lay.attn_dp > 1 or (ep > 1 and lay.tp < g):
        # tokens live on their DP group: dispatch (quantized) and combine (bf16) all-to-all
        tok_gpu = t_dp / lay.tp
        nbytes = tok_gpu * m.top_k * m.hidden * (min(hw.moe_wbytes, 1.0) + ACT_BYTES)
        t += (g - 1) / g * nbytes / hw.link_moe + 2 * (hw.lat_moe + cal.a2a_lat_us * 1e-6)
    return t


# ---- public per-phase API -----------------------------------------------------------------


def _keys_full(m: ModelSpec, ctx: float) -> float:
    """Keys a query attends at context `ctx`, averaged over softmax layers (sliding windows
    and DSA top-k sparse attention cap it)."""
    if m.sparse_topk:
        ctx = min(ctx, float(m.sparse_topk))
    n = max(m.n_softmax_attn, 1)
    if m.n_sliding_attn and m.sliding_window:
        return (m.n_full_attn * ctx + m.n_sliding_attn * min(ctx, m.sliding_window)) / n
    return ctx


def _core_flops_per_key(m: ModelSpec, decode: bool) -> float:
    """QK^T + PV FLOPs per (query token, key) summed over heads."""
    if m.attention == "mla" and decode:
        # absorbed MLA: scores and values on the shared latent (kv_lora + rope, kv_lora)
        return 2.0 * m.num_heads * (2 * m.kv_lora_rank + m.qk_rope_dim)
    return 2.0 * m.num_heads * (m.head_dim + m.v_head_dim)


def _indexer_flops_per_key(m: ModelSpec) -> float:
    return 2.0 * m.indexer_heads * m.indexer_dim if m.sparse_topk else 0.0


def prefill_work(m: ModelSpec, batch: float, isl: float, lay: Layout) -> StepWork:
    keys = _keys_full(m, isl / 2.0)  # causal: half the prompt on average
    per_tok = _core_flops_per_key(m, False) * keys
    per_tok += _indexer_flops_per_key(m) * isl / 2.0
    return StepWork(
        tokens=batch * isl,
        seqs=batch,
        attn_flops=batch * isl * per_tok,
        kv_bytes=0.0,
        lin_state_bytes=batch * m.linear_state_bytes() if m.n_linear_attn else 0.0,
        prefill=True,
    )


def decode_work(m: ModelSpec, batch: float, ctx: float, lay: Layout) -> StepWork:
    keys = _keys_full(m, ctx)
    kvb = BYTES[lay.kv_dtype]
    per_key_bytes = m.kv_elems_per_token_layer() * kvb
    idx_bytes = ctx * m.indexer_dim * 1.0 if m.sparse_topk else 0.0
    flops = batch * (_core_flops_per_key(m, True) * keys + _indexer_flops_per_key(m) * ctx)
    return StepWork(
        tokens=batch,
        seqs=batch,
        attn_flops=flops,
        kv_bytes=batch * (keys * per_key_bytes + idx_bytes),
        lin_state_bytes=2.0 * batch * m.linear_state_bytes() if m.n_linear_attn else 0.0,
    )


def combine(a: StepWork, b: StepWork) -> StepWork:
    """One mixed step doing both (chunked prefill riding on a decode step)."""
    return StepWork(
        a.tokens + b.tokens,
        a.seqs + b.seqs,
        a.attn_flops + b.attn_flops,
        a.kv_bytes + b.kv_bytes,
        a.lin_state_bytes + b.lin_state_bytes,
        a.prefill or b.prefill,
    )


def prefill_time(
    model: ModelSpec,
    system: System,
    layout: Layout,
    batch: int,
    isl: int,
    cal: Calibration = DEFAULT_CAL,
) -> float:
    """Seconds to prefill `batch` prompts of `isl` tokens on one worker in one pass."""
    return step_time(model, system, layout, prefill_work(model, batch, isl, layout), cal)


def decode_step_time(
    model: ModelSpec,
    system: System,
    layout: Layout,
    batch: int,
    ctx: int,
    cal: Calibration = DEFAULT_CAL,
) -> float:
    """Seconds for one decode step of `batch` sequences (whole worker) at context `ctx`."""
    return step_time(model, system, layout, decode_work(model, batch, ctx, layout), cal)


def weight_bytes_per_gpu(model: ModelSpec, layout: Layout) -> float:
    """Weight bytes resident on each GPU (experts spread over the MoE group)."""
    w, mw = BYTES[layout.precision], BYTES[layout.expert_precision]
    tp = layout.tp
    dense = (model.attn_total() + model.n_dense_layers * model.dense_ffn_params()) / tp
    moe = model.n_moe_layers * model.num_experts * model.expert_params() / layout.moe_group
    shared = model.n_moe_layers * model.shared_params() / tp
    embed = model.embed_params() / tp
    return ((dense + shared + embed) * w + moe * mw) / layout.pp


def kv_capacity_tokens(
    model: ModelSpec, system: System, layout: Layout, mem_fraction: float = 0.9, ctx: int = 0
) -> int:
    """KV tokens the worker can hold (summed over attention-DP groups); 0 if weights don't fit.

    MLA latents are replicated across TP ranks; GQA KV heads split over TP (replicated past
    the number of KV heads). `ctx` (typical sequence length) amortizes sliding windows and
    linear-attention states; 2 GB per GPU are kept for activations and the runtime.
    """
    free = system.hbm_gb * 1e9 * mem_fraction - weight_bytes_per_gpu(model, layout) - 2e9
    if free <= 0:
        return 0
    per_tok = model.kv_bytes_per_token(BYTES[layout.kv_dtype], ctx or None) / layout.pp
    split = 1 if model.attention == "mla" else min(layout.tp, model.num_kv_heads)
    per_tok_gpu = per_tok / split
    if per_tok_gpu <= 0:
        return 2**31
    return int(math.floor(free / per_tok_gpu)) * layout.attn_dp
