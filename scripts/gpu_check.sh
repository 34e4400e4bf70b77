#!/usr/bin/env bash
# The one-call proof of the GPU path, on a lent GPU machine (no network; torch 2.11 preinstalled).
# Here, once:   bash scripts/gpu_wheels.sh        # fills .whl/ (git-ignored) with the 4 wheels it lacks
# Then, with the device tool (one call; the check stops itself 540 s after it starts):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Comes back ($OUT, 2 files): gpu_check.json (per step: status, seconds, numbers, checks, log tail)
# and gpu_check_logs.tar.gz (full logs); the console ends with one line per step.
#   bash scripts/gpu_check.sh --dry-run           # any machine: the steps, their budgets, wheels, files
#   bash scripts/gpu_check.sh --device cpu        # the whole check rehearsed on CPU, same deadline
# Environment: PYTHON (default python3), GPU_WHEELS_DIR (default .whl), OUT (default ./gpu-results).
set -euo pipefail
STARTED_AT=$(date +%s.%N)  # the deadline counts from here: the wheel install is inside it
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS_DIR:-.whl}
if [ "${1:-}" = "--dry-run" ]; then  # here: the project venv (torch, pytest) collects the GPU tests
  exec "${PYTHON:-$(bash scripts/setup.sh)}" scripts/gpu_check.py --dry-run --wheels "$WHEELS"
fi
if ! "$PY" -c "import omegaconf, webdataset, submitit" 2>/dev/null; then
  bash scripts/gpu_wheels.sh --check || { echo "gpu_check: carry .whl (bash scripts/gpu_wheels.sh here first)" >&2; exit 2; }
  SITE=$(mktemp -d /tmp/dist_cluster_site.XXXXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py --started-at "$STARTED_AT" "$@"
