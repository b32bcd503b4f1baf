#!/usr/bin/env bash
# The GPU pre-training benchmark in one command, on one GPU:
#   bash benchmarks/gpu_pretrain.sh [gpu_pretrain.py arguments]
# Installs what the GPU image lacks from wheels carried in .whl/ (deepspeed, webdataset, ...; see
# benchmarks/README.md for how to download them), makes the repository importable as `polymae` without
# installing it, and runs benchmarks/gpu_pretrain.py (MultiMAE ViT-B and ViT-L, 224 px, bf16, eager and compiled:
# images/s, MFU, peak memory, data wait). Output goes to stdout and to ${OUT:-/tmp}/gpu_pretrain.txt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/polymae-site .whl/*.whl
  export PYTHONPATH=/tmp/polymae-site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p /tmp/polymae-pkg
ln -sfn "$PWD" /tmp/polymae-pkg/polymae          # the repository root is the `polymae` package
export PYTHONPATH=/tmp/polymae-pkg:$PYTHONPATH
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu_pretrain.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_pretrain.txt"
