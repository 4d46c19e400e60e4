"""Small fused CPU kernels in C, compiled once with the system C compiler and called via ctypes.

Why: on CPU the decode step's paged attention in plain torch must first gather every sequence's
K/V blocks into a padded copy (hundreds of MB per step at batch 64), and bfloat16 elementwise
ops (RMSNorm, RoPE, SiLU*up) run far below memory speed. These kernels read the paged cache in
place (online per-block softmax) and fuse the elementwise chains. They are optional: if no
compiler is available or the build fails, `load()` returns None and the torch path is used.

The library is built with -march=native by `tokenfab.native` (cached per source, flags and CPU
feature flags, so a copied cache on another CPU is never reused).
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import torch

from tokenfab.native import load_library

_SOURCE_FILE = Path(__file__).with_name("cpu_kernels.c")
"""The kernels' C source: package data next to this module, read when the library is built."""

_FLAGS = [
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    # The vectorizing parts of -ffast-math, but not the flag itself: with it, gcc links
    # crtfastmath.o into the library, whose loading turns on flush-to-zero for the whole
    # process and silently changes everyone else's float arithmetic.
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fno-signed-zeros",
    "-fassociative-math",
    "-freciprocal-math",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-std=c11",
]


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.paged_decode_attention.argtypes = [p, i64, p, p, p, p, p] + [i32] * 7 + [f32, i32]
    lib.add_rms_norm_bf16.argtypes = [p, i64, p, i64, p, p, i32, i32, f32]
    lib.silu_mul_bf16.argtypes = [p, p, i32, i32]
    lib.rope_bf16.argtypes = [p, i64, i32, i32, p, p, p, i32]
    lib.write_kv.argtypes = [p, i64, p, i64, p, p, p, i32, i32, i32]
    lib.logits_candidates_bf16.argtypes = [p, p, i32, i32, f32, p, i32, p]
    lib.logits_candidates_bf16.restype = None
    lib.has_bf16_simd.argtypes = []
    lib.has_bf16_simd.restype = ctypes.c_int
    for f in (
        "paged_decode_attention",
        "add_rms_norm_bf16",
        "silu_mul_bf16",
        "rope_bf16",
        "write_kv",
    ):
        getattr(lib, f).restype = None
    return lib


@cache
def load() -> CpuKernels | None:
    """The compiled kernels, or None where they cannot be built (or TOKENFAB_NO_KERNELS=1)."""
    if os.environ.get("TOKENFAB_NO_KERNELS") == "1":
        return None
    lib = load_library("kernels", _SOURCE_FILE.read_text(), _FLAGS)
    return CpuKernels(_bind(lib)) if lib is not None else None


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class CpuKernels:
    """Typed wrappers that check layouts before handing raw pointers to C."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

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
        """q [B, H, D] (rows may be strided, heads contiguous) -> out [B, H, D]."""
        b, h, d = q.shape
        nb, bs, kvh, d2 = k_cache.shape
        assert d == d2 and q.stride(2) == 1 and q.stride(1) == d and k_cache.is_contiguous()
        assert v_cache.is_contiguous() and q.dtype == k_cache.dtype == v_cache.dtype
        assert h % kvh == 0 and h // kvh <= 32 and d <= 256 and bs <= 64
        assert block_tables.dtype == positions.dtype == torch.int64
        assert block_tables.is_contiguous() and positions.is_contiguous()
        out = torch.empty((b, h, d), dtype=q.dtype)
        self.lib.paged_decode_attention(
            _ptr(q),
            q.stride(0),
            _ptr(k_cache),
            _ptr(v_cache),
            _ptr(block_tables),
            _ptr(positions),
            _ptr(out),
            b,
            h,
            kvh,
            d,
            bs,
            block_tables.shape[1],
            window or 0,
            scale,
            1 if q.dtype == torch.bfloat16 else 0,
        )
        return out

    def write_kv(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        """Copy k/v [T, kvh, D] (each token's row contiguous) into their flat cache slots."""
        t, kvh, d = k.shape
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
        assert k.dtype == v.dtype == k_cache.dtype and slots.dtype == torch.int64
        assert k.stride(2) == 1 and k.stride(1) == d and v.stride(2) == 1 and v.stride(1) == d
        assert slots.is_contiguous() and slots.shape[0] == t
        self.lib.write_kv(
            _ptr(k),
            k.stride(0),
            _ptr(v),
            v.stride(0),
            _ptr(k_cache),
            _ptr(v_cache),
            _ptr(slots),
            t,
            kvh * d,
            k.element_size(),
        )

    def logits_candidates(
        self, logits: torch.Tensor, rel: float, max_candidates: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """bf16 logits [S, V] -> (float32 logits, row ids, column ids) of the candidates within
        `rel` (relative to the row maximum, at least 1) of each row's maximum."""
        s, v = logits.shape
        assert logits.dtype == torch.bfloat16 and logits.is_contiguous()
        out = torch.empty((s, v), dtype=torch.float32)
        cand = torch.empty((s, max_candidates), dtype=torch.int64)
        counts = torch.empty((s,), dtype=torch.int64)
        self.lib.logits_candidates_bf16(
            _ptr(logits), _ptr(out), s, v, rel, _ptr(cand), max_candidates, _ptr(counts)
        )
        keep = torch.arange(max_candidates)[None, :] < counts[:, None]
        rows = torch.arange(s).repeat_interleave(counts)
        return out, rows, cand[keep]

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """x += delta (in place, bf16), then return RMSNorm(x) * weight."""
        t, n = x.shape
        assert x.dtype == weight.dtype == torch.bfloat16 and x.stride(1) == 1 and n <= 8192
        if delta is not None:
            assert delta.dtype == torch.bfloat16 and delta.stride(1) == 1 and delta.shape == x.shape
        out = torch.empty((t, n), dtype=x.dtype)
        self.lib.add_rms_norm_bf16(
            _ptr(x),
            x.stride(0),
            None if delta is None else _ptr(delta),
            0 if delta is None else delta.stride(0),
            _ptr(weight),
            _ptr(out),
            t,
            n,
            eps,
        )
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        t, two_i = gate_up.shape
        assert gate_up.dtype == torch.bfloat16 and gate_up.is_contiguous()
        out = torch.empty((t, two_i // 2), dtype=gate_up.dtype)
        self.lib.silu_mul_bf16(_ptr(gate_up), _ptr(out), t, two_i // 2)
        return out

    def rope(
        self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> None:
        """In place on x [T, nh, D] (bf16, heads contiguous, rows may be strided)."""
        t, nh, d = x.shape
        assert x.dtype == torch.bfloat16 and x.stride(2) == 1 and x.stride(1) == d and d <= 256
        assert cos.dtype == sin.dtype == torch.float32 and cos.is_contiguous() and d == cos.shape[1]
        assert positions.dtype == torch.int64 and positions.is_contiguous()
        self.lib.rope_bf16(_ptr(x), x.stride(0), nh, d, _ptr(positions), _ptr(cos), _ptr(sin), t)
