#!/usr/bin/env bash
# One-time (idempotent) set-up of a virtual environment with everything polymae and its tests need.
#   bash scripts/setup.sh            # creates ./.venv (or $POLYMAE_VENV)
# torch/torchvision: on the 2-core CPU reference machine the pair that works with timm is
# torch 2.14.1 + torchvision 0.29.1 (see README). A GPU user who manages torch themselves sets
# POLYMAE_TORCH=skip and installs torch as usual first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${POLYMAE_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${POLYMAE_TORCH:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# Re-install only when the dependency declaration changed.
stamp="$VENV/.polymae-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
start=$(date +%s)
# pip warns about every absent local index folder; keep its real errors (pipefail keeps its status).
quiet() { grep -v "is ignored: it is neither" || true; }
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | quiet
if [ "$TORCH_SPEC" != "skip" ]; then
  echo "[setup] installing $TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q $TORCH_SPEC 2>&1 | quiet
fi
echo "[setup] installing polymae[dev] (editable)"
"$VENV/bin/python" -m pip install -q -e ".[dev]" 2>&1 | quiet
"$VENV/bin/python" -m pip check
"$VENV/bin/python" -c "import polymae.models, polymae.datasets, polymae.pipeline, polymae.jobs, torch, timm, deepspeed, ray, webdataset, transformers"
rm -f "$VENV"/.polymae-setup-*
touch "$stamp"
echo "[setup] done in $(( $(date +%s) - start )) s"
