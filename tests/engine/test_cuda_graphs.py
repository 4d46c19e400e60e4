"""Decode steps replayed from CUDA graphs equal the eager model's, padding rows never touch
the engine's blocks (CUDA only), and the batch buckets cover every size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenfab.engine.core.batch import SeqChunk, StepBatch
from tokenfab.engine.model.cuda_graphs import buckets
from tokenfab.engine.model.loader import load_model
from tokenfab.engine.model.runner import ModelRunner


def test_buckets_cover_every_batch_size() -> None:
    for top in (1, 3, 64, 65, 256, 300, 512):
        sizes = buckets(top)
        assert sizes == sorted(set(sizes)) and sizes[-1] >= top
        for n in range(1, top + 1):
            b = next(s for s in sizes if s >= n)
            assert b - n < max(32, n // 2 + 1)  # padding stays a fraction of the batch
    assert buckets(256)[:4] == [1, 2, 4, 8] and 256 in buckets(256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replays_equal_eager_steps(tiny_models: dict[str, Path], dtype: str) -> None:
    path = tiny_models["qwen3"]
    loaded = load_model(path, dtype=dtype, device="cuda")
    assert loaded.model.gpu_kernels is not None
    graphed = ModelRunner(loaded, num_blocks=64, block_size=16)
    eager = ModelRunner(loaded, num_blocks=64, block_size=16, cuda_graphs=False)
    assert graphed.graphs is not None and eager.graphs is None
    gen = torch.Generator().manual_seed(5)
    # 5 sequences (bucket 8: 3 padding rows), then 3 of them (bucket 4: 1 padding row).
    prompts = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (4, 17, 33, 1, 60)]
    tables = [list(range(5 * i, 5 * i + 5)) for i in range(5)]
    used = {b for t in tables for b in t}
    untouched = [b for b in range(64) if b not in used]
    sentinel = 7.0  # padding rows (token 0, whose embedding may be zero) must not write here
    graphed.kv[:, :, untouched] = sentinel
    for runner in (graphed, eager):
        runner.execute(
            StepBatch([SeqChunk(p, 0, t, True) for p, t in zip(prompts, tables, strict=True)])
        )
    lens = [len(p) for p in prompts]
    for step in range(6):
        rows = range(5) if step < 3 else (0, 2, 4)
        batch = StepBatch(
            [SeqChunk([11 + step], lens[i] + step, tables[i], sample=i != 2) for i in rows]
        )
        a, b = graphed.execute(batch), eager.execute(batch)
        assert a.shape == (len(rows) - 1, 512)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert sorted(graphed.graphs.graphs) == [4, 8]
    assert bool((graphed.kv[:, :, untouched] == sentinel).all())  # padding: scratch block only
