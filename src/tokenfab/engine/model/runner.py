"""Runs one scheduled step of the model over the paged KV cache: a `StepBatch` in, logits out.

`TorchRunner` (engine/torch_runner.py) wraps it with sampling to make the step loop's runner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tokenfab.engine.core.batch import StepBatch
    from tokenfab.engine.model.attention import AttentionMetadata
    from tokenfab.engine.model.loader import LoadedModel
    from tokenfab.engine.model.model import ModelConfig


def kv_bytes_per_block(
    config: ModelConfig, block_size: int, dtype: torch.dtype | None = None
) -> int:
    """Bytes of K and V for one block across all layers."""
    import torch

    dt = config.dtype if dtype is None else dtype
    itemsize = torch.empty((), dtype=dt).element_size()
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize
    return per_token * block_size


class ModelRunner:
    """Runs steps of a `CausalLM` over a KV cache it allocates: per layer a K and a V tensor of
    shape [num_blocks, block_size, num_kv_heads, head_dim] in the model's dtype."""

    def __init__(
        self,
        loaded: LoadedModel,
        num_blocks: int,
        block_size: int,
        num_threads: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = loaded.model
        self.config = loaded.config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = next(self.model.parameters()).device
        cfg = self.config
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # One allocation for all layers: [layers, 2, blocks, block_size, kv_heads, head_dim].
        # Zeroed and touched up front: the torch attention path reads masked padding (NaN
        # garbage would poison it), and first-touch page faults inside timed steps cost more
        # (measured ~0.8 ms per layer call in a prefill-heavy run) than ~0.5 s/GiB at startup.
        graphs = cuda_graphs and self.device.type == "cuda" and self.model.gpu_kernels is not None
        # CUDA graphs pad decode batches with rows that write to one extra, scratch block.
        pool = (num_blocks + 1, *shape[1:]) if graphs else shape
        self.kv = torch.zeros((cfg.num_layers, 2, *pool), dtype=cfg.dtype, device=self.device)
        self.kv_caches = [(self.kv[i, 0], self.kv[i, 1]) for i in range(cfg.num_layers)]
        self.graphs = None
        if graphs:
            from tokenfab.engine.model.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                block_size,
                max_batch=512,  # larger decode batches (max_num_seqs > 512) run eagerly
                max_blocks_per_seq=min(num_blocks, -(-cfg.max_position_embeddings // block_size)),
                scratch_block=num_blocks,
            )

    def execute(self, batch: StepBatch) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            if batch.chunks and all(len(c.token_ids) == 1 for c in batch.chunks):
                return self._decode(batch)
            inputs = self._prepare(batch)
            if inputs is None:
                return torch.empty((0, self.config.vocab_size), dtype=torch.float32)
            ids, positions, meta, rows = inputs
            logits = self.model(ids, positions, meta, self.kv_caches, rows)
            return logits.float()

    def _decode(self, batch: StepBatch) -> torch.Tensor:
        """A step of single-token chunks: inputs built with array operations (no Python per
        token), then a CUDA graph replay where one fits, else the eager model."""
        import torch

        from tokenfab.engine.model.attention import AttentionMetadata

        ids, pos, slots, tables = self._decode_arrays(batch)
        sample = [i for i, c in enumerate(batch.chunks) if c.sample]
        if self.graphs is not None and self.graphs.fits(len(ids), tables.shape[1]):
            hidden = self.graphs.run(ids, pos, slots, tables)
        else:

            def t(x: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(x).to(self.device)

            meta = AttentionMetadata(
                slots=t(slots),
                num_decode=len(ids),
                decode_block_tables=t(tables),
                decode_positions=t(pos),
                prefills=[],
                block_size=self.block_size,
            )
            hidden = self.model.hidden(t(ids), t(pos), meta, self.kv_caches)
        if len(sample) < len(ids):
            hidden = hidden[torch.tensor(sample, dtype=torch.long, device=self.device)]
        return self.model.logits(hidden).float()

    def _decode_arrays(
        self, batch: StepBatch
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """ids, positions, slots [n] and block tables [n, blocks needed by the longest],
        int64, of a step of single-token chunks."""
        import itertools

        import numpy as np

        chunks = batch.chunks
        n = len(chunks)
        bs = self.block_size
        ids = np.fromiter((c.token_ids[0] for c in chunks), np.int64, n)
        pos = np.fromiter((c.start_pos for c in chunks), np.int64, n)
        lens = np.fromiter((len(c.block_table) for c in chunks), np.int64, n)
        need = pos // bs + 1
        short = np.flatnonzero(lens < need)
        if short.size:
            i = int(short[0])
            raise ValueError(
                f"block_table has {lens[i]} blocks, positions up to {pos[i] + 1} need {need[i]}"
            )
        top = int(pos.max())
        if top >= self.config.max_position_embeddings:
            raise ValueError(
                f"position {top} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        flat = np.fromiter(
            itertools.chain.from_iterable(c.block_table for c in chunks), np.int64, int(lens.sum())
        )
        width = int(need.max())
        row = np.repeat(np.arange(n), lens)
        col = np.arange(flat.size) - np.repeat(np.cumsum(lens) - lens, lens)
        keep = col < width
        tables = np.zeros((n, width), dtype=np.int64)  # padding: block 0, never read
        tables[row[keep], col[keep]] = flat[keep]
        slots = tables[np.arange(n), pos // bs] * bs + pos % bs
        return ids, pos, slots, tables

    def _prepare(
        self, batch: StepBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor] | None:
        """Flatten the chunks (single-token ones first) into ids, positions, attention metadata
        and the rows whose logits are wanted (in chunk order); None for an empty batch."""
        import torch

        from tokenfab.engine.model.attention import AttentionMetadata, PrefillSpan

        bs = self.block_size
        dev = self.device
        # Single-token chunks first (one batched attention call), then multi-token spans.
        order = sorted(range(len(batch.chunks)), key=lambda i: len(batch.chunks[i].token_ids) > 1)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_row = [0] * len(batch.chunks)
        first_row = [0] * len(batch.chunks)
        decode_tables: list[list[int]] = []
        decode_pos: list[int] = []
        spans: list[tuple[int, int, int, list[int]]] = []
        for i in order:
            c = batch.chunks[i]
            n = len(c.token_ids)
            if n == 0:
                raise ValueError("a SeqChunk must carry at least one token")
            need = -(-(c.start_pos + n) // bs)
            if len(c.block_table) < need:
                raise ValueError(
                    f"block_table has {len(c.block_table)} blocks, positions up to "
                    f"{c.start_pos + n} need {need}"
                )
            row = len(ids)
            ids.extend(c.token_ids)
            pos = range(c.start_pos, c.start_pos + n)
            positions.extend(pos)
            table = c.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            last_row[i] = row + n - 1
            first_row[i] = row
            if n == 1:
                decode_tables.append(table[:need])
                decode_pos.append(c.start_pos)
            else:
                spans.append((row, n, c.start_pos, table[:need]))
        if not ids:
            return None
        if max(positions) >= self.config.max_position_embeddings:
            raise ValueError(
                f"position {max(positions)} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=dev)

        dbt = None
        if decode_tables:
            width = max(len(b) for b in decode_tables)
            dbt = t([b + [0] * (width - len(b)) for b in decode_tables]).view(-1, width)
        meta = AttentionMetadata(
            slots=t(slots),
            num_decode=len(decode_tables),
            decode_block_tables=dbt,
            decode_positions=t(decode_pos) if decode_pos else None,
            prefills=[PrefillSpan(r, n, s, t(b)) for r, n, s, b in spans],
            block_size=bs,
        )
        wanted: list[int] = []
        for i, c in enumerate(batch.chunks):
            if c.all_logits:
                wanted.extend(range(first_row[i], last_row[i] + 1))
            elif c.sample:
                wanted.append(last_row[i])
        rows = t(wanted)
        return t(ids), t(positions), meta, rows
