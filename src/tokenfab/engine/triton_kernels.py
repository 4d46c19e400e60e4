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
    ):
        # One program per (sequence, KV head): the query heads sharing that KV head read each
        # key and value once. Online softmax over tiles of TILE keys, in float32.
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        g = tl.arange(0, GROUP_P2)
        d = tl.arange(0, DIM_P2)
        g_ok = g < group
        d_ok = d < head_dim
        heads = kvh * group + g
        q_off = (b * num_kv_heads * group + heads)[:, None] * head_dim + d[None, :]
        qmask = g_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + q_off, mask=qmask, other=0.0).to(tl.float32) * scale

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
            k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_P2, TILE]
            scores = tl.where(j_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = acc / s[:, None]
        tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=qmask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class TritonKernels:
    """Attention kernels with the interface `paged_attention` expects of its `kernels`
    argument (`write_kv`, `decode_attention`), for CUDA tensors or the CPU interpreter."""

    def __init__(self, tile: int = 32) -> None:
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
        from tokenfab.engine.attention import write_kv

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
            GROUP_P2=_next_pow2(group),
            DIM_P2=_next_pow2(hd),
            TILE=self.tile,
        )
        return out


def load(device: torch.device | str) -> Any:
    """TritonKernels for `device`, or None where triton cannot run there."""
    return TritonKernels() if usable(device) else None
