"""CUDA graphs for decode steps: the decoder stack of a step whose chunks are all single
tokens, captured once per bucketed batch size and replayed.

Why: a decode step launches hundreds of small kernels (per layer: norms, projections, RoPE,
cache writes, attention, MLP); on a GPU their launch cost in Python, not the GPU's work, sets
the step time. A replay launches them all at once.

A graph reads its inputs from static device buffers: token ids, positions, cache slots and
block tables are copied there before each replay. A batch is padded up to its bucket with rows
that write to and read from one scratch block outside the engine's pool, so padding never
touches a sequence's cache. Graphs are captured lazily, the first time a bucket is needed, and
share one memory pool (only one runs at a time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from tokenfab.engine.model.attention import AttentionMetadata

if TYPE_CHECKING:
    from tokenfab.engine.model.model import CausalLM

BUCKET_STEPS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
"""Small batch buckets; beyond 64, every multiple of 32 (padding at most 31 rows)."""


def buckets(max_batch: int) -> list[int]:
    """Batch sizes graphs are captured for, ascending, the last one >= max_batch."""
    sizes = [b for b in BUCKET_STEPS if b < max_batch]
    b = 64
    while b < max_batch:
        b += 32
        sizes.append(b)
    if not sizes or sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sorted(set(sizes))


class DecodeGraphs:
    """Captured decode steps of one model over one KV pool.

    `run` takes the step's inputs as host arrays and returns the final hidden states
    [n, hidden] (before the last norm; logits are computed outside the graph because the
    bfloat16 refinement selects a data-dependent number of candidates).
    """

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_batch: int,
        max_blocks_per_seq: int,
        scratch_block: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.buckets = buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.width = max_blocks_per_seq
        self.scratch = scratch_block
        device = kv_caches[0][0].device
        # ids | positions | slots of up to max_batch rows; one host->device copy per step.
        self.rows = torch.zeros((3, self.max_batch), dtype=torch.long, device=device)
        self.tables = torch.full(
            (self.max_batch, self.width), scratch_block, dtype=torch.long, device=device
        )
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: tuple[int, int] | None = None

    def fits(self, n: int, width: int) -> bool:
        return 0 < n <= self.max_batch and width <= self.width

    def run(
        self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, tables: np.ndarray
    ) -> torch.Tensor:
        """ids/positions/slots [n] int64 and block tables [n, w]; returns hidden [n, H]."""
        n, w = tables.shape
        bucket = next(b for b in self.buckets if b >= n)
        host = np.zeros((3, bucket), dtype=np.int64)
        host[2, n:] = self.scratch * self.block_size  # padding rows: position 0 of scratch
        host[0, :n], host[1, :n], host[2, :n] = ids, positions, slots
        self.rows[:, :bucket].copy_(torch.from_numpy(host))
        padded = np.full((bucket, w), self.scratch, dtype=np.int64)
        padded[:n] = tables
        # Only the first w columns: keys past a row's position are never read.
        self.tables[:bucket, :w].copy_(torch.from_numpy(padded))
        entry = self.graphs.get(bucket)
        if entry is None:
            entry = self._capture(bucket)
            self.graphs[bucket] = entry
        graph, out = entry
        graph.replay()
        return out[:n]

    def _meta(self, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(
            slots=self.rows[2, :bucket],
            num_decode=bucket,
            decode_block_tables=self.tables[:bucket],
            decode_positions=self.rows[1, :bucket],
            prefills=[],
            block_size=self.block_size,
        )

    def _forward(self, bucket: int) -> torch.Tensor:
        return self.model.hidden(
            self.rows[0, :bucket], self.rows[1, :bucket], self._meta(bucket), self.kv_caches
        )

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # One eager run first, on a side stream as capture requires: it compiles the Triton
        # kernels and sets up cuBLAS outside the graph. It writes the same K/V the replay will.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(bucket)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(bucket)
        self.pool = graph.pool()
        return graph, out
