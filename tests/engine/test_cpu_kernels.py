"""The C kernels against the plain torch code they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenfab.engine.model import cpu_kernels
from tokenfab.engine.model.attention import AttentionMetadata, paged_attention

KERNELS = cpu_kernels.load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="no C compiler here")


def _meta(positions: list[int], tables: list[list[int]], bs: int) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        slots=torch.tensor(
            [t[p // bs] * bs + p % bs for p, t in zip(positions, tables, strict=True)]
        ),
        num_decode=len(positions),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        decode_positions=torch.tensor(positions),
        prefills=[],
        block_size=bs,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("head_dim", [64, 48])
@pytest.mark.parametrize("bs", [16, 8])  # the 16-token-block variant and the general one
def test_decode_attention_matches_sdpa(
    dtype: torch.dtype, window: int | None, head_dim: int, bs: int
) -> None:
    gen = torch.Generator().manual_seed(0)
    kvh, heads, blocks = 3, 9, 40
    k_cache = torch.randn(blocks, bs, kvh, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(blocks, bs, kvh, head_dim, generator=gen).to(dtype)
    positions = [0, 15, 16, 77, 130]  # block edges and a long context
    perm = torch.randperm(blocks, generator=gen).tolist()
    tables, used = [], 0
    for p in positions:
        n = p // bs + 1
        tables.append(perm[used : used + n])
        used += n
    q = torch.randn(len(positions), heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(len(positions), kvh, head_dim, generator=gen).to(dtype)
    v = torch.randn(len(positions), kvh, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    ref = paged_attention(
        q, k, v, k_cache.clone(), v_cache.clone(), _meta(positions, tables, bs), scale, window
    )
    got = paged_attention(
        q, k, v, k_cache, v_cache, _meta(positions, tables, bs), scale, window, KERNELS
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref.float(), atol=tol, rtol=tol)


def test_fused_elementwise_ops() -> None:
    assert KERNELS is not None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 96, generator=gen).bfloat16()
    d = torch.randn(7, 96, generator=gen).bfloat16()
    w = torch.randn(96, generator=gen).bfloat16()

    def norm(t: torch.Tensor) -> torch.Tensor:
        h = t.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()

    xx = x.clone()
    out = KERNELS.add_rms_norm(xx, d, w, 1e-5)
    assert torch.equal(xx, x + d) and torch.equal(out, norm(x + d))
    assert torch.equal(KERNELS.add_rms_norm(x.clone(), None, w, 1e-5), norm(x))
    # 40 wide: two 16-lane vectors and a scalar tail; large and extreme inputs saturate exp
    gu = (torch.randn(7, 80, generator=gen) * 8).bfloat16()
    gu[0, :4] = torch.tensor([-200.0, 200.0, -88.0, 88.0])
    ref = (F.silu(gu[:, :40].float()) * gu[:, 40:].float()).bfloat16()
    torch.testing.assert_close(KERNELS.silu_mul(gu), ref, atol=1e-2, rtol=1e-2)
    # RoPE in place on a strided view, as on the fused qkv output
    qkv = torch.randn(7, 3 * 32, generator=gen).bfloat16()
    q = qkv[:, :64].view(7, 2, 32)
    pos = torch.tensor([0, 1, 2, 9, 50, 51, 99])
    ang = pos[:, None].float() * torch.rand(16, generator=gen)[None, :]
    cos = torch.cat([ang, ang], -1).cos().contiguous()
    sin = torch.cat([ang, ang], -1).sin().contiguous()
    qf = q.float()
    rot = torch.cat([-qf[..., 16:], qf[..., :16]], -1)
    expected = (qf * cos[:, None] + rot * sin[:, None]).bfloat16()
    untouched = qkv[:, 64:].clone()
    full_cos = torch.zeros(100, 32)
    full_sin = torch.zeros(100, 32)
    full_cos[pos], full_sin[pos] = cos, sin
    KERNELS.rope(q, pos, full_cos, full_sin)
    torch.testing.assert_close(q, expected, atol=2e-2, rtol=1e-2)
    assert torch.equal(qkv[:, 64:], untouched)


def test_logits_candidates() -> None:
    assert KERNELS is not None
    logits = torch.tensor([[1.0, 25.25, 25.25, 24.0, -3.0], [0.1, 0.2, -0.5, 0.3, 0.0]]).bfloat16()
    out, rows, cols = KERNELS.logits_candidates(logits, 2.0**-5)
    assert torch.equal(out, logits.float())
    # row 0: within 25.25 * 2**-5 ~ 0.79 of the max; row 1: within 1 * 2**-5 of 0.3
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 1), (0, 2), (1, 3)]
