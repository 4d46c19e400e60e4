"""Paged attention over a block-structured KV cache, in plain device-neutral torch.

The cache of one layer is a pair of tensors `[num_blocks, block_size, num_kv_heads, head_dim]`
(keys, values). A step mixes single-token decodes and multi-token prefill chunks: the decodes
are attended together in one batched SDPA call over their gathered blocks (padded to the longest
context and masked); each prefill chunk gets its own SDPA call, causal over the cached prefix
plus its new tokens. The new K/V of every token are written to their slots before attending.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from tokenfab.engine.model.cpu_kernels import CpuKernels


@dataclass
class PrefillSpan:
    """One multi-token chunk: rows [row, row + n) of the step's flattened tokens."""

    row: int
    n: int
    start_pos: int
    block_table: torch.Tensor
    """Physical blocks covering positions [0, start_pos + n), int64."""


@dataclass
class AttentionMetadata:
    """Where each token of a step goes in the cache and whom it attends to.

    Rows [0, num_decode) of the flattened step are single-token chunks (decodes); the
    remaining rows are prefill spans, in order.
    """

    slots: torch.Tensor
    """Flat cache slot (block * block_size + offset) of every token, int64 [T]."""
    num_decode: int
    decode_block_tables: torch.Tensor | None
    """[num_decode, max_blocks] int64, padded with block 0 (masked out)."""
    decode_positions: torch.Tensor | None
    """Position of each decode token, int64 [num_decode]; it attends to keys [0, position]."""
    prefills: list[PrefillSpan]
    block_size: int
    _masks: dict[tuple[str, int, int | None], torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """Boolean [num_decode, 1, 1, L] mask: key j is visible to the decode at position p
        if j <= p (and p - j < window for sliding-window layers)."""
        key = ("decode", 0, window)
        mask = self._masks.get(key)
        if mask is None:
            assert self.decode_block_tables is not None and self.decode_positions is not None
            length = self.decode_block_tables.shape[1] * self.block_size
            j = torch.arange(length, device=self.slots.device)
            pos = self.decode_positions[:, None]
            mask = j[None, :] <= pos
            if window is not None:
                mask &= j[None, :] > pos - window
            mask = mask[:, None, None, :]
            self._masks[key] = mask
        return mask

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor:
        """Boolean [n, start_pos + n] mask of prefill span `index`."""
        key = ("prefill", index, window)
        mask = self._masks.get(key)
        if mask is None:
            span = self.prefills[index]
            device = self.slots.device
            qpos = torch.arange(span.start_pos, span.start_pos + span.n, device=device)[:, None]
            j = torch.arange(span.start_pos + span.n, device=device)[None, :]
            mask = j <= qpos
            if window is not None:
                mask &= j > qpos - window
            self._masks[key] = mask
        return mask


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Store new keys/values [T, kvh, hd] at their flat slots."""
    kvh, hd = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kvh, hd).index_copy_(0, slots, k)
    v_cache.view(-1, kvh, hd).index_copy_(0, slots, v)


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[..., max_blocks] block ids -> keys or values [..., kvh, L, hd]."""
    g = cache[block_table]  # [..., max_blocks, bs, kvh, hd]
    lead = g.shape[:-4]
    g = g.reshape(*lead, g.shape[-4] * g.shape[-3], g.shape[-2], g.shape[-1])
    return g.transpose(-3, -2)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    kernels: CpuKernels | None = None,
) -> torch.Tensor:
    """Attention of one layer for a whole step.

    q [T, H, hd], k/v [T, kvh, hd] (already rotated); returns [T, H * hd]. With `kernels`
    (CPU), decodes read the paged cache in place instead of gathering a padded copy.
    """
    if kernels is not None:
        kernels.write_kv(k_cache, v_cache, k, v, meta.slots)
    else:
        write_kv(k_cache, v_cache, k, v, meta.slots)
    t, num_heads, hd = q.shape
    kvh = k.shape[1]
    group = num_heads // kvh
    out = torch.empty((t, num_heads, hd), dtype=q.dtype, device=q.device)
    nd = meta.num_decode
    if nd and kernels is not None and k_cache.shape[1] <= 64:  # the kernel's block limit
        assert meta.decode_block_tables is not None and meta.decode_positions is not None
        out[:nd] = kernels.decode_attention(
            q[:nd],
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_positions,
            scale,
            window,
        )
    elif nd:
        assert meta.decode_block_tables is not None
        # Query heads sharing a KV head become that head's "query rows": no repeat of K/V.
        qd = q[:nd].view(nd, kvh, group, hd)
        kd = _gather(k_cache, meta.decode_block_tables)
        vd = _gather(v_cache, meta.decode_block_tables)
        od = F.scaled_dot_product_attention(
            qd, kd, vd, attn_mask=meta.decode_mask(window), scale=scale
        )
        # reshape, not view: CUDA's SDPA kernels may return [nd, kvh, group, hd] with strides
        # of another layout (seen for qwen3 and mistral on an H200), which view refuses.
        out[:nd] = od.reshape(nd, num_heads, hd)
    i = 0
    spans = meta.prefills
    while i < len(spans):
        span = spans[i]
        if span.start_pos == 0 and window is None:
            # Fresh prompts of equal length in consecutive rows: one batched causal call.
            j = i + 1
            while (
                j < len(spans)
                and spans[j].start_pos == 0
                and spans[j].n == span.n
                and spans[j].row == span.row + (j - i) * span.n
            ):
                j += 1
            rows = slice(span.row, span.row + (j - i) * span.n)
            shape = (j - i, span.n)
            qp = q[rows].view(*shape, num_heads, hd).transpose(1, 2)
            kp = k[rows].view(*shape, kvh, hd).transpose(1, 2)
            vp = v[rows].view(*shape, kvh, hd).transpose(1, 2)
            op = F.scaled_dot_product_attention(
                qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True
            )
            out[rows] = op.transpose(1, 2).reshape(-1, num_heads, hd)
            i = j
            continue
        rows = slice(span.row, span.row + span.n)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
        length = span.start_pos + span.n
        kp = _gather(k_cache, span.block_table)[:, :length].unsqueeze(0)
        vp = _gather(v_cache, span.block_table)[:, :length].unsqueeze(0)
        op = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=meta.prefill_mask(i, window), scale=scale, enable_gqa=True
        )
        out[rows] = op[0].transpose(0, 1)
        i += 1
    return out.view(t, num_heads * hd)
