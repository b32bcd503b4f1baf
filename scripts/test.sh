#!/usr/bin/env bash
# The test command (README, .ci/run): set up the environment, then run every test tier.
#   bash scripts/test.sh                 # unit + integration + e2e
#   bash scripts/test.sh -m unit         # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# A single-node Slurm cluster for tests/integration/test_slurm.py (the tests start munged, slurmctld and slurmd
# themselves). Debian packages, installed once: skipped when the binaries are there; `apt-get update` only when
# the package lists are empty or the first install attempt fails.
slurm_packages() {
  local pkgs="slurmctld slurmd slurm-client munge"
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return 0
  fi
  if ! command -v apt-get >/dev/null; then
    echo "[test] Slurm is not installed and apt-get is missing: install $pkgs" >&2
    return 1
  fi
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "[test] installing $pkgs (apt-get)"
  local start=$(date +%s)
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e '^lock$' -e '^partial$' -e '^auxfiles$')" ] \
      || ! $sudo apt-get install -y -q --no-install-recommends $pkgs >/dev/null; then
    $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q --no-install-recommends $pkgs >/dev/null \
      || { echo "[test] could not install $pkgs with apt-get" >&2; return 1; }
  fi
  echo "[test] Slurm installed in $(( $(date +%s) - start )) s"
}
slurm_packages
VENV=${POLYMAE_VENV:-.venv}
# Services the tests start themselves (embedded Ray, a moto S3 server on 127.0.0.1) read these.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TMPDIR=${TMPDIR:-/tmp}
set +e
"$VENV/bin/python" -m pytest --durations=30 "$@"  # the 30 slowest, to keep CI under 30 min
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
