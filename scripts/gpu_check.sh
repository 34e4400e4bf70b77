#!/usr/bin/env bash
# The one-call proof of the GPU path, on a lent GPU machine (no network; torch preinstalled).
#   bash scripts/gpu_check.sh             # installs .whl/ into /tmp/site, runs scripts/gpu_check.py:
#                                         # pytest -m gpu, smoke + compile + kill/resume, k-means, VGG-16
#   bash scripts/gpu_check.sh --dry-run   # any machine: prints the steps, checks wheels and files
# Results: JSON and logs under $OUT (the device tool's output folder) or ./gpu-results/.
# Before carrying it there, here: bash scripts/gpu_wheels.sh (fills .whl/, git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS_DIR:-.whl}
if [ "${1:-}" = "--dry-run" ]; then  # here: the project venv (torch, pytest) collects the GPU tests
  exec "${PYTHON:-$(bash scripts/setup.sh)}" scripts/gpu_check.py --dry-run --wheels "$WHEELS"
fi
bash scripts/gpu_wheels.sh --check
SITE=/tmp/dist_cluster_site
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
exec "$PY" scripts/gpu_check.py "$@"
