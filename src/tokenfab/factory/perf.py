"""Per-step time of one worker: roofline physics with a few calibrated efficiencies.

A worker is `tp * pp * attn_dp` GPUs. Attention runs tensor-parallel over `tp` GPUs inside each
of `attn_dp` data-parallel groups (each group holds its own sequences); the MoE layers spread
over all `tp * attn_dp` GPUs of a pipeline stage as `moe_tp` (slices of every expert) x `ep`
(whole experts). `batch` always means the sequences of the whole worker (all attention-DP
groups together), so a worker's concurrency is `batch`.

Each layer part costs max(FLOPs / achieved FLOPs, bytes / achieved bandwidth) on the busiest
GPU; collectives cost bytes over the scale-up (or scale-out) link plus a latency; a step pays a
fixed overhead. The achieved fractions come from `Calibration` (fitted on measured serving
data, see calibrate.py); defaults are plain physics guesses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokenfab.factory.catalog import System
from tokenfab.factory.modelspec import ModelSpec

BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int4": 0.5625, "fp4": 0.5625}  # incl. scales


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    attn_dp: int = 1
    moe_tp: int | None = None  # None: whatever of tp*attn_dp the experts don't use (G // ep)
    precision: str = "fp8"  # weights and GEMM math: bf16 | fp8 | fp4 | int4 (weight-only)
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
    def kv_dtype(self) -> str:
        if self.kv_precision:
            return self.kv_precision
        return "fp8" if self.precision in ("fp8", "fp4") else "bf16"

    def check(self) -> str | None:
        """Why this layout is invalid, or None."""
        for n in ("tp", "pp", "ep", "attn_dp"):
            if getattr(self, n) < 1:
                return f"{n} must be >= 1"
        if self.precision not in BYTES:
            return f"unknown precision {self.precision}"
        if self.moe_tp_size * self.ep > self.moe_group:
            return f"moe_tp*ep = {self.moe_tp_size * self.ep} > tp*attn_dp = {self.moe_group}"
        return None


@dataclass(frozen=True)
class Calibration:
    """Achieved fractions of peak and fixed costs; few, physically meaningful parameters."""

    flops_eff: float = 0.7  # large-GEMM fraction of dense peak
    flops_half_m: float = 64.0  # GEMM rows (tokens) at which half of flops_eff is reached
    bw_eff: float = 0.75  # fraction of HBM bandwidth streaming weights / KV
    attn_eff: float = 0.5  # fraction of peak in attention kernels (prefill FLOPs)
    link_eff: float = 0.7  # fraction of link bandwidth in collectives
    coll_lat_us: float = 8.0  # latency of one collective (allreduce / all-to-all)
    layer_us: float = 6.0  # fixed per-layer kernel overhead per step
    step_ms: float = 1.0  # fixed per-step overhead (scheduler, sampling, launch)
    fp4_flops_scale: float = 1.0  # fraction of the fp4 peak reached relative to fp8 kernels
    # serving-level
    prefill_chunk: int = 8192  # tokens per prefill step in aggregated serving
    queue_weight: float = 1.0  # share of a closed-loop wave's prefill queue seen in TTFT
    extras: dict[str, float] = field(default_factory=dict, hash=False, compare=False)


DEFAULT_CAL = Calibration()


@dataclass(frozen=True)
class _HW:
    """System figures in SI units, resolved once per (system, layout)."""

    flops: float  # FLOP/s per GPU at the layout precision
    bw: float  # HBM bytes/s per GPU
    link_tp: float  # bytes/s per GPU for the attention TP group
    link_moe: float  # bytes/s per GPU for the MoE group
    wbytes: float  # bytes per weight


def _hw(system: System, layout: Layout, cal: Calibration) -> _HW:
    prec = "fp4" if layout.precision == "int4" else layout.precision
    if layout.precision == "int4":
        prec = "bf16"  # weight-only int4 dequantizes into bf16 math
    flops = system.peak_tflops(prec) * 1e12
    if prec == "fp4" and system.native("fp4"):
        flops *= cal.fp4_flops_scale
    up = system.scaleup_gbps * 1e9
    out = system.scaleout_gbps * 1e9
    link_tp = up if layout.tp <= system.scaleup_size else out
    link_moe = up if layout.moe_group <= system.scaleup_size else out
    return _HW(flops, system.hbm_tbps * 1e12, link_tp, link_moe, BYTES[layout.precision])


def _gemm(flops: float, nbytes: float, m: float, hw: _HW, cal: Calibration) -> float:
    """Time of a GEMM of `m` token rows: roofline with a size-dependent achieved FLOP rate."""
    eff = cal.flops_eff * m / (m + cal.flops_half_m)
    return max(flops / (hw.flops * eff), nbytes / (hw.bw * cal.bw_eff))


def _allreduce(nbytes: float, n: int, link: float, cal: Calibration) -> float:
    if n <= 1:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / (link * cal.link_eff) + cal.coll_lat_us * 1e-6


def _alltoall(nbytes: float, n: int, link: float, cal: Calibration) -> float:
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / (link * cal.link_eff) + cal.coll_lat_us * 1e-6


def expected_unique(n_experts: int, k: int, tokens: float) -> float:
    """Expected distinct experts hit when `tokens` tokens each pick `k` of `n_experts`
    uniformly (the weights a MoE layer must stream at that batch)."""
    if tokens <= 0 or n_experts <= 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - k / n_experts) ** tokens)


def _layer_times(
    m: ModelSpec,
    system: System,
    lay: Layout,
    tokens: float,
    attn_flops_tok: float,
    kv_read_bytes: float,
    cal: Calibration,
) -> float:
    """Time of all layers of one pipeline stage chain for a step of `tokens` worker tokens.

    `attn_flops_tok`: softmax-attention core FLOPs per token per layer (summed over heads);
    `kv_read_bytes`: KV bytes read per attention layer per DP group (decode).
    """
    hw = _hw(system, lay, cal)
    tp, dp = lay.tp, lay.attn_dp
    t_dp = tokens / dp  # tokens per attention-DP group
    act = 2.0  # bf16 activations on the wire
    h = m.hidden

    # attention projections (TP-sharded, replicated per DP group)
    ap = m.attn_params() / tp
    t_attn_proj = _gemm(2 * t_dp * ap, ap * hw.wbytes, t_dp, hw, cal)
    # attention core: prefill FLOPs at attention efficiency, decode KV streaming
    core_flops = t_dp * attn_flops_tok / tp  # heads split over TP (MLA too)
    kv_split = tp if (m.attention != "mla" and m.num_kv_heads >= tp) else 1
    t_attn_core = max(
        core_flops / (hw.flops * cal.attn_eff), kv_read_bytes / kv_split / (hw.bw * cal.bw_eff)
    )
    t_lin = 0.0
    if m.n_linear_attn:
        lp = m.linear_attn_params() / tp
        state = m.linear_state_bytes() / tp
        t_lin = _gemm(2 * t_dp * lp, lp * hw.wbytes + state, t_dp, hw, cal)
    # TP allreduce after attention and after the FFN
    ar = _allreduce(t_dp * h * act, tp, hw.link_tp, cal)

    total = 0.0
    n_attn = m.n_softmax_attn
    total += n_attn * (t_attn_proj + t_attn_core) + m.n_linear_attn * t_lin
    total += m.num_layers * ar

    # dense FFN layers: TP inside each DP group
    if m.n_dense_layers:
        fp = m.dense_ffn_params() / tp
        total += m.n_dense_layers * (_gemm(2 * t_dp * fp, fp * hw.wbytes, t_dp, hw, cal) + ar)

    if m.n_moe_layers:
        g = lay.moe_group
        ep, mtp = max(lay.ep, 1), lay.moe_tp_size
        pe = m.expert_params() / mtp
        local = m.num_experts / ep
        touched = expected_unique(m.num_experts, m.top_k, tokens) / ep
        touched = min(max(touched, 1.0), local)
        flops = 2 * tokens * m.top_k * m.expert_params() / g
        m_rows = tokens * m.top_k / max(touched * ep, 1.0)  # tokens per expert GEMM
        t_exp = _gemm(flops, touched * pe * hw.wbytes, m_rows, hw, cal)
        sp = m.shared_params() / tp
        t_shared = _gemm(2 * t_dp * sp, sp * hw.wbytes, t_dp, hw, cal) if sp else 0.0
        # token dispatch + combine across the MoE group
        tok_gpu = tokens / g
        a2a = _alltoall(tok_gpu * m.top_k * h * (hw.wbytes + act), g, hw.link_moe, cal)
        total += m.n_moe_layers * (t_exp + t_shared + a2a)

    # LM head (TP-sharded vocab) once per step
    vp = m.vocab * h / tp
    total += _gemm(2 * t_dp * vp, vp * hw.wbytes, t_dp, hw, cal)
    total += m.num_layers * cal.layer_us * 1e-6
    return total


def _kv_bytes(lay: Layout) -> float:
    return BYTES[lay.kv_dtype] if lay.kv_dtype != "fp4" else 0.5625


def _attn_core_flops_per_token(m: ModelSpec, ctx_attended: float) -> float:
    """QK^T + PV FLOPs of one token attending `ctx_attended` keys, summed over heads."""
    if m.attention == "mla":
        # absorbed MLA on the latent (decode) is the larger of the two forms; use the
        # prefill form (per-head qk + v dims) which the kernels run for long prompts
        return 2.0 * ctx_attended * m.num_heads * (m.head_dim + m.v_head_dim)
    return 2.0 * ctx_attended * m.num_heads * (m.head_dim + m.v_head_dim)


def prefill_time(
    model: ModelSpec,
    system: System,
    layout: Layout,
    batch: int,
    isl: int,
    cal: Calibration = DEFAULT_CAL,
) -> float:
    """Seconds to prefill `batch` prompts of `isl` tokens on one worker (one forward pass)."""
    tokens = float(batch * isl)
    keys = isl / 2.0  # causal: on average half the prompt attended
    if model.sparse_topk:
        keys = min(keys, model.sparse_topk)
    if model.sliding_window and model.n_sliding_attn:
        pass  # sliding layers are a minority; treated as full (upper bound)
    t = _layer_times(
        model, system, layout, tokens, _attn_core_flops_per_token(model, keys), 0.0, cal
    )
    return t + cal.step_ms * 1e-3


def decode_step_time(
    model: ModelSpec,
    system: System,
    layout: Layout,
    batch: int,
    ctx: int,
    cal: Calibration = DEFAULT_CAL,
) -> float:
    """Seconds for one decode step of `batch` sequences (whole worker) at context `ctx`."""
    b = float(max(batch, 1))
    keys = float(ctx)
    if model.sparse_topk:
        keys = min(keys, float(model.sparse_topk))
    kvb = _kv_bytes(layout)
    per_tok_layer = model.kv_elems_per_token_layer() * kvb
    # KV read per attention layer per DP group (sliding layers read at most their window)
    full_share = model.n_full_attn / max(model.n_softmax_attn, 1)
    win = min(ctx, model.sliding_window) if model.sliding_window else ctx
    eff_ctx = full_share * keys + (1 - full_share) * win
    kv_read = (b / layout.attn_dp) * eff_ctx * per_tok_layer
    t = _layer_times(
        model, system, layout, b, _attn_core_flops_per_token(model, eff_ctx), kv_read, cal
    )
    return t + cal.step_ms * 1e-3


def weight_bytes_per_gpu(model: ModelSpec, layout: Layout) -> float:
    """Weight bytes resident on the busiest GPU."""
    w = BYTES[layout.precision]
    tp = layout.tp
    attn = model.attn_total() / tp
    dense = model.n_dense_layers * model.dense_ffn_params() / tp
    moe = model.n_moe_layers * (
        model.num_experts * model.expert_params() / (layout.moe_group) + model.shared_params() / tp
    )
    embed = model.embed_params() / tp
    return (attn + dense + moe + embed) * w / layout.pp


def kv_capacity_tokens(
    model: ModelSpec, system: System, layout: Layout, mem_fraction: float = 0.9, ctx: int = 0
) -> int:
    """KV tokens the worker can hold (summed over attention-DP groups); 0 if weights don't fit.

    MLA latents are replicated across TP ranks; GQA KV heads split over TP (replicated when
    tp > kv heads). `ctx` (typical sequence length) amortizes sliding windows / linear state.
    """
    free = system.hbm_gb * 1e9 * mem_fraction - weight_bytes_per_gpu(model, layout) - 2e9
    if free <= 0:
        return 0
    kvb = _kv_bytes(layout)
    per_tok = model.kv_bytes_per_token(kvb, ctx or None) / layout.pp
    split = 1 if model.attention == "mla" else min(layout.tp, model.num_kv_heads)
    per_tok_gpu = per_tok / split
    if per_tok_gpu <= 0:
        return 2**31
    return int(math.floor(free / per_tok_gpu)) * layout.attn_dp
