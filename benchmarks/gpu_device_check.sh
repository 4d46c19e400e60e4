#!/usr/bin/env bash
# One prepared run on a GPU machine (issue 17): the engine's numerics tests on CUDA, then
# benchmarks/gpu_engine.py. Run from a copy of the repository root; wheels for packages the
# machine lacks (msgspec, platformdirs) in whl/. Results go to $OUT (or ./out).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
if ls whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src
export TOKENFAB_CACHE_DIR=/tmp/tokenfab-cache
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)'
} > "$OUT/env.txt" 2>&1
# 1. Kernel and graph tests first (fast), then the benchmark, then the slower equivalence tests.
timeout 120 python3 -m pytest -q -p no:cacheprovider -k "not cpu" \
    tests/engine/test_triton_kernels.py tests/engine/test_cuda_graphs.py > "$OUT/pytest_kernels.txt" 2>&1
echo "pytest kernels rc=$?" >> "$OUT/pytest_kernels.txt"
timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/gpu_engine.py --profile --json-out "$OUT/gpu_engine.json" \
    > "$OUT/gpu_engine.txt" 2>&1
echo "gpu_engine rc=$?" >> "$OUT/gpu_engine.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider -k "not cpu" \
    tests/engine/test_runner.py tests/engine/test_hf_equivalence.py > "$OUT/pytest_numerics.txt" 2>&1
echo "pytest numerics rc=$?" >> "$OUT/pytest_numerics.txt"
tail -n 3 "$OUT"/pytest_*.txt; cat "$OUT/gpu_engine.txt"
