"""Bytes of whole KV blocks in and out of a runner's KV tensor.

The runner keeps K and V of every layer in one tensor [layers, 2, blocks, block_size,
kv_heads, head_dim]; one block's bytes are strided across layers. Export gathers the blocks
into [n, layers, 2, block_size, kv_heads, head_dim], contiguous, as uint8 rows of
`block_bytes`; import scatters such rows back. (Issue 12's disaggregated transfer needs the
same primitive; this module is the one place it lives here.)
"""

from __future__ import annotations

import numpy as np
import torch


def block_bytes(kv: torch.Tensor) -> int:
    layers, two, _, *rest = kv.shape
    n = layers * two * kv.element_size()
    for d in rest:
        n *= d
    return n


def export_blocks(kv: torch.Tensor, block_ids: list[int]) -> np.ndarray:
    """[len(block_ids), block_bytes] uint8 copies of the blocks (on the host)."""
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv.device)
    with torch.inference_mode():
        rows = kv.index_select(2, idx).movedim(2, 0).contiguous().cpu()
    return rows.view(torch.uint8).reshape(len(block_ids), -1).numpy()


def import_blocks(kv: torch.Tensor, block_ids: list[int], data: np.ndarray) -> None:
    """Write rows of `export_blocks`' layout into the blocks."""
    if len(block_ids) != len(data):
        raise ValueError(f"{len(block_ids)} blocks but {len(data)} rows of data")
    if not block_ids:
        return
    layers, two, _, *rest = kv.shape
    src = torch.from_numpy(np.ascontiguousarray(data)).view(kv.dtype)
    src = src.reshape(len(block_ids), layers, two, *rest).movedim(0, 2).to(kv.device)
    idx = torch.tensor(block_ids, dtype=torch.long, device=kv.device)
    with torch.inference_mode():
        kv.index_copy_(2, idx, src)
