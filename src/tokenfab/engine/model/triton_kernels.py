"""Triton kernels for the engine on GPUs: paged decode attention that reads the block pool in
place (no gathered, padded copy of every sequence's keys and values).

The same kernel runs on CPU under `TRITON_INTERPRET=1`, which is how its correctness tests run
where there is no GPU. Importing this module never fails: without triton, `load` returns None
and the engine keeps its torch path.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # triton is optional: a CUDA build of torch ships it, a CPU build may not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None


def interpreting() -> bool:
    """Whether triton kernels run in its CPU interpreter (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(device: torch.device | str) -> bool:
    """Triton can run kernels on tensors of `device`: CUDA, or CPU under the interpreter."""
    if triton is None:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and interpreting())


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        q_ptr,  # [B, H, D]
        k_ptr,  # [num_blocks, block_size, KVH, D]
        v_ptr,
        table_ptr,  # [B, table_width] block ids
        pos_ptr,  # [B] position of each decode token; it attends to keys [lo, pos]
        out_ptr,  # [B, H, D]
        scale,
        window,  # sliding window (keys with pos - j < window), or 0 for none
        table_width,
        num_kv_heads: tl.constexpr,
        group: tl.constexpr,
        head_dim: tl.constexpr,
        block_size: tl.constexpr,
        GROUP_P2: tl.constexpr,
        DIM_P2: tl.constexpr,
        TILE: tl.constexpr,
        PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        # One program per (sequence, KV head): the query heads sharing that KV head read each
        # key and value once. Online softmax over tiles of TILE keys, in float32; the two
        # products are tensor-core dots (the group is padded to 16 rows, the dot's minimum).
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        g = tl.arange(0, GROUP_P2)
        d = tl.arange(0, DIM_P2)
        g_ok = g < group
        d_ok = d < head_dim
        heads = kvh * group + g
        q_off = (b * num_kv_heads * group + heads)[:, None] * head_dim + d[None, :]
        qmask = g_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        pos = tl.load(pos_ptr + b).to(tl.int32)
        lo = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
        m = tl.full([GROUP_P2], float("-inf"), tl.float32)
        s = tl.zeros([GROUP_P2], tl.float32)
        acc = tl.zeros([GROUP_P2, DIM_P2], tl.float32)
        start = (lo // TILE) * TILE
        for t0 in range(start, pos + 1, TILE):
            j = t0 + tl.arange(0, TILE)
            j_ok = (j <= pos) & (j >= lo)
            blk = tl.load(table_ptr + b * table_width + j // block_size, mask=j_ok, other=0)
            slot = blk.to(tl.int64) * block_size + (j % block_size)
            kv_off = (slot * num_kv_heads + kvh)[:, None] * head_dim + d[None, :]
            kvmask = j_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0)
            v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=tl.float32)
            scores = scores * scale  # [GROUP_P2, TILE]
            scores = tl.where(j_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=tl.float32)
            acc = acc * alpha[:, None] + pv
            m = m_new
        out = acc / s[:, None]
        tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=qmask)

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr,  # [T, N] residual stream, updated in place when HAS_DELTA
        delta_ptr,  # [T, N] (row stride delta_stride)
        w_ptr,  # [N]
        out_ptr,  # [T, N]
        n,
        delta_stride,
        eps,
        HAS_DELTA: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # transformers' order: x = x + delta in the model dtype; RMSNorm in float32;
        # weight * normed.to(dtype), rounded to the dtype again.
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        ok = c < n
        x = tl.load(x_ptr + row * n + c, mask=ok, other=0.0)
        if HAS_DELTA:
            dlt = tl.load(delta_ptr + row * delta_stride + c, mask=ok, other=0.0)
            x = (x.to(tl.float32) + dlt.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(x_ptr + row * n + c, x, mask=ok)
        h = x.to(tl.float32)
        rs = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n + eps)
        normed = (h * rs).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + c, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_kernel(
        x_ptr,  # [T, heads, D] with token stride x_stride (a view into the fused qkv output)
        out_ptr,  # [T, heads, D] contiguous
        pos_ptr,  # [T]
        cos_ptr,  # [max_positions, D] float32
        sin_ptr,
        x_stride,
        heads: tl.constexpr,
        head_dim: tl.constexpr,
        half: tl.constexpr,
        HEADS_P2: tl.constexpr,
        HALF_P2: tl.constexpr,
    ):
        # One program per token, all its heads: x * cos + rotate_half(x) * sin, each product
        # and the sum rounded to the model dtype as transformers' ops are (cos/sin cast to the
        # dtype first).
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, HEADS_P2)[:, None]
        i = tl.arange(0, HALF_P2)[None, :]
        ok = (h < heads) & (i < half)
        dt = out_ptr.dtype.element_ty
        src = x_ptr + t * x_stride + h * head_dim + i
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=ok, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        row = pos * head_dim + tl.arange(0, HALF_P2)
        rok = tl.arange(0, HALF_P2) < half
        c1 = tl.load(cos_ptr + row, mask=rok, other=0.0).to(dt).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + row + half, mask=rok, other=0.0).to(dt).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + row, mask=rok, other=0.0).to(dt).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + row + half, mask=rok, other=0.0).to(dt).to(tl.float32)[None, :]
        # rotated = cat(-x2, x1): out1 = x1*c1 + (-x2)*s1, out2 = x2*c2 + x1*s2
        o1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        dst = out_ptr + (t * heads + h) * head_dim + i
        tl.store(dst, o1.to(dt), mask=ok)
        tl.store(dst + half, o2.to(dt), mask=ok)

    @triton.jit
    def _silu_mul_kernel(
        h_ptr,  # [T, 2I]: gate | up
        out_ptr,  # [T, I]
        inter,
        BLOCK: tl.constexpr,
    ):
        # silu(gate) rounded to the dtype, times up, rounded (as F.silu(gate) * up).
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = c < inter
        dt = out_ptr.dtype.element_ty
        gate = tl.load(h_ptr + row * 2 * inter + c, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * 2 * inter + inter + c, mask=ok, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        tl.store(out_ptr + row * inter + c, (act * up).to(dt), mask=ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class FusedOps:
    """Fused elementwise chains of a decoder layer on GPUs (one launch each instead of the
    five to fifteen small kernels of the torch ops), with the torch ops' rounding."""

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """With `delta`: x += delta in place. Returns RMSNorm(x) * weight (a new tensor)."""
        t, n = x.shape
        assert x.is_contiguous()
        out = torch.empty_like(x)
        if t == 0:
            return out
        if delta is not None:
            assert delta.stride(1) == 1
        _add_rms_norm_kernel[(t,)](
            x,
            x if delta is None else delta,
            weight,
            out,
            n,
            x.stride(0) if delta is None else delta.stride(0),
            float(eps),
            HAS_DELTA=delta is not None,
            BLOCK=_next_pow2(n),
        )
        return out

    def rope(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos_table: torch.Tensor,
        sin_table: torch.Tensor,
    ) -> torch.Tensor:
        """x [T, heads, D] (rows may be strided, heads and D packed) -> rotated, contiguous."""
        t, heads, hd = x.shape
        assert x.stride(2) == 1 and x.stride(1) == hd
        out = torch.empty((t, heads, hd), dtype=x.dtype, device=x.device)
        if t == 0:
            return out
        _rope_kernel[(t,)](
            x,
            out,
            positions,
            cos_table,
            sin_table,
            x.stride(0),
            heads=heads,
            head_dim=hd,
            half=hd // 2,
            HEADS_P2=_next_pow2(heads),
            HALF_P2=_next_pow2(hd // 2),
        )
        return out

    def silu_mul(self, h: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate | up) -> silu(gate) * up [T, I]."""
        t, two_i = h.shape
        inter = two_i // 2
        assert h.is_contiguous()
        out = torch.empty((t, inter), dtype=h.dtype, device=h.device)
        if t == 0:
            return out
        block = min(1024, _next_pow2(inter))
        _silu_mul_kernel[(t, triton.cdiv(inter, block))](h, out, inter, BLOCK=block)
        return out


class TritonKernels(FusedOps):
    """Attention kernels with the interface `paged_attention` expects of its `kernels`
    argument (`write_kv`, `decode_attention`), and the fused elementwise ops, for CUDA tensors
    or the CPU interpreter."""

    def __init__(self, tile: int = 64) -> None:
        self.tile = tile
        """Keys per loop iteration: several 16-token blocks at once keep more loads in flight."""

    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        from tokenfab.engine.model.attention import write_kv

        write_kv(k_cache, v_cache, k, v, slots)

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        positions: torch.Tensor,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """q [B, H, D] -> [B, H, D]: each row attends to its keys [0, position] (the last
        `window` of them on sliding-window layers), read from the blocks in place."""
        b, num_heads, hd = q.shape
        kvh = k_cache.shape[2]
        group = num_heads // kvh
        q = q.contiguous()
        out = torch.empty_like(q)
        if b == 0:
            return out
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
        tables = block_tables.contiguous()
        grid = (b, kvh)
        _decode_attention_kernel[grid](
            q,
            k_cache,
            v_cache,
            tables,
            positions.contiguous(),
            out,
            float(scale),
            int(window or 0),
            tables.shape[1],
            num_kv_heads=kvh,
            group=group,
            head_dim=hd,
            block_size=k_cache.shape[1],
            GROUP_P2=max(16, _next_pow2(group)),
            DIM_P2=max(16, _next_pow2(hd)),
            TILE=self.tile,
            # float32 stays float32 (tensor cores would round it to tf32).
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            # The CPU interpreter's dot garbles bfloat16 inputs: it gets float32 ones.
            UPCAST=q.device.type == "cpu",
        )
        return out


def load(device: torch.device | str) -> Any:
    """TritonKernels for `device`, or None where triton cannot run there."""
    return TritonKernels() if usable(device) else None
