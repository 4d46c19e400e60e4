"""Device selection for the engine's numerics tests: every test taking `device` runs on CPU,
and again on CUDA where a GPU is present (skipped elsewhere, which is everywhere in CI)."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    # Triton picks its CPU interpreter when a kernel is defined, so this must precede the
    # first import of tokenfab.engine.model.triton_kernels: without a GPU, the Triton kernels'
    # tests run in the interpreter. CPU models never use Triton, so nothing else changes.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
    ]
)
def device(request: pytest.FixtureRequest) -> str:
    return request.param
