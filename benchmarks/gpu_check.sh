#!/usr/bin/env bash
# GPU check (see benchmarks/gpu_check.py): CUDA-vs-CPU parity, s/expert for ViT-B/32 and ViT-L/14
# shapes (and WUDI, Iso-CTS at full B/32 width), peak GPU memory, decomposition time alone,
# evaluation images/s (ViT-B/32 shape at 224 px, first pass and warm cache, float32 and bfloat16).
# Under 4 minutes on one GPU.
# Python: $PYTHON if set, else the repository's .venv, else a python3 that imports torch, else
# `make` creates .venv as the README's set-up does (CPU torch: no GPU is then measured).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
elif command -v python3 >/dev/null && python3 -c "import torch, transformers, safetensors, accelerate" 2>/dev/null; then
  py=python3
else
  make .venv/.installed >/dev/null
  py=.venv/bin/python
fi
if ! "$py" -c "import hf_merge" 2>/dev/null; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec timeout 600 "$py" benchmarks/gpu_check.py "$@"
