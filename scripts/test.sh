#!/usr/bin/env bash
# The test command (README, .ci/run): set up the environment, then run every test tier.
#   bash scripts/test.sh                 # unit + integration + e2e
#   bash scripts/test.sh -m unit         # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
VENV=${POLYMAE_VENV:-.venv}
# Services the tests start themselves (embedded Ray, a moto S3 server on 127.0.0.1) read these.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TMPDIR=${TMPDIR:-/tmp}
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
