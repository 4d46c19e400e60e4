"""The Triton paged decode-attention kernel against the torch path: on CUDA where present,
else in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest). Skipped without
triton."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from tokenfab.engine.core.batch import SeqChunk, StepBatch  # noqa: E402
from tokenfab.engine.model import attention  # noqa: E402
from tokenfab.engine.model import triton_kernels as tk  # noqa: E402
from tokenfab.engine.model.loader import load_model  # noqa: E402
from tokenfab.engine.model.runner import ModelRunner  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not tk.usable(DEVICE), reason="triton cannot run here")


def _reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    pos: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """The torch path: gather each row's blocks, masked SDPA (float32)."""
    b, h, d = q.shape
    kvh = k_cache.shape[2]
    meta = attention.AttentionMetadata(
        slots=torch.zeros(0, dtype=torch.long, device=q.device),
        num_decode=b,
        decode_block_tables=tables,
        decode_positions=pos,
        prefills=[],
        block_size=k_cache.shape[1],
    )
    qd = q.float().view(b, kvh, h // kvh, d)
    kd = attention._gather(k_cache.float(), tables)
    vd = attention._gather(v_cache.float(), tables)
    out = torch.nn.functional.scaled_dot_product_attention(
        qd, kd, vd, attn_mask=meta.decode_mask(window), scale=d**-0.5
    )
    return out.reshape(b, h, d)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "window", "dtype"),
    [
        (8, 2, 32, 16, None, torch.float32),  # llama-like GQA
        (6, 2, 48, 16, 48, torch.float32),  # qwen3's head_dim 48 (not a power of two), window
        (4, 4, 64, 8, None, torch.float32),  # no grouping, small blocks
        (9, 3, 64, 16, 20, torch.bfloat16),  # group of 3 (padded), window shorter than a tile
        (32, 8, 64, 16, None, torch.bfloat16),  # Llama-3.2-1B's heads
    ],
)
def test_decode_attention_matches_torch(
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    window: int | None,
    dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    num_blocks = 24
    pos = torch.tensor([0, 5, 37, 70, 15, 16 * block_size - 1])
    width = int(pos.max()) // block_size + 1
    # Each row's blocks are scattered over the pool, in a row-specific order; unused table
    # entries stay at block 0 (must never be read).
    tables = torch.zeros(len(pos), width, dtype=torch.long)
    for i, p in enumerate(pos.tolist()):
        need = p // block_size + 1
        tables[i, :need] = torch.randperm(num_blocks, generator=gen)[:need]
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(len(pos), heads, head_dim, generator=gen).to(dtype)
    want = _reference(q, k_cache, v_cache, tables, pos, window)
    args = [x.to(DEVICE) for x in (q, k_cache, v_cache, tables, pos)]
    got = tk.TritonKernels().decode_attention(*args, head_dim**-0.5, window)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_model_decode_with_triton_matches_torch_path(
    tiny_models: dict[str, Path], family: str
) -> None:
    """A prefill, then decode steps (past mistral's 48-token window) through the Triton
    kernel, against the same model on plain torch attention."""
    from tokenfab.engine.model.model import build_model

    path = tiny_models[family]
    plain = load_model(path, dtype="float32", device=DEVICE)
    plain.model = build_model(path, plain.config, DEVICE, use_kernels=False)
    fast = load_model(path, dtype="float32", device=DEVICE)
    fast.model.kernels = None  # CPU: the C kernels would take the decodes
    fast.model.gpu_kernels = tk.TritonKernels()
    prompts = [list(range(3, 48)), list(range(100, 103))]
    tables = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    outs = []
    for loaded in (plain, fast):
        runner = ModelRunner(loaded, num_blocks=12, block_size=16, cuda_graphs=False)
        chunks = [SeqChunk(p, 0, t, sample=True) for p, t in zip(prompts, tables, strict=True)]
        steps = [runner.execute(StepBatch(chunks))]
        lens = [len(p) for p in prompts]
        for i in range(8):
            batch = [
                SeqChunk([7 + i], n + i, t, sample=True) for n, t in zip(lens, tables, strict=True)
            ]
            steps.append(runner.execute(StepBatch(batch)))
        outs.append(torch.cat(steps).cpu())
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_match_the_torch_ops(dtype: torch.dtype) -> None:
    """add+RMSNorm, RoPE and SiLU*up round as the torch ops of the layer do."""
    from tokenfab.engine.model.model import RMSNorm, _rotate

    gen = torch.Generator().manual_seed(11)
    ops = tk.FusedOps()
    t, n, heads, hd, inter = 5, 96, 3, 48, 80

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    norm = RMSNorm(n, 1e-5)
    norm.weight.data = rnd(n)
    x, delta = rnd(t, n), rnd(t, 2 * n)[:, :n]  # delta: a strided view, like o_proj's rows
    want_x = x + delta
    want = norm(want_x)
    got_x = x.to(DEVICE)
    got = ops.add_rms_norm(got_x, delta.to(DEVICE), norm.weight.to(DEVICE), 1e-5)
    # float32: reductions may sum in another order (a few ulps). bfloat16: within one ulp on a
    # GPU; the CPU interpreter truncates where a GPU rounds to nearest, so a few ulps there. A
    # wrong formula is far off either way.
    if dtype == torch.float32:
        tol = {"atol": 1e-5, "rtol": 1e-5}
    else:
        tol = {"atol": 1e-6, "rtol": 2.0**-7 if DEVICE == "cuda" else 2.0**-5}
    torch.testing.assert_close(got_x.cpu(), want_x, **tol)
    torch.testing.assert_close(got.cpu(), want, **tol)

    cos = torch.randn(64, hd, generator=gen)
    sin = torch.randn(64, hd, generator=gen)
    pos = torch.tensor([0, 3, 63, 7, 7])
    qkv = rnd(t, 2 * heads * hd)
    q = qkv[:, : heads * hd].view(t, heads, hd)  # strided rows, as split from the fused qkv
    want = _rotate(q, cos[pos].to(dtype)[:, None, :], sin[pos].to(dtype)[:, None, :])
    got = ops.rope(q.to(DEVICE), pos.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE))
    # A sum of two rounded products: near-cancelling sums carry the terms' absolute error.
    atol = tol["atol"] if dtype == torch.float32 else 2.0**-6 * float(want.abs().max())
    torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=tol["rtol"])

    h = rnd(t, 2 * inter)
    want = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    got = ops.silu_mul(h.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, **tol)
